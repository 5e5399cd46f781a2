"""ICMP echo, RFC 792 (IPv4) and RFC 4443 section 4 (IPv6)."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

HLEN: Final = 8
V4_ECHO_REPLY: Final = 0
V4_ECHO_REQUEST: Final = 8
V6_ECHO_REQUEST: Final = 128
V6_ECHO_REPLY: Final = 129

# type, code, checksum, identifier, sequence number
_ECHO: Final = struct.Struct("!BBHHH")


class Echo(NamedTuple):
    type: int
    code: int
    ident: int
    seq: int


def parse_echo(data: memoryview) -> Echo:
    if len(data) < HLEN:
        raise ParseError(f"icmp: {len(data)} bytes, need {HLEN}")
    typ, code, _csum, ident, seq = _ECHO.unpack_from(data)
    return Echo(typ, code, ident, seq)


def pack_echo_into(buf: bytearray | memoryview, offset: int, typ: int, ident: int,
                   seq: int) -> None:
    """Header with a zero checksum: the caller sums header and data."""
    _ECHO.pack_into(buf, offset, typ, 0, 0, ident, seq)
