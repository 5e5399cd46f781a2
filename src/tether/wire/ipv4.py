"""IPv4 header, RFC 791 section 3.1."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError
from tether.wire.checksum import checksum

HLEN: Final = 20
PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
FLAG_DF: Final = 0x4000
_FLAG_MF: Final = 0x2000
_OFFSET_MASK: Final = 0x1FFF

# version/IHL, TOS, total length, identification, flags/fragment offset, TTL,
# protocol, header checksum, source, destination
_HDR: Final = struct.Struct("!BBHHHBBH4s4s")


class IPv4(NamedTuple):
    header_len: int
    total_len: int
    ttl: int
    proto: int
    src: bytes
    dst: bytes


def parse(pkt: memoryview) -> IPv4:
    """Validate the header; the payload is pkt[header_len:total_len].

    Fragments are refused: tether terminates flows and has nothing to reassemble
    for (the guest's MTU is what tether told it, so it has no reason to fragment).
    """
    if len(pkt) < HLEN:
        raise ParseError(f"ipv4: {len(pkt)} bytes, need {HLEN}")
    vihl, _tos, total, _ident, frag, ttl, proto, _csum, src, dst = _HDR.unpack_from(pkt)
    if vihl >> 4 != 4:
        raise ParseError("ipv4: version is not 4")
    hlen = (vihl & 0xF) * 4
    if hlen < HLEN or total < hlen or total > len(pkt):
        raise ParseError(f"ipv4: bad lengths (header {hlen}, total {total}, have {len(pkt)})")
    if frag & (_FLAG_MF | _OFFSET_MASK):
        raise ParseError("ipv4: fragment")
    if checksum(pkt[:hlen]) != 0:
        raise ParseError("ipv4: bad header checksum")
    return IPv4(hlen, total, ttl, proto, src, dst)


def pack_into(buf: bytearray | memoryview, offset: int, total_len: int, proto: int,  # noqa: PLR0917
              src: bytes, dst: bytes, ttl: int = 64) -> None:
    """A 20-byte header with DF set and its checksum."""
    _HDR.pack_into(buf, offset, 0x45, 0, total_len, 0, FLAG_DF, ttl, proto, 0, src, dst)
    csum = checksum(memoryview(buf)[offset:offset + HLEN])
    struct.pack_into("!H", buf, offset + 10, csum)
