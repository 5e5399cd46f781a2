"""The migration stream: header, framed stage records, end marker.

Byte layout (docs/migration-format.md is the normative text; section numbers
below refer to it):

    header (section 3)   magic u64 | version u32 | compat_version u32     16 bytes
    record (section 4)   id u16 | flags u16 | crc32 u32 | length u64      16 bytes
                         payload (length bytes)
    ...                  one record per stage that carries data, in table order
    end    (section 4.3) a record header of 16 zero bytes

All integers are big-endian.  The source runs every stage's source side in
order and frames what it produces; the target parses and validates the whole
stream first (`StreamParser`, sans-IO: bytes in, records out) and only then
applies it (`apply_loaded`), undoing what it applied if a later stage fails.
"""

from __future__ import annotations

import errno
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from tether.migrate.errors import MigrationError

MAGIC = 0x897465746865720A
"""b"\\x89tether\\n": the high bit and the newline catch 7-bit and text-mode mangling."""

HEADER = struct.Struct(">QII")
RECORD = struct.Struct(">HHIQ")
END_MARKER = bytes(RECORD.size)

FLAG_OPTIONAL = 0x0001
"""A target that does not know this stage may skip it (section 4.2)."""
KNOWN_FLAGS = FLAG_OPTIONAL

MAX_STAGE_ID = 0xFFFF
DEFAULT_MAX_SIZE = 2 << 30

T = TypeVar("T")

Buffer = bytes | bytearray | memoryview

Undo = Callable[[], None]


class Codec(Protocol[T]):
    """How one stage's value becomes payload bytes and back.

    `decode` must validate everything it reads and raise MigrationError (EINVAL
    for a malformed payload) with `offset` relative to the start of the payload.
    """

    def encode(self, value: T) -> Sequence[Buffer]: ...

    def decode(self, payload: memoryview) -> T: ...


class Delimiter(Protocol):
    """Finds where an unframed payload ends, from its first bytes, incrementally."""

    def need(self, prefix: memoryview) -> int:
        """The payload's whole length if prefix shows it (a value <= len(prefix)),
        else how many bytes must have arrived before it is worth asking again.

        Called with ever longer prefixes of the same payload; validates what
        it reads (counts, lengths) and raises MigrationError, offsets relative
        to the payload, so a bad length fails before its bytes are awaited."""
        ...


class DelimitedCodec(Codec[T], Protocol[T]):
    """A codec for a format without framing: its payload says its own length."""

    def delimiter(self) -> Delimiter: ...


@dataclass(frozen=True)
class Stage(Generic[T]):
    """One step of the format: its identity and what it carries (if anything)."""

    name: str
    id: int
    codec: Codec[T] | None = None
    """None: the stage carries no data (a source-side preparation, a target-side action)."""
    optional: bool = False
    """A reader may skip the record if it does not know the stage; a writer may omit it."""


@dataclass(frozen=True)
class Side(Generic[T]):
    """What a stage does to live state.  Every callable is optional.

    save:  source; returns the value to send (None: send no record).  If it
           fails it must leave no side effect of its own behind.
    undo:  source; reverses what save did, run when a later step fails.
    apply: target; makes a validated value live; returns how to reverse that.
    """

    save: Callable[[], T | None] | None = None
    undo: Undo | None = None
    apply: Callable[[T | None], Undo | None] | None = None


@dataclass(frozen=True)
class Format:
    """Every stream version this release can read, and which one it writes."""

    versions: Mapping[int, Sequence[Stage[Any]]]
    current: int
    """The version this release writes."""
    compat: int
    """The oldest version able to read what this release writes."""
    magic: int = MAGIC
    """What the header starts with: a reader picks the format by it."""
    framed: bool = True
    """Records with id, crc and length, and an end marker (tether's own streams).
    False: stage payloads follow each other bare and the stream ends at EOF, as
    in passt's; every codec is then a `DelimitedCodec`, whose bytes say where
    its payload ends (migrate/unframed.py reads such streams)."""
    name: str = "tether"

    def __post_init__(self) -> None:
        if self.current not in self.versions:
            raise ValueError(f"current version {self.current} is not in the table")
        if not 1 <= self.compat <= self.current:
            raise ValueError(f"compat version {self.compat} outside [1, {self.current}]")
        for version, stages in self.versions.items():
            if not 1 <= version <= 0xFFFFFFFF:
                raise ValueError(f"version {version} does not fit the header")
            ids = [stage.id for stage in stages]
            names = [stage.name for stage in stages]
            if len(set(ids)) != len(ids) or len(set(names)) != len(names):
                raise ValueError(f"version {version}: stage ids and names must be unique")
            if any(not 1 <= i <= MAX_STAGE_ID for i in ids):
                raise ValueError(f"version {version}: stage ids must be in [1, {MAX_STAGE_ID}]")
            if not self.framed:
                for stage in stages:
                    if stage.codec is not None and not hasattr(stage.codec, "delimiter"):
                        raise ValueError(f"version {version}: stage {stage.name!r} needs a "
                                         "delimiting codec in an unframed format")

    def choose(self, version: int, compat: int) -> int | None:
        """The newest version we know in [compat, version], if any (section 3.1)."""
        usable = [v for v in self.versions if compat <= v <= version]
        return max(usable) if usable else None


class Bindings:
    """Which Side runs for which Stage of one Format: keyed by the Stage objects
    themselves, never by their names.

    A stage that `bind` does not find in the format is refused at once
    (ValueError): a misspelt stage would otherwise be skipped in silence, and a
    skipped "freeze" or "flows" stage loses every connection it should move.
    `bind` types a stage's callables by its `Stage[T]`, so mypy checks them too.
    """

    def __init__(self, fmt: Format) -> None:
        self.format = fmt
        self._known = {stage for stages in fmt.versions.values() for stage in stages}
        self._sides: dict[Stage[Any], Side[Any]] = {}

    def bind(self, stage: Stage[T], *, save: Callable[[], T | None] | None = None,
             undo: Undo | None = None,
             apply: Callable[[T | None], Undo | None] | None = None) -> Bindings:
        """Run these for `stage` (see Side); returns self, so bindings chain."""
        if stage not in self._known:
            raise ValueError(f"stage {stage.name!r} (id {stage.id}) is not in the "
                             f"{self.format.name} format")
        if stage in self._sides:
            raise ValueError(f"stage {stage.name!r} is bound twice")
        self._sides[stage] = Side(save, undo, apply)
        return self

    def side(self, stage: Stage[T]) -> Side[T] | None:
        return cast("Side[T] | None", self._sides.get(stage))

    def __contains__(self, stage: object) -> bool:
        return stage in self._sides


def _bound_for(fmt: Format, bindings: Bindings) -> Bindings:
    if bindings.format is not fmt:
        raise ValueError(f"bindings made for the {bindings.format.name} format, "
                         f"used with the {fmt.name} format")
    return bindings


# -- source ----------------------------------------------------------------------


@dataclass
class Saved:
    """A source's encoded stream, and how to put the source back as it was."""

    chunks: list[Buffer]
    undos: list[Undo] = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(memoryview(chunk).nbytes for chunk in self.chunks)

    def to_bytes(self) -> bytes:
        return b"".join(bytes(chunk) for chunk in self.chunks)

    def rollback(self) -> None:
        """Undo every source stage, last first.  Safe to call once only."""
        undos, self.undos = self.undos, []
        run_undos(undos)


def run_undos(undos: list[Undo]) -> None:
    """Run undos in reverse order; one failing does not stop the others."""
    failure: BaseException | None = None
    for undo in reversed(undos):
        try:
            undo()
        except Exception as exc:  # keep undoing; report the first failure
            failure = failure or exc
    if failure is not None:
        raise MigrationError(errno.EIO, f"undo failed: {failure}") from failure


def save(fmt: Format, sides: Bindings) -> Saved:
    """Run every source side of the current version in order and frame the output.

    On failure, the stages already run are undone (last first) and the error
    is raised as a MigrationError naming the stage.
    """
    _bound_for(fmt, sides)
    stages = fmt.versions[fmt.current]
    saved = Saved([HEADER.pack(fmt.magic, fmt.current, fmt.compat)])
    offset = HEADER.size
    for stage in stages:
        side = sides.side(stage) or Side()
        try:
            value = side.save() if side.save is not None else None
        except Exception as exc:
            saved.rollback()
            raise _as_migration_error(exc, "source side failed").located(stage.name, offset) \
                from exc
        if side.undo is not None:
            saved.undos.append(side.undo)
        if stage.codec is None or value is None:
            if stage.codec is not None and not stage.optional:
                saved.rollback()
                raise MigrationError(errno.EINVAL, "mandatory stage produced no data",
                                     stage=stage.name, offset=offset)
            continue
        try:
            payload = stage.codec.encode(value)
        except Exception as exc:
            saved.rollback()
            raise _as_migration_error(exc, "encoding failed").located(stage.name, offset) \
                from exc
        length = 0
        crc = 0
        for chunk in payload:
            view = memoryview(chunk)
            length += view.nbytes
            crc = zlib.crc32(view, crc)
        if fmt.framed:
            flags = FLAG_OPTIONAL if stage.optional else 0
            saved.chunks.append(RECORD.pack(stage.id, flags, crc, length))
            offset += RECORD.size
        saved.chunks.extend(payload)
        offset += length
    if fmt.framed:
        saved.chunks.append(END_MARKER)
    return saved


def _as_migration_error(exc: Exception, what: str) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    if isinstance(exc, OSError) and exc.errno:
        return MigrationError(exc.errno, f"{what}: {exc.strerror or exc}")
    return MigrationError(errno.EIO, f"{what}: {type(exc).__name__}: {exc}")


# -- target: parse and validate (phase 1) ------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record as found in a stream."""

    offset: int
    """Where its 16-byte record header starts."""
    id: int
    flags: int
    length: int
    stage: Stage[Any] | None
    """None: unknown to this reader and marked optional, so skipped."""
    value: Any


@dataclass(frozen=True)
class Loaded:
    """A whole stream, validated, not yet applied."""

    version: int
    """The version the source wrote."""
    compat: int
    chosen: int
    """The version this reader read it as."""
    records: tuple[Record, ...]
    size: int

    def value(self, stage: Stage[T]) -> T:
        """The decoded value of `stage`'s record; KeyError if the stream has none."""
        for record in self.records:
            if record.stage == stage:
                return cast(T, record.value)
        raise KeyError(stage.name)


def check_header(fmt: Format, magic: int, version: int, compat: int) -> int:
    """The version to read a stream of fmt as (section 3.1), or MigrationError."""
    if magic != fmt.magic:
        raise MigrationError(errno.EINVAL,
                             f"expected magic {fmt.magic:#018x}, found {magic:#018x}",
                             stage="header", offset=0)
    if version == 0 or compat == 0:
        raise MigrationError(errno.EINVAL,
                             f"expected non-zero versions, found version {version} "
                             f"compat_version {compat}", stage="header", offset=8)
    if compat > version:
        raise MigrationError(errno.EINVAL,
                             f"expected compat_version <= version, found compat_version "
                             f"{compat} > version {version}", stage="header", offset=12)
    chosen = fmt.choose(version, compat)
    if chosen is None:
        known = ", ".join(str(v) for v in sorted(fmt.versions))
        raise MigrationError(errno.ENOTSUP,
                             f"{fmt.name} stream needs a reader of a version in [{compat}, "
                             f"{version}], this reader knows {known}", stage="header",
                             offset=8)
    return chosen


class ParserProgress:
    """What a sans-IO reader tells while it reads: shared by the framed and
    unframed readers (unframed.py)."""

    _offset: int
    _state: str
    _version: int
    _compat: int
    _chosen: int
    _records: list[Record]

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def done(self) -> bool:
        return self._state == "done"

    @property
    def header(self) -> tuple[int, int, int] | None:
        """(version, compat_version, chosen version) once a valid header was read."""
        return (self._version, self._compat, self._chosen) if self._chosen else None

    @property
    def records(self) -> tuple[Record, ...]:
        """The complete, valid records read so far."""
        return tuple(self._records)


class StreamParser(ParserProgress):
    """Sans-IO reader: feed() bytes as they arrive, finish() at end of file.

    Everything is validated as soon as its bytes are in: a bad header fails
    after 16 bytes, an oversized record before its payload is buffered.
    Nothing here touches live state.
    """

    def __init__(self, fmt: Format, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._fmt = fmt
        self._max_size = max_size
        self._offset = 0
        self._item = bytearray(HEADER.size)
        self._need = HEADER.size
        self._filled = 0
        self._skipping = False  # an optional record this reader does not know: CRC only
        self._crc = 0
        self._item_start = 0
        self._state = "header"
        self._version = 0
        self._compat = 0
        self._chosen = 0
        self._stages: Sequence[Stage[Any]] = ()
        self._by_id: dict[int, tuple[int, Stage[Any]]] = {}
        self._position = -1
        self._pending: tuple[int, int, int, int] | None = None
        self._records: list[Record] = []
        self._last_name = "header"

    def feed(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            if self._state == "done":
                raise MigrationError(
                    errno.EINVAL,
                    f"expected end of stream after the end marker, found {view.nbytes} "
                    "more byte(s)", stage="end", offset=self._offset)
            take = min(self._need - self._filled, view.nbytes)
            if self._state != "payload":
                self._item[self._filled:self._filled + take] = view[:take]
            elif self._skipping:
                self._crc = zlib.crc32(view[:take], self._crc)
            else:
                # A payload buffer grows with the bytes that came, never with
                # what the record header declares: a 32-byte stream claiming a
                # 2 GiB record costs 32 bytes.
                self._item += view[:take]
            self._filled += take
            self._offset += take
            view = view[take:]
            if self._filled == self._need:
                self._complete_item()

    def finish(self) -> Loaded:
        if self._state != "done":
            raise MigrationError(
                errno.ENODATA,
                f"stream ends inside the {self._what_is_open()}: expected "
                f"{self._need - self._filled} more byte(s)",
                stage=self._open_stage(), offset=self._offset)
        return Loaded(self._version, self._compat, self._chosen, tuple(self._records),
                      self._offset)

    # -- internals ----------------------------------------------------------

    def _what_is_open(self) -> str:
        if self._state == "payload":
            return "record payload"
        return "header" if self._state == "header" else "record header"

    def _open_stage(self) -> str:
        """The stage whose bytes were being read, as precisely as the bytes allow."""
        if self._state == "header":
            return "header"
        if self._state == "record" and self._filled < 2:
            return f"after {self._last_name}"
        record_id = self._pending[0] if self._pending else struct.unpack_from(">H", self._item)[0]
        known = self._by_id.get(record_id)
        if record_id == 0:
            return "end"
        return known[1].name if known else f"unknown stage {record_id}"

    def _expect(self, size: int, state: str) -> None:
        self._item = bytearray() if state == "payload" else bytearray(size)
        self._need = size
        self._filled = 0
        self._item_start = self._offset
        self._state = state

    def _complete_item(self) -> None:
        if self._state == "header":
            self._read_header()
        elif self._state == "record":
            self._read_record_header()
        else:
            self._read_payload()

    def _read_header(self) -> None:
        magic, version, compat = HEADER.unpack(self._item)
        chosen = check_header(self._fmt, magic, version, compat)
        self._version, self._compat, self._chosen = version, compat, chosen
        self._stages = self._fmt.versions[chosen]
        self._by_id = {stage.id: (i, stage) for i, stage in enumerate(self._stages)}
        self._expect(RECORD.size, "record")

    def _read_record_header(self) -> None:
        start = self._item_start
        record_id, flags, crc, length = RECORD.unpack(self._item)
        if record_id == 0:
            if bytes(self._item) != END_MARKER:
                raise MigrationError(errno.EINVAL,
                                     "expected an end marker of 16 zero bytes, found id 0 with "
                                     f"flags {flags:#x} crc {crc:#x} length {length}",
                                     stage="end", offset=start)
            self._check_complete(start)
            self._state = "done"
            self._item = bytearray()
            self._need = self._filled = 0
            return
        known = self._by_id.get(record_id)
        name = known[1].name if known else f"unknown stage {record_id}"
        if flags & ~KNOWN_FLAGS:
            raise MigrationError(errno.ENOTSUP,
                                 f"expected flags within {KNOWN_FLAGS:#x}, found {flags:#x}",
                                 stage=name, offset=start + 2)
        if known is None and not flags & FLAG_OPTIONAL:
            raise MigrationError(errno.ENOTSUP,
                                 f"stage id {record_id} is mandatory and unknown to version "
                                 f"{self._chosen}", stage=name, offset=start)
        if known is not None:
            position, stage = known
            if position <= self._position:
                raise MigrationError(errno.EINVAL,
                                     f"expected a stage after {self._last_name!r}, found "
                                     f"{stage.name!r} again or out of order",
                                     stage=stage.name, offset=start)
            if stage.codec is None:
                raise MigrationError(errno.EINVAL,
                                     "expected no record for a stage that carries no data, "
                                     f"found one of {length} bytes", stage=stage.name,
                                     offset=start)
        end = start + RECORD.size + length
        if end > self._max_size:
            raise MigrationError(errno.EFBIG,
                                 f"record of {length} bytes would take the stream to {end} "
                                 f"bytes, over the limit of {self._max_size}",
                                 stage=name, offset=start + 8)
        self._pending = (record_id, flags, crc, start)
        self._expect(length, "payload")
        self._skipping = known is None
        self._crc = 0
        if length == 0:
            self._read_payload()

    def _read_payload(self) -> None:
        assert self._pending is not None
        record_id, flags, crc, start = self._pending
        payload = memoryview(self._item)
        known = self._by_id.get(record_id)
        name = known[1].name if known else f"unknown stage {record_id}"
        found = self._crc if self._skipping else zlib.crc32(payload)
        if found != crc:
            raise MigrationError(errno.EBADMSG,
                                 f"expected payload crc32 {crc:#010x}, found {found:#010x}",
                                 stage=name, offset=start + 4)
        value: Any = None
        stage: Stage[Any] | None = None
        if known is not None:
            self._position, stage = known
            assert stage.codec is not None
            payload_start = start + RECORD.size
            try:
                value = stage.codec.decode(payload)
            except MigrationError as exc:
                exc.offset = payload_start + (exc.offset or 0)
                raise exc.located(stage.name, None) from None
            except (struct.error, ValueError, IndexError, UnicodeError) as exc:
                raise MigrationError(errno.EINVAL, f"malformed payload: {exc}",
                                     stage=stage.name, offset=payload_start) from exc
            self._last_name = stage.name
        self._records.append(Record(start, record_id, flags, self._need, stage, value))
        self._pending = None
        self._skipping = False
        self._expect(RECORD.size, "record")

    def _check_complete(self, end_offset: int) -> None:
        present = {record.stage.name for record in self._records if record.stage is not None}
        for stage in self._stages:
            if stage.codec is not None and not stage.optional and stage.name not in present:
                raise MigrationError(errno.EINVAL,
                                     f"expected a record for mandatory stage {stage.name!r} "
                                     "before the end marker, found none",
                                     stage=stage.name, offset=end_offset)


def parse(fmt: Format, data: Buffer, max_size: int = DEFAULT_MAX_SIZE) -> Loaded:
    """Validate a whole stream held in memory."""
    parser = StreamParser(fmt, max_size)
    parser.feed(data)
    return parser.finish()


# -- target: apply (phase 2) --------------------------------------------------------


def apply_loaded(fmt: Format, loaded: Loaded, sides: Bindings) -> None:
    """Make a validated stream live, all or nothing.

    Target sides run in table order; if one fails, those already applied are
    undone, last first, and the failure is raised naming the stage.
    """
    _bound_for(fmt, sides)
    by_stage = {r.stage: r for r in loaded.records if r.stage is not None}
    applied: list[Undo] = []
    for stage in fmt.versions[loaded.chosen]:
        side = sides.side(stage)
        if side is None or side.apply is None:
            continue
        record = by_stage.get(stage)
        if stage.codec is not None and record is None:
            continue  # an optional stage the source did not send
        try:
            undo = side.apply(record.value if record else None)
        except Exception as exc:
            try:
                run_undos(applied)
            except MigrationError as undo_error:
                raise undo_error.located(stage.name, None) from exc
            error = _as_migration_error(exc, "target side failed")
            raise error.located(stage.name, record.offset if record else loaded.size) from exc
        if undo is not None:
            applied.append(undo)
