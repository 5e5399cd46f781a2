"""TCP header and options, RFC 9293 section 3.1 (header), 3.2 (MSS), RFC 7323 (window scale)."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

HLEN: Final = 20
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20

OPT_END: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WS: Final = 3
MAX_WS: Final = 14  # RFC 7323 section 2.3

# source port, destination port, sequence, acknowledgment, data offset, flags,
# window, checksum, urgent pointer
_HDR: Final = struct.Struct("!HHIIBBHHH")


class Tcp(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    header_len: int


class SynOptions(NamedTuple):
    mss: int | None
    wscale: int | None


def parse(data: memoryview) -> Tcp:
    """The header; the payload is data[header_len:]."""
    if len(data) < HLEN:
        raise ParseError(f"tcp: {len(data)} bytes, need {HLEN}")
    sport, dport, seq, ack, off, flags, window, _csum, _urg = _HDR.unpack_from(data)
    hlen = (off >> 4) * 4
    if hlen < HLEN or hlen > len(data):
        raise ParseError(f"tcp: data offset {hlen} outside {HLEN}..{len(data)}")
    if sport == 0 or dport == 0:
        raise ParseError("tcp: port 0")
    return Tcp(sport, dport, seq, ack, flags, window, hlen)


def parse_syn_options(options: memoryview) -> SynOptions:
    """MSS and window scale from a SYN's options; unknown kinds are skipped by length."""
    mss: int | None = None
    wscale: int | None = None
    i = 0
    n = len(options)
    while i < n:
        kind = options[i]
        if kind == OPT_END:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise ParseError("tcp: option length missing")
        length = options[i + 1]
        if length < 2 or i + length > n:
            raise ParseError(f"tcp: option {kind} has bad length {length}")
        if kind == OPT_MSS:
            if length != 4:
                raise ParseError("tcp: MSS option length is not 4")
            mss = (options[i + 2] << 8) | options[i + 3]
        elif kind == OPT_WS:
            if length != 3:
                raise ParseError("tcp: window scale option length is not 3")
            wscale = min(options[i + 2], MAX_WS)
        i += length
    return SynOptions(mss, wscale)


def syn_options(mss: int, wscale: int) -> bytes:
    """MSS, NOP, window scale: 8 bytes, a multiple of 4 as the data offset needs."""
    return struct.pack("!BBHBBBB", OPT_MSS, 4, mss, OPT_NOP, OPT_WS, 3, wscale)


def mss_option(mss: int) -> bytes:
    return struct.pack("!BBH", OPT_MSS, 4, mss)


def pack_into(buf: bytearray | memoryview, offset: int, sport: int, dport: int, seq: int,  # noqa: PLR0917
              ack: int, flags: int, window: int, options: bytes = b"") -> int:
    """Header (+ options) with a zero checksum; returns the header length."""
    hlen = HLEN + len(options)
    _HDR.pack_into(buf, offset, sport, dport, seq, ack, (hlen // 4) << 4, flags, window, 0, 0)
    if options:
        buf[offset + HLEN:offset + hlen] = options
    return hlen
