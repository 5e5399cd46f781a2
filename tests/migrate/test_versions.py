"""Version negotiation, and a worked example of evolving the format across releases.

The example: three releases of a "counters" subsystem.
  release A writes v1: stage "addresses" and stage "counters" (two u32).
  release B adds an optional stage "stats".  Old readers can skip it, so B
            writes version 2 with compat_version 1 (docs/migration-format.md 5.3).
  release C widens the counters to u64, a new layout under a new stage id: v1
            and v2 readers cannot read it, so C writes version 3 with
            compat_version 3 (section 5.3), and still reads v1 and v2 streams.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.migrate.formats import BlobCodec, U32Codec
from tether.migrate.errors import MigrationError
from tether.migrate.stream import (
    END_MARKER,
    HEADER,
    MAGIC,
    Bindings,
    Buffer,
    Format,
    Stage,
    apply_loaded,
    parse,
    save,
)


class Counters32:
    def encode(self, value: tuple[int, int]) -> Sequence[Buffer]:
        return [struct.pack(">II", *value)]

    def decode(self, payload: memoryview) -> tuple[int, int]:
        if payload.nbytes != 8:
            raise MigrationError(errno.EINVAL, f"expected 8 bytes, found {payload.nbytes}")
        a, b = struct.unpack(">II", payload)
        return a, b


class Counters64:
    def encode(self, value: tuple[int, int]) -> Sequence[Buffer]:
        return [struct.pack(">QQ", *value)]

    def decode(self, payload: memoryview) -> tuple[int, int]:
        if payload.nbytes != 16:
            raise MigrationError(errno.EINVAL, f"expected 16 bytes, found {payload.nbytes}")
        a, b = struct.unpack(">QQ", payload)
        return a, b


ADDRESSES = Stage("addresses", 1, BlobCodec())
COUNTERS = Stage("counters", 2, Counters32())
STATS = Stage("stats", 3, U32Codec(), optional=True)
COUNTERS64 = Stage("counters", 4, Counters64())

V1 = (ADDRESSES, COUNTERS)
V2 = (ADDRESSES, COUNTERS, STATS)
V3 = (ADDRESSES, COUNTERS64, STATS)

RELEASE_A = Format(versions={1: V1}, current=1, compat=1)
RELEASE_B = Format(versions={1: V1, 2: V2}, current=2, compat=1)
RELEASE_C = Format(versions={1: V1, 2: V2, 3: V3}, current=3, compat=3)


SOURCE_VALUES: dict[str, object] = {"addresses": b"\x0a\x00\x02\x0f", "counters": (7, 9),
                                    "stats": 1234}


def every_stage(fmt: Format) -> set[Stage[Any]]:
    return {stage for stages in fmt.versions.values() for stage in stages}


def source_sides(fmt: Format) -> Bindings:
    sides = Bindings(fmt)
    for stage in fmt.versions[fmt.current]:
        sides.bind(stage, save=_value_of(stage.name))
    return sides


def _value_of(name: str) -> Callable[[], object]:
    return lambda: SOURCE_VALUES[name]


def migrate(source: Format, target: Format) -> dict[str, object]:
    data = save(source, source_sides(source)).to_bytes()
    live: dict[str, object] = {}

    def setter(name: str) -> Callable[[object], None]:
        return lambda value: live.__setitem__(name, value)

    loaded = parse(target, data)
    sides = Bindings(target)
    for stage in every_stage(target):
        sides.bind(stage, apply=setter(stage.name))
    apply_loaded(target, loaded, sides)
    live["read as"] = loaded.chosen
    return live


def test_a_to_b_and_b_to_a_both_work() -> None:
    assert migrate(RELEASE_A, RELEASE_B) == {"addresses": b"\x0a\x00\x02\x0f",
                                             "counters": (7, 9), "read as": 1}
    # B's extra stage is optional: A skips it and keeps everything else.
    assert migrate(RELEASE_B, RELEASE_A) == {"addresses": b"\x0a\x00\x02\x0f",
                                             "counters": (7, 9), "read as": 1}
    assert migrate(RELEASE_B, RELEASE_B) == {"addresses": b"\x0a\x00\x02\x0f",
                                             "counters": (7, 9), "stats": 1234, "read as": 2}


def test_c_reads_old_streams_but_old_releases_refuse_c() -> None:
    assert migrate(RELEASE_A, RELEASE_C)["read as"] == 1
    assert migrate(RELEASE_B, RELEASE_C) == {"addresses": b"\x0a\x00\x02\x0f",
                                             "counters": (7, 9), "stats": 1234, "read as": 2}
    assert migrate(RELEASE_C, RELEASE_C)["read as"] == 3
    for old in (RELEASE_A, RELEASE_B):
        with pytest.raises(MigrationError) as info:
            migrate(RELEASE_C, old)
        assert (info.value.errno, info.value.stage) == (errno.ENOTSUP, "header")


@pytest.mark.parametrize(("version", "compat", "expected"), [
    (1, 1, 1), (2, 1, 2), (2, 2, 2), (3, 1, 3), (3, 2, 3), (3, 3, 3),
    (7, 1, 3), (7, 3, 3), (7, 4, errno.ENOTSUP), (100, 100, errno.ENOTSUP),
    (0, 0, errno.EINVAL), (1, 0, errno.EINVAL), (1, 2, errno.EINVAL),
])
def test_negotiation_matrix(version: int, compat: int, expected: int) -> None:
    """Release C (knows 1, 2, 3): the newest known version in [compat, version] wins."""
    data = HEADER.pack(MAGIC, version, compat) + END_MARKER
    if expected in (1, 2, 3):
        try:
            parse(RELEASE_C, data)
        except MigrationError as exc:  # the empty stream lacks mandatory stages, but
            assert exc.errno == errno.EINVAL  # negotiation itself succeeded
            assert exc.stage == "addresses"
        assert RELEASE_C.choose(version, compat) == expected
        return
    with pytest.raises(MigrationError) as info:
        parse(RELEASE_C, data)
    assert info.value.errno == expected
    assert info.value.stage == "header"


def test_a_version_gap_is_handled() -> None:
    """A reader that dropped v2 support still reads v1 and v3 streams."""
    sparse = Format(versions={1: V1, 3: V3}, current=3, compat=3)
    assert sparse.choose(2, 2) is None
    assert sparse.choose(2, 1) == 1
    assert sparse.choose(5, 2) == 3
