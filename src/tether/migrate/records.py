"""Payload layouts of tether's own stages (docs/migration-format.md section 6).

Each codec validates every byte it reads: a stream is input from another
machine, and a value that passes here is made live on the target.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from tether.migrate.errors import MigrationError
from tether.migrate.stream import Buffer


def expect_size(payload: memoryview, size: int, what: str) -> None:
    if payload.nbytes != size:
        raise MigrationError(errno.EINVAL,
                             f"expected {size} bytes of {what}, found {payload.nbytes}",
                             offset=0)


class FixedRecords:
    """Section 6.2: count u32 | count records of one fixed layout.

    For tables of many same-shaped entries (flows): one struct per entry, no
    per-entry framing, decoded with iter_unpack; records stay plain tuples so a
    hundred thousand of them cost no object churn beyond the tuples themselves.
    """

    COUNT = struct.Struct(">I")

    def __init__(self, layout: str, what: str) -> None:
        self.layout = struct.Struct(layout)
        self.what = what

    def encode(self, value: Sequence[tuple[object, ...]]) -> Sequence[Buffer]:
        size = self.layout.size
        out = bytearray(self.COUNT.size + size * len(value))
        self.COUNT.pack_into(out, 0, len(value))
        pack_into = self.layout.pack_into
        offset = self.COUNT.size
        for record in value:
            pack_into(out, offset, *record)
            offset += size
        return [out]

    def decode(self, payload: memoryview) -> RecordTable:
        if payload.nbytes < self.COUNT.size:
            raise MigrationError(errno.EINVAL, f"expected a {self.what} count, found "
                                 f"{payload.nbytes} bytes", offset=0)
        (count,) = self.COUNT.unpack_from(payload)
        expected = self.COUNT.size + count * self.layout.size
        if payload.nbytes != expected:
            raise MigrationError(errno.EINVAL,
                                 f"expected {count} {self.what} of {self.layout.size} bytes "
                                 f"({expected} bytes with the count), found {payload.nbytes}",
                                 offset=0)
        return RecordTable(self.layout, payload[self.COUNT.size:], count)


class RecordTable(Sequence[tuple[Any, ...]]):
    """Validated fixed-size records, unpacked when read.

    The stream parser has already checked the count against the size; the
    fields of each entry are the owning subsystem's to check, as it turns
    them into live state, so unpacking them here would only do it twice.
    """

    def __init__(self, layout: struct.Struct, data: memoryview, count: int) -> None:
        self._layout = layout
        self._data = data
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[Any, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        return self._layout.unpack_from(self._data, index * self._layout.size)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return self._layout.iter_unpack(self._data)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other,
                                                                          strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]


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
