"""Hostile streams: whatever the bytes, the only failure is a MigrationError."""

from __future__ import annotations

import contextlib
import errno

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.migrate.formats import THREE_STAGES, LiveState
from tests.migrate.test_stream import three_stage_stream
from tether.handover.format import TETHER_FORMAT
from tether.migrate.errors import MigrationError
from tether.migrate.stream import StreamParser, apply_loaded, parse, save

VALID = three_stage_stream(blob=bytes(range(200)))
DOCUMENTED = {errno.EINVAL, errno.ENOTSUP, errno.ENODATA, errno.EFBIG, errno.EBADMSG}


def parses_or_fails_cleanly(data: bytes, max_size: int = 1 << 20) -> None:
    try:
        parse(THREE_STAGES, data, max_size=max_size)
    except MigrationError as exc:
        assert exc.errno in DOCUMENTED, exc
        assert exc.stage is not None and exc.offset is not None, exc
        assert 0 <= exc.offset <= len(data), exc


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)),
                min_size=1, max_size=6))
def test_corrupted_bytes(flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for position, xor in flips:
        data[position] ^= xor
    parses_or_fails_cleanly(bytes(data))


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_after_a_valid_header(tail: bytes) -> None:
    parses_or_fails_cleanly(VALID[:16] + tail)
    parses_or_fails_cleanly(VALID[:36] + tail)


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    parses_or_fails_cleanly(data)
    with contextlib.suppress(MigrationError):
        parse(TETHER_FORMAT, data)


@settings(max_examples=200)
@given(st.integers(0, len(VALID)), st.binary(min_size=1, max_size=40))
def test_inserted_bytes(position: int, junk: bytes) -> None:
    parses_or_fails_cleanly(VALID[:position] + junk + VALID[position:])


@settings(max_examples=100)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_any_chunking_gives_the_same_result(sizes: list[int]) -> None:
    parser = StreamParser(THREE_STAGES)
    position = 0
    for size in sizes:
        parser.feed(VALID[position:position + size])
        position += size
    parser.feed(VALID[position:])
    assert parser.finish() == parse(THREE_STAGES, VALID)


@settings(max_examples=100)
@given(st.integers(0, 2**32 - 1), st.binary(max_size=3000), st.none() | st.integers(0, 2**32 - 1))
def test_round_trip(alpha: int, blob: bytes, extra: int | None) -> None:
    source = LiveState(values={"alpha": alpha, "blob": blob, "extra": extra})
    target = LiveState()
    data = save(THREE_STAGES, source.sides(THREE_STAGES)).to_bytes()
    apply_loaded(THREE_STAGES, parse(THREE_STAGES, data), target.sides(THREE_STAGES))
    expected = {"alpha": alpha, "blob": blob, "prepare": None}
    if extra is not None:
        expected["extra"] = extra
    assert target.values == expected
