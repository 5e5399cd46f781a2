"""ARP for IPv4 over Ethernet, RFC 826."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

LEN: Final = 28
OP_REQUEST: Final = 1
OP_REPLY: Final = 2

# htype, ptype, hlen, plen, op, sender MAC, sender IP, target MAC, target IP
_ARP: Final = struct.Struct("!HHBBH6s4s6s4s")


class Arp(NamedTuple):
    op: int
    sha: bytes
    spa: bytes
    tha: bytes
    tpa: bytes


def parse(data: memoryview) -> Arp:
    if len(data) < LEN:
        raise ParseError(f"arp: {len(data)} bytes, need {LEN}")
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack_from(data)
    if (htype, ptype, hlen, plen) != (1, 0x0800, 6, 4):
        raise ParseError("arp: not Ethernet/IPv4")
    if op not in (OP_REQUEST, OP_REPLY):
        raise ParseError(f"arp: unknown operation {op}")
    return Arp(op, sha, spa, tha, tpa)


def pack_into(buf: bytearray | memoryview, offset: int, arp: Arp) -> None:
    _ARP.pack_into(buf, offset, 1, 0x0800, 6, 4, arp.op, arp.sha, arp.spa, arp.tha, arp.tpa)
