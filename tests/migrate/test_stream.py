"""The stream's framing rules, as a target relies on them."""

from __future__ import annotations

import errno
import struct
import zlib

import pytest

from tests.migrate.formats import ALPHA, BLOB, EXTRA, PREPARE, THREE_STAGES, BlobCodec, LiveState
from tether.handover.format import FORMATS, ROLES
from tether.migrate.errors import MigrationError
from tether.migrate.stream import (
    END_MARKER,
    HEADER,
    MAGIC,
    RECORD,
    Bindings,
    Format,
    Stage,
    StreamParser,
    apply_loaded,
    parse,
    save,
)


def three_stage_stream(extra: int | None = 7, blob: bytes = b"payload bytes") -> bytes:
    state = LiveState(values={"alpha": 0xDEADBEEF, "blob": blob, "extra": extra})
    return save(THREE_STAGES, state.sides(THREE_STAGES)).to_bytes()


def record(stage_id: int, payload: bytes, flags: int = 0, crc: int | None = None) -> bytes:
    crc = zlib.crc32(payload) if crc is None else crc
    return RECORD.pack(stage_id, flags, crc, len(payload)) + payload


def header(version: int = 1, compat: int = 1, magic: int = MAGIC) -> bytes:
    return HEADER.pack(magic, version, compat)


def expect_error(fmt: Format, data: bytes, code: int, **located: object) -> MigrationError:
    with pytest.raises(MigrationError) as info:
        parse(fmt, data)
    assert info.value.errno == code, str(info.value)
    for key, value in located.items():
        assert getattr(info.value, key) == value, str(info.value)
    return info.value


def test_layout_is_header_records_end_marker() -> None:
    data = three_stage_stream()
    assert data[:16] == bytes.fromhex("897465746865720a") + struct.pack(">II", 1, 1)
    assert data[16:32] == RECORD.pack(1, 0, zlib.crc32(struct.pack(">I", 0xDEADBEEF)), 4)
    assert data[-16:] == END_MARKER
    loaded = parse(THREE_STAGES, data)
    assert [(r.stage.name if r.stage else None, r.offset) for r in loaded.records] == [
        ("alpha", 16), ("blob", 36), ("extra", 36 + 16 + 13)]
    assert loaded.value(BLOB) == b"payload bytes"
    assert loaded.size == len(data)


def test_stage_without_data_writes_no_record_and_optional_none_is_omitted() -> None:
    loaded = parse(THREE_STAGES, three_stage_stream(extra=None))
    assert [r.stage.name for r in loaded.records if r.stage] == ["alpha", "blob"]


def test_every_truncation_fails_with_enodata_naming_the_stage() -> None:
    data = three_stage_stream()
    # (start, end, name) of each region a cut can fall in; a record's first two
    # bytes are its id, so before them the reader only knows what came before.
    regions = [(0, 16, "header"), (16, 18, "after header"), (18, 36, "alpha"),
               (36, 38, "after alpha"), (38, 65, "blob"), (65, 67, "after blob"),
               (67, 85, "extra"), (85, 87, "after extra"), (87, len(data), "end")]
    assert len(data) == 101
    for cut in range(len(data)):
        name = next(n for start, end, n in regions if start <= cut < end)
        error = expect_error(THREE_STAGES, data[:cut], errno.ENODATA, stage=name)
        assert error.offset == cut


def test_bytes_after_the_end_marker_are_an_error() -> None:
    error = expect_error(THREE_STAGES, three_stage_stream() + b"\0", errno.EINVAL, stage="end")
    assert "after the end marker" in error.message


@pytest.mark.parametrize(("data", "code", "stage", "offset"), [
    (header(magic=MAGIC ^ 1), errno.EINVAL, "header", 0),
    (header(magic=0xB1BB1D1B0BB1D1B0), errno.EINVAL, "header", 0),  # passt's stream
    (header(version=0, compat=0), errno.EINVAL, "header", 8),
    (header(version=1, compat=0), errno.EINVAL, "header", 8),
    (header(version=1, compat=2), errno.EINVAL, "header", 12),
    (header(version=9, compat=5), errno.ENOTSUP, "header", 8),
])
def test_header_is_checked_before_anything_else(data: bytes, code: int, stage: str,
                                                offset: int) -> None:
    expect_error(THREE_STAGES, data + END_MARKER, code, stage=stage, offset=offset)


def test_unknown_mandatory_stage_is_refused_unknown_optional_is_skipped() -> None:
    alpha = record(1, struct.pack(">I", 5))
    blob = record(3, b"x")
    expect_error(THREE_STAGES, header() + alpha + record(99, b"new") + blob + END_MARKER,
                 errno.ENOTSUP, stage="unknown stage 99", offset=36)
    loaded = parse(THREE_STAGES, header() + alpha + record(99, b"new", flags=1) + blob
                   + END_MARKER)
    assert [(r.id, r.stage) for r in loaded.records][1] == (99, None)
    assert loaded.value(BLOB) == b"x"


def test_record_rules() -> None:
    alpha = record(1, struct.pack(">I", 5))
    blob = record(3, b"x")
    # Out of order, duplicated, reserved flags, record for a data-less stage.
    expect_error(THREE_STAGES, header() + blob + alpha + END_MARKER, errno.EINVAL,
                 stage="alpha")
    expect_error(THREE_STAGES, header() + alpha + alpha + blob + END_MARKER, errno.EINVAL)
    expect_error(THREE_STAGES, header() + record(1, struct.pack(">I", 5), flags=4) + blob
                 + END_MARKER, errno.ENOTSUP, stage="alpha", offset=18)
    expect_error(THREE_STAGES, header() + alpha + record(2, b"") + blob + END_MARKER,
                 errno.EINVAL, stage="prepare")
    # A mandatory stage missing, a non-zero end marker.
    expect_error(THREE_STAGES, header() + alpha + END_MARKER, errno.EINVAL, stage="blob")
    expect_error(THREE_STAGES, header() + alpha + blob + RECORD.pack(0, 0, 0, 1),
                 errno.EINVAL, stage="end")
    # Payload checks: crc, and the codec's own validation located in the stream.
    expect_error(THREE_STAGES, header() + record(1, struct.pack(">I", 5), crc=1) + blob
                 + END_MARKER, errno.EBADMSG, stage="alpha", offset=20)
    expect_error(THREE_STAGES, header() + record(1, b"\0\0\0\0\0") + blob + END_MARKER,
                 errno.EINVAL, stage="alpha", offset=32)


def test_size_limit_is_enforced_before_buffering_the_payload() -> None:
    huge = RECORD.pack(3, 0, 0, 1 << 60)
    alpha = record(1, struct.pack(">I", 5))
    parser = StreamParser(THREE_STAGES, max_size=1 << 20)
    parser.feed(header() + alpha)
    with pytest.raises(MigrationError) as info:
        parser.feed(huge)
    assert (info.value.errno, info.value.stage, info.value.offset) == (errno.EFBIG, "blob", 44)
    data = three_stage_stream(blob=bytes(1000))
    assert parse(THREE_STAGES, data, max_size=len(data)).size == len(data)
    with pytest.raises(MigrationError) as info:
        parse(THREE_STAGES, data, max_size=len(data) - 17)
    assert info.value.errno == errno.EFBIG


def test_parser_accepts_any_split_of_the_input() -> None:
    data = three_stage_stream(blob=bytes(range(256)) * 3)
    whole = parse(THREE_STAGES, data)
    for step in (1, 2, 3, 7, 16, 17, 100):
        parser = StreamParser(THREE_STAGES)
        for i in range(0, len(data), step):
            parser.feed(data[i:i + step])
        assert parser.finish() == whole


def test_target_applies_nothing_when_a_later_stage_is_invalid() -> None:
    target = LiveState(values={"alpha": 1, "blob": b"old"})
    data = three_stage_stream()
    corrupt = data[:-17] + bytes([data[-17] ^ 0xFF]) + data[-16:]  # last byte of 'extra'
    with pytest.raises(MigrationError):
        apply_loaded(THREE_STAGES, parse(THREE_STAGES, corrupt), target.sides(THREE_STAGES))
    assert target.values == {"alpha": 1, "blob": b"old"}
    assert target.log == []


def test_target_undoes_applied_stages_when_a_later_apply_fails() -> None:
    target = LiveState(values={"alpha": 1, "blob": b"old"})
    loaded = parse(THREE_STAGES, three_stage_stream())
    with pytest.raises(MigrationError) as info:
        apply_loaded(THREE_STAGES, loaded, target.sides(THREE_STAGES, fail_apply="extra"))
    assert (info.value.errno, info.value.stage) == (errno.EEXIST, "extra")
    assert target.values == {"alpha": 1, "blob": b"old", "prepare": None}
    assert target.log == ["apply alpha", "apply prepare", "apply blob",
                          "revert blob", "revert prepare", "revert alpha"]


def test_target_applies_every_stage_in_table_order() -> None:
    target = LiveState()
    apply_loaded(THREE_STAGES, parse(THREE_STAGES, three_stage_stream()),
                 target.sides(THREE_STAGES))
    assert target.values == {"alpha": 0xDEADBEEF, "prepare": None, "blob": b"payload bytes",
                             "extra": 7}
    assert target.log == ["apply alpha", "apply prepare", "apply blob", "apply extra"]


def test_source_undoes_in_reverse_order_when_a_stage_fails() -> None:
    source = LiveState(values={"alpha": 1, "blob": b"b"})
    with pytest.raises(MigrationError) as info:
        save(THREE_STAGES, source.sides(THREE_STAGES, fail_save="blob"))
    assert (info.value.errno, info.value.stage, info.value.offset) == (errno.EBUSY, "blob", 36)
    assert source.log == ["save alpha", "save prepare", "undo prepare", "undo alpha"]


def test_source_rollback_after_a_successful_save() -> None:
    """Migration can fail after the state was written: the source must be undoable then."""
    source = LiveState(values={"alpha": 1, "blob": b"b"})
    saved = save(THREE_STAGES, source.sides(THREE_STAGES))
    saved.rollback()
    saved.rollback()  # a second call does nothing
    assert source.log == ["save alpha", "save prepare", "save blob", "save extra",
                          "undo extra", "undo blob", "undo prepare", "undo alpha"]


def test_source_refuses_to_write_a_stream_missing_a_mandatory_stage() -> None:
    source = LiveState(values={"alpha": 1})
    with pytest.raises(MigrationError) as info:
        save(THREE_STAGES, source.sides(THREE_STAGES))
    assert (info.value.errno, info.value.stage) == (errno.EINVAL, "blob")
    assert source.log[-2:] == ["undo prepare", "undo alpha"]


def test_one_failing_undo_does_not_stop_the_others() -> None:
    log: list[str] = []

    def failing() -> None:
        log.append("first")
        raise RuntimeError("boom")

    sides = Bindings(THREE_STAGES).bind(ALPHA, save=lambda: 1, undo=failing) \
        .bind(PREPARE, undo=lambda: log.append("second"))
    with pytest.raises(MigrationError) as info:
        save(THREE_STAGES, sides)  # no blob: fails, undoes both
    assert log == ["second", "first"]
    assert info.value.errno == errno.EIO


def test_error_text_names_stage_offset_and_errno() -> None:
    error = MigrationError(errno.ENODATA, "stream ends", stage="blob", offset=40)
    assert str(error) == "stage 'blob', offset 40: stream ends [ENODATA]"


def test_format_table_is_checked() -> None:
    with pytest.raises(ValueError, match="unique"):
        Format(versions={1: (ALPHA, ALPHA)}, current=1, compat=1)
    with pytest.raises(ValueError, match="compat"):
        Format(versions={1: (ALPHA,)}, current=1, compat=2)
    with pytest.raises(ValueError, match="current"):
        Format(versions={1: (BLOB, EXTRA)}, current=2, compat=1)


def test_a_binding_to_a_stage_the_format_lacks_is_refused_when_made() -> None:
    """A misspelt or foreign stage must not be skipped in silence: a skipped
    "freeze" or "flows" stage would lose every connection it should move."""
    misspelt = Stage("blobb", 3, BlobCodec())
    with pytest.raises(ValueError, match=r"'blobb'.*not in the tether format"):
        Bindings(THREE_STAGES).bind(misspelt, save=lambda: b"x")
    with pytest.raises(ValueError, match="bound twice"):
        Bindings(THREE_STAGES).bind(BLOB, save=lambda: b"x").bind(BLOB, save=lambda: b"y")
    other = Format(versions={1: (ALPHA,)}, current=1, compat=1)
    with pytest.raises(ValueError, match="bindings made for"):
        save(THREE_STAGES, Bindings(other).bind(ALPHA, save=lambda: 1))


def test_every_handover_role_is_a_stage_of_its_format() -> None:
    for name, fmt in FORMATS.items():
        stages = {stage for version in fmt.versions.values() for stage in version}
        roles = ROLES[name]
        for stage in (roles.addresses, roles.freeze, roles.tcp, roles.udp):
            assert stage is None or stage in stages, (name, stage)
