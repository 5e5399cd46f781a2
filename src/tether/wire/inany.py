"""One 16-byte form for an IPv4 or IPv6 address, as passt's `union inany_addr`.

IPv4 travels as the IPv4-mapped IPv6 address ::ffff:a.b.c.d (RFC 4291
section 2.5.5.2): 80 zero bits, 16 one bits, then the IPv4 address.  passt's
flow records use that form for both families, and so do tether's.
"""

from __future__ import annotations

from typing import Final

V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"  # RFC 4291 section 2.5.5.2


def is_v4_mapped(addr: bytes) -> bool:
    """Whether a 16-byte address is ::ffff:a.b.c.d."""
    return len(addr) == 16 and addr[:12] == V4_MAPPED_PREFIX


def mapped(addr: bytes) -> bytes:
    """4 or 16 bytes as on the wire -> 16 bytes: IPv6 as it is, IPv4 mapped."""
    return addr if len(addr) == 16 else V4_MAPPED_PREFIX + addr


def v4_of(addr: bytes) -> bytes | None:
    """The IPv4 address inside an IPv4-mapped address, None for any other address."""
    return addr[12:] if is_v4_mapped(addr) else None


def unmapped(addr: bytes) -> bytes:
    """16 bytes -> as on the wire: an IPv4-mapped address back to its 4 bytes."""
    return addr[12:] if is_v4_mapped(addr) else addr
