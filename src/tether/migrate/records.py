"""Payload layouts of tether's own stages (docs/migration-format.md section 6).

Each codec validates every byte it reads: a stream is input from another
machine, and a value that passes here is made live on the target.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tether.migrate.errors import MigrationError
from tether.migrate.stream import Buffer


def expect_size(payload: memoryview, size: int, what: str) -> None:
    if payload.nbytes != size:
        raise MigrationError(errno.EINVAL,
                             f"expected {size} bytes of {what}, found {payload.nbytes}",
                             offset=0)


@dataclass(frozen=True)
class GuestAddresses:
    """What tether learned about the guest by watching its traffic.

    All-zero fields mean "not seen yet".  Addresses are kept as raw
    network-order bytes, as they appear on the wire.
    """

    mac: bytes = bytes(6)
    ipv4: bytes = bytes(4)
    ipv6: bytes = bytes(16)
    ipv6_link_local: bytes = bytes(16)

    def __post_init__(self) -> None:
        for name, size in (("mac", 6), ("ipv4", 4), ("ipv6", 16), ("ipv6_link_local", 16)):
            if len(getattr(self, name)) != size:
                raise ValueError(f"{name} must be {size} bytes")


class GuestAddressesCodec:
    """Section 6.1: mac(6) | ipv4(4) | ipv6(16) | ipv6_link_local(16), 42 bytes."""

    LAYOUT = struct.Struct(">6s4s16s16s")

    def encode(self, value: GuestAddresses) -> Sequence[Buffer]:
        return [self.LAYOUT.pack(value.mac, value.ipv4, value.ipv6, value.ipv6_link_local)]

    def decode(self, payload: memoryview) -> GuestAddresses:
        expect_size(payload, self.LAYOUT.size, "guest addresses")
        mac, ipv4, ipv6, link_local = self.LAYOUT.unpack(payload)
        if mac[0] & 1:
            raise MigrationError(errno.EINVAL,
                                 f"expected a unicast guest MAC, found {mac.hex(':')}", offset=0)
        v4 = ipaddress.IPv4Address(ipv4)
        if any(ipv4) and (v4.is_multicast or v4 == ipaddress.IPv4Address("255.255.255.255")):
            raise MigrationError(errno.EINVAL, f"expected a unicast guest IPv4, found {v4}",
                                 offset=6)
        v6 = ipaddress.IPv6Address(ipv6)
        if any(ipv6) and (v6.is_multicast or v6.is_link_local):
            raise MigrationError(errno.EINVAL,
                                 f"expected a global or unique-local guest IPv6, found {v6}",
                                 offset=10)
        ll = ipaddress.IPv6Address(link_local)
        if any(link_local) and not ll.is_link_local:
            raise MigrationError(errno.EINVAL,
                                 f"expected a link-local guest IPv6 (fe80::/10), found {ll}",
                                 offset=26)
        return GuestAddresses(mac, ipv4, ipv6, link_local)
