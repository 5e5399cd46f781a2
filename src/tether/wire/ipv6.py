"""IPv6 fixed header, RFC 8200 section 3."""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

HLEN: Final = 40
PROTO_ICMPV6: Final = 58
ALL_NODES: Final = bytes.fromhex("ff020000000000000000000000000001")
UNSPECIFIED: Final = bytes(16)

# version/class/flow label, payload length, next header, hop limit, source, destination
_HDR: Final = struct.Struct("!IHBB16s16s")


class IPv6(NamedTuple):
    payload_len: int
    next_header: int
    hop_limit: int
    src: bytes
    dst: bytes


def parse(pkt: memoryview) -> IPv6:
    """Validate the fixed header; the payload is pkt[HLEN:HLEN + payload_len].

    Extension headers are not walked: the caller sees next_header as it is and
    drops what it does not handle, which is every extension header tether meets.
    """
    if len(pkt) < HLEN:
        raise ParseError(f"ipv6: {len(pkt)} bytes, need {HLEN}")
    vcf, plen, nxt, hops, src, dst = _HDR.unpack_from(pkt)
    if vcf >> 28 != 6:
        raise ParseError("ipv6: version is not 6")
    if HLEN + plen > len(pkt):
        raise ParseError(f"ipv6: payload length {plen} exceeds {len(pkt) - HLEN}")
    return IPv6(plen, nxt, hops, src, dst)


def pack_into(buf: bytearray | memoryview, offset: int, payload_len: int, next_header: int,  # noqa: PLR0917
              src: bytes, dst: bytes, hop_limit: int = 64) -> None:
    _HDR.pack_into(buf, offset, 6 << 28, payload_len, next_header, hop_limit, src, dst)


def link_local_from_mac(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier (RFC 4291 appendix A)."""
    eui = bytes([mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE, mac[3], mac[4], mac[5]])
    return bytes.fromhex("fe80000000000000") + eui


def solicited_node(addr: bytes) -> bytes:
    """ff02::1:ffXX:XXXX for addr (RFC 4291 section 2.7.1)."""
    return bytes.fromhex("ff0200000000000000000001ff") + addr[13:]


def multicast_mac(addr: bytes) -> bytes:
    """33:33 + last four bytes (RFC 2464 section 7)."""
    return b"\x33\x33" + addr[12:]
