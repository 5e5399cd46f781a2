"""Payload layouts that any stage can reuse (docs/migration-format.md section 6.2).

Each codec validates every byte it reads: a stream is input from another
machine, and a value that passes here is made live on the target.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator, Sequence
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
