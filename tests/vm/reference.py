"""passt, the reference back-end, beside tether in the same lab.

`./dev setup` builds passt, pasta and passt-repair from Debian trixie's source
package into ~/.cache/tether/passt (a link to the versioned build).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import wait_for

from .tetherlab import Process, in_ns


def passt_dir() -> Path | None:
    """Where the passt build is, or None when `./dev setup` has not built it."""
    env = os.environ.get("TETHER_PASST_DIR")
    root = Path(env) if env else Path.home() / ".cache" / "tether" / "passt"
    return root if (root / "passt").is_file() else None


class Passt(Process):
    """`passt --vhost-user --socket PATH -f` (or `-netdev stream` without
    vhost_user) inside a host namespace, like tetherlab.Tether.  As root,
    passt binds its socket first, then runs as nobody."""

    def __init__(self, workdir: Path, name: str, ns: str, *extra: str,
                 vhost_user: bool = True) -> None:
        binary = passt_dir()
        if binary is None:
            raise RuntimeError("no passt build: run ./dev setup")
        self.socket = workdir / f"{name}.sock"
        self.repair_path = Path(f"{self.socket}.repair")
        mode = ["--vhost-user"] if vhost_user else []
        super().__init__(in_ns(ns, str(binary / "passt"), *mode, "--socket", str(self.socket),
                               "-f", *extra), workdir / f"{name}.log")
        wait_for(lambda: "UNIX domain socket bound" in self.text() or
                 self.proc.poll() is not None, 30, f"{name} socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"passt {name} exited:\n{self.text()}")


class PasstRepair(Process):
    """passt-repair, privileged, connected to a back-end's repair socket (passt's
    or tether's)."""

    def __init__(self, workdir: Path, name: str, repair_path: Path) -> None:
        binary = passt_dir()
        if binary is None:
            raise RuntimeError("no passt build: run ./dev setup")
        super().__init__([str(binary / "passt-repair"), str(repair_path)],
                         workdir / f"{name}.log")
