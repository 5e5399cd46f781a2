"""The golden streams in tests/data/migration/, made by the real encoder.

Regenerate with `python -m tests.migrate.golden` only when the format changes on
purpose; test_golden.py fails if the encoder's output drifts from these files.
A file named *.valid.bin must pass `tether-state check`; *.invalid.bin must fail
with the errno, stage and offset recorded in expected.json.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from tests.migrate.formats import U32Codec
from tether.migrate.records import GuestAddresses
from tether.migrate.stream import Format, Side, Stage, save
from tether.migrate.tether_format import GUEST_ADDRESSES, TETHER_FORMAT

DIRECTORY = Path(__file__).resolve().parent.parent / "data" / "migration"

SEEN = GuestAddresses(
    mac=bytes.fromhex("525400123456"),
    ipv4=bytes([10, 200, 0, 2]),
    ipv6=bytes.fromhex("fd000200000000000000000000000002"),
    ipv6_link_local=bytes.fromhex("fe800000000000005054 00fffe123456".replace(" ", "")),
)

# A later release that added an optional stage: today's reader must skip it.
FUTURE_FORMAT = Format(
    versions={1: (GUEST_ADDRESSES,), 2: (GUEST_ADDRESSES, Stage("future", 200, U32Codec(),
                                                                optional=True))},
    current=2, compat=1)
# A later release whose stream today's reader must refuse.
INCOMPATIBLE_FORMAT = Format(versions={1: (GUEST_ADDRESSES,), 5: (GUEST_ADDRESSES,)},
                             current=5, compat=5)


def _stream(fmt: Format, addresses: GuestAddresses, future: int | None = None) -> bytes:
    sides: dict[str, Side[Any]] = {"guest addresses": Side(save=lambda: addresses),
                                   "future": Side(save=lambda: future)}
    return save(fmt, sides).to_bytes()


def streams() -> dict[str, bytes]:
    seen = _stream(TETHER_FORMAT, SEEN)
    corrupt = bytearray(seen)
    corrupt[16 + 16 + 3] ^= 0x01  # a bit of the MAC inside the payload
    multicast = _stream(TETHER_FORMAT, GuestAddresses(mac=bytes.fromhex("015400123456")))
    return {
        "guest-addresses.valid.bin": seen,
        "nothing-seen.valid.bin": _stream(TETHER_FORMAT, GuestAddresses()),
        "future-optional-stage.valid.bin": _stream(FUTURE_FORMAT, SEEN, future=7),
        "truncated.invalid.bin": seen[:40],
        "trailing-bytes.invalid.bin": seen + b"\0",
        "corrupt-payload.invalid.bin": bytes(corrupt),
        "multicast-mac.invalid.bin": multicast,
        "incompatible-version.invalid.bin": _stream(INCOMPATIBLE_FORMAT, SEEN),
        "passt-v2-header.invalid.bin": struct.pack(">QII", 0xB1BB1D1B0BB1D1B0, 2, 2)
        + bytes(46),
    }


EXPECTED_ERRORS = {
    "truncated.invalid.bin": ("ENODATA", "guest addresses", 40),
    "trailing-bytes.invalid.bin": ("EINVAL", "end", 90),
    "corrupt-payload.invalid.bin": ("EBADMSG", "guest addresses", 20),
    "multicast-mac.invalid.bin": ("EINVAL", "guest addresses", 32),
    "incompatible-version.invalid.bin": ("ENOTSUP", "header", 8),
    "passt-v2-header.invalid.bin": ("EINVAL", "header", 0),
}


def main() -> None:
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    for name, data in streams().items():
        (DIRECTORY / name).write_bytes(data)
    expected = {name: {"errno": e, "stage": s, "offset": o}
                for name, (e, s, o) in EXPECTED_ERRORS.items()}
    (DIRECTORY / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
