"""Capture real passt device states into tests/data/migration/passt/.

    sudo .venv/bin/python -m tests.vm.capture_passt_state

A VM runs on passt (tests/vm/reference.py) with passt-repair; it holds the
lab's flows (migration_lab.py: a checked stream each way, and two
connections half-closed with data queued), then QEMU migrates it to a file.
QEMU carries a vhost-user back-end's state in its own stream as chunks of a
big-endian u32 length and that many bytes, ended by a zero length
(reference/vhost-user-migration.md, vhost_save_backend_state): the state is
found there by passt's magic.  Each capture is written with a JSON summary
of what it holds, which tests/migrate/test_passt_golden.py checks tether's
reader against.  Run it again only to add captures: they are test vectors.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
from pathlib import Path

from tests.support import wait_for
from tether.handover.passt_format import PASST_MAGIC

from .guest import build_tstream, ensure_guest
from .migration_lab import DOWN_PORT, Lab, start_half_closed, start_streams
from .tetherlab import host_namespace

DIRECTORY = Path(__file__).resolve().parents[1] / "data" / "migration" / "passt"


def device_state(qemu_stream: bytes) -> bytes:
    """passt's bytes out of QEMU's migration stream."""
    start = qemu_stream.find(PASST_MAGIC.to_bytes(8, "big"))
    if start < 4:
        raise RuntimeError("no passt device state in QEMU's stream")
    out = bytearray()
    pos = start - 4
    while True:
        (length,) = struct.unpack_from(">I", qemu_stream, pos)
        if length == 0:
            return bytes(out)
        out += qemu_stream[pos + 4:pos + 4 + length]
        pos += 4 + length


def capture(name: str, half_closed: bool) -> None:
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="tether-capture-"))
    tstream = build_tstream(work / "ts")
    with host_namespace("tcap") as ns:
        lab = Lab(work, ns, tstream, guest)
        try:
            passt = lab.passt("p1", "-t", str(DOWN_PORT))
            vm = lab.vm("vm1", passt)
            start_streams(lab, vm)
            if half_closed:
                start_half_closed(lab, vm)
            target = work / "qemu.migration"
            vm.qmp("migrate", uri=f"file:{target}")
            wait_for(lambda: vm.qmp("query-migrate").get("status") in ("completed", "failed"),
                     120, "the migration to a file")
            status = vm.qmp("query-migrate").get("status")
            if status != "completed":
                raise RuntimeError(f"migration {status}:\n{lab.logs()}")
            state = device_state(target.read_bytes())
        finally:
            lab.close()
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    (DIRECTORY / f"{name}.bin").write_bytes(state)
    summary = {"flows": 4 if half_closed else 2, "half_closed": half_closed,
               "size": len(state)}
    (DIRECTORY / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{name}: {len(state)} bytes")


def main() -> int:
    capture("two-streams", half_closed=False)
    capture("streams-and-half-closed", half_closed=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
