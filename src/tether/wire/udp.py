"""UDP header, RFC 768."""

from __future__ import annotations

import struct
from typing import Final

from tether.wire import ParseError

HLEN: Final = 8

_HDR: Final = struct.Struct("!HHHH")


def parse(data: memoryview) -> tuple[int, int, int]:
    """(source port, destination port, length); the payload is data[HLEN:length]."""
    if len(data) < HLEN:
        raise ParseError(f"udp: {len(data)} bytes, need {HLEN}")
    sport, dport, length, _csum = _HDR.unpack_from(data)
    if length < HLEN or length > len(data):
        raise ParseError(f"udp: length {length} outside {HLEN}..{len(data)}")
    if dport == 0:
        raise ParseError("udp: destination port 0")
    return sport, dport, length


def pack_into(buf: bytearray | memoryview, offset: int, sport: int, dport: int,
              length: int) -> None:
    """Header with a zero checksum: the caller fills it (zero is invalid over IPv6)."""
    _HDR.pack_into(buf, offset, sport, dport, length, 0)
