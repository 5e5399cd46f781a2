"""tether: a user-mode network back-end for virtual machines.

QEMU attaches a guest's virtio-net card over vhost-user; tether terminates the
guest's traffic and carries it over ordinary host sockets, and hands its state
to another tether instance when the VM live-migrates.
"""

import hashlib
import json
from pathlib import Path

__version__ = "0.1.0"


def check_compiled_build(package: Path) -> None:
    """Refuse a compiled build older than its sources (tools/compile.py).

    Python imports an extension in preference to the .py beside it, so after
    an edit the stale extension would run, not the edited code: a silent
    wrong answer in a test or a benchmark.  The build's stamp holds the hash
    of each source it compiled.
    """
    stamp = package / "_compiled.json"
    if not stamp.exists():
        return
    built: dict[str, str] = json.loads(stamp.read_text())
    changed = [module for module, digest in built.items()
               if not (package.parent / module).exists() or
               hashlib.sha256((package.parent / module).read_bytes()).hexdigest() != digest]
    if changed:
        raise ImportError(f"tether's compiled build is older than {', '.join(changed)}: "
                          "run ./dev compile again, or ./dev compile --clean")


check_compiled_build(Path(__file__).parent)
