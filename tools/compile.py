"""The optional compiled build: tether's per-frame modules compiled with mypyc.

    .venv/bin/python tools/compile.py          # build, in place (./dev compile)
    .venv/bin/python tools/compile.py --clean  # back to pure Python

The source stays the same Python; mypyc (shipped with mypy) turns the
modules every frame passes through into C extensions, which Python imports
in preference to the .py beside them, so the daemon, the tests and the
benchmarks all run the compiled build without being told.  The rest
(configuration, migration, the repair helper, the rate-limited logger)
stays interpreted: it runs once per connection, per migration or per log
line, not per frame; some of it subclasses OSError, which mypyc's native
classes cannot, and the logger must find its caller's Python frame.

A build records the hash of every source it compiled (`STAMP`); the package
refuses to import when a source changed after its build (tether/__init__.py),
since the stale extension, not the edited file, would run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
STAMP = SRC / "tether" / "_compiled.json"

# What a frame passes through, guest to socket and back, in every mode: the
# loop, the stack and its translators, the wire formats and the
# three transports' data paths (-netdev stream, tap and vhost-user).
HOT_MODULES = (
    "tether/loop.py",
    "tether/frames.py",
    "tether/net/addresses.py",
    "tether/net/context.py",
    "tether/net/dhcp.py",
    "tether/net/dhcpv6.py",
    "tether/net/flows.py",
    "tether/net/icmp.py",
    "tether/net/output.py",
    "tether/net/params.py",
    "tether/net/sockets.py",
    "tether/net/stack.py",
    "tether/net/tcp.py",
    "tether/net/tcp_core.py",
    "tether/net/tcp_state.py",
    "tether/net/udp.py",
    "tether/wire/arp.py",
    "tether/wire/checksum.py",
    "tether/wire/dhcp.py",
    "tether/wire/dhcpv6.py",
    "tether/wire/ethernet.py",
    "tether/wire/icmp.py",
    "tether/wire/inany.py",
    "tether/wire/ipv4.py",
    "tether/wire/ipv6.py",
    "tether/wire/ndp.py",
    "tether/wire/tcp.py",
    "tether/wire/udp.py",
    "tether/wire/virtio_net.py",
    "tether/transport/stream.py",
    "tether/transport/tap.py",
    "tether/transport/vhost_user/datapath.py",
    "tether/transport/vhost_user/memory.py",
    "tether/transport/vhost_user/virtqueue.py",
)


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean() -> None:
    """Remove every extension and the stamp: the tree is pure Python again."""
    for ext in [*SRC.glob("*__mypyc*.so"), *(SRC / "tether").rglob("*.so")]:
        ext.unlink()
    STAMP.unlink(missing_ok=True)
    shutil.rmtree(SRC / "build", ignore_errors=True)


def build() -> None:
    clean()
    # The mypyc command line compiles into the working directory: run it in
    # src, so the extensions land beside their sources (and its scratch
    # directory, src/build, is removed after).
    result = subprocess.run([sys.executable, "-m", "mypyc", *HOT_MODULES], cwd=SRC,
                            capture_output=True, text=True, check=False)
    shutil.rmtree(SRC / "build", ignore_errors=True)
    if result.returncode != 0:
        clean()
        sys.exit(f"compile: mypyc failed\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
    STAMP.write_text(json.dumps({m: source_hash(SRC / m) for m in HOT_MODULES}, indent=1))
    print(f"compile: {len(HOT_MODULES)} modules compiled in {SRC}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled build")
    args = parser.parse_args()
    if args.clean:
        clean()
    else:
        build()


if __name__ == "__main__":
    main()
