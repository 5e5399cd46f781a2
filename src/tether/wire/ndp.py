"""ICMPv6 Neighbor Discovery, RFC 4861 (section 4: formats), and RDNSS, RFC 8106.

Only what a router on a point-to-point link needs: parse router and neighbour
solicitations; build router advertisements and neighbour advertisements.
ICMPv6 checksums (RFC 4443 section 2.3) are filled in by the caller.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

ROUTER_SOLICITATION: Final = 133
ROUTER_ADVERTISEMENT: Final = 134
NEIGHBOR_SOLICITATION: Final = 135
NEIGHBOR_ADVERTISEMENT: Final = 136
HOP_LIMIT: Final = 255  # section 7.1.1: anything else was forwarded and must be ignored

OPT_SOURCE_LL: Final = 1
OPT_TARGET_LL: Final = 2
OPT_PREFIX: Final = 3
OPT_MTU: Final = 5
OPT_RDNSS: Final = 25

_NA_FLAGS: Final = 0x60000000  # Solicited | Override (section 4.4); not Router: see build_na
_NA_ROUTER: Final = 0x80000000


class Solicitation(NamedTuple):
    type: int
    target: bytes  # the address asked about; empty for a router solicitation


def parse(message: memoryview) -> Solicitation:
    """An RS or NS; ParseError for anything else or malformed."""
    if len(message) < 8:
        raise ParseError(f"ndp: {len(message)} bytes, need 8")
    typ, code = message[0], message[1]
    if code != 0:
        raise ParseError(f"ndp: code {code}")
    if typ == ROUTER_SOLICITATION:
        _check_options(message[8:])
        return Solicitation(typ, b"")
    if typ == NEIGHBOR_SOLICITATION:
        if len(message) < 24:
            raise ParseError("ndp: neighbour solicitation truncated")
        _check_options(message[24:])
        return Solicitation(typ, bytes(message[8:24]))
    raise ParseError(f"ndp: type {typ} is not a solicitation")


def _check_options(options: memoryview) -> None:
    """Section 4.6: every option has a non-zero length in units of 8 bytes."""
    i = 0
    while i < len(options):
        if i + 2 > len(options) or options[i + 1] == 0:
            raise ParseError("ndp: option with zero or missing length")
        i += options[i + 1] * 8
    if i != len(options):
        raise ParseError("ndp: option overruns the message")


def build_na(target: bytes, our_mac: bytes, router: bool) -> bytes:
    """Neighbour advertisement for target, answering with our MAC (section 4.4)."""
    flags = _NA_FLAGS | (_NA_ROUTER if router else 0)
    return struct.pack("!BBHI16sBB6s", NEIGHBOR_ADVERTISEMENT, 0, 0, flags, target,
                       OPT_TARGET_LL, 1, our_mac)


def build_ra(our_mac: bytes, prefix: bytes, prefix_len: int, mtu: int,  # noqa: PLR0917
             dns: tuple[bytes, ...], lifetime: int = 1800, other_config: bool = True) -> bytes:
    """Router advertisement (section 4.2) with source link-layer, MTU, prefix
    (on-link, autonomous: SLAAC, section 4.6.2) and RDNSS (RFC 8106 section 5.1)."""
    flags = 0x40 if other_config else 0  # O: DHCPv6 has more (DNS), no addresses (M)
    out = struct.pack("!BBHBBHII", ROUTER_ADVERTISEMENT, 0, 0, 64, flags, lifetime, 0, 0)
    out += struct.pack("!BB6s", OPT_SOURCE_LL, 1, our_mac)
    if mtu:  # 0: announce none (passt's -m 0)
        out += struct.pack("!BBHI", OPT_MTU, 1, 0, mtu)
    out += struct.pack("!BBBBIII16s", OPT_PREFIX, 4, prefix_len, 0xC0, 0xFFFFFFFF,
                       0xFFFFFFFF, 0, prefix)
    # RDNSS counts its length in 8-byte units in one byte (at most 127 servers),
    # and the whole RA fits the IPv6 minimum MTU (RFC 8200 section 5).
    dns = dns[:min(127, (1280 - 40 - len(out) - 8) // 16)]
    if dns:
        out += struct.pack("!BBHI", OPT_RDNSS, 1 + 2 * len(dns), 0, 0xFFFFFFFF) + b"".join(dns)
    return out
