"""Reading streams without framing (`Format.framed` False), and telling formats apart.

A stream of such a format is the same 16-byte header as tether's (magic u64,
version u32, compat_version u32, big-endian), then each stage's payload in
table order with nothing between them, then end of file: passt's device
state is built this way (reference/passt-migration.md section 1).  Nothing
marks where a payload ends, so each stage's codec delimits its own payload
from its first bytes (`DelimitedCodec.delimiter`), and every count and
length is checked against its bound the moment it is read, before the
bytes it announces are awaited: a lie costs what was sent, never what was
claimed.  The reader holds no more than the bytes that arrived.

`FormatReader` takes the formats a target accepts and picks one by the
magic, so a tether target reads a tether or a passt source alike.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from tether.migrate.errors import MigrationError
from tether.migrate.stream import (
    DEFAULT_MAX_SIZE,
    HEADER,
    Buffer,
    Delimiter,
    Format,
    Loaded,
    ParserProgress,
    Record,
    Stage,
    StreamParser,
    check_header,
)


class UnframedParser(ParserProgress):
    """Sans-IO reader of an unframed format: feed() bytes, finish() at EOF.

    The same interface and the same errors as stream.StreamParser.
    """

    def __init__(self, fmt: Format, max_size: int = DEFAULT_MAX_SIZE) -> None:
        if fmt.framed:
            raise ValueError(f"format {fmt.name} is framed: use StreamParser")
        self._fmt = fmt
        self._max_size = max_size
        self._offset = 0
        self._buffer = bytearray()
        self._state = "header"
        self._version = self._compat = self._chosen = 0
        self._stages: list[Stage[Any]] = []
        self._position = 0
        self._start = 0
        self._delimiter: Delimiter | None = None
        self._need = HEADER.size
        self._records: list[Record] = []

    def feed(self, data: Buffer) -> None:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return
        if self._state == "done":
            raise MigrationError(errno.EINVAL, f"expected end of stream after the last "
                                 f"stage, found {view.nbytes} more byte(s)",
                                 stage="end", offset=self._offset)
        # Take only what the current item may still need, so trailing garbage
        # is reported at its own offset and never buffered.
        while view.nbytes and self._state != "done":
            take = min(view.nbytes, max(self._need - len(self._buffer), 0) or view.nbytes)
            self._buffer += view[:take]
            self._offset += take
            view = view[take:]
            while self._state != "done" and len(self._buffer) >= self._need:
                self._advance()
        if view.nbytes:
            raise MigrationError(errno.EINVAL, f"expected end of stream after the last "
                                 f"stage, found {view.nbytes} more byte(s)",
                                 stage="end", offset=self._offset)

    def finish(self) -> Loaded:
        if self._state != "done":
            what = "header" if self._state == "header" else self._stages[self._position].name
            raise MigrationError(errno.ENODATA, f"stream ends inside the {what}: expected "
                                 f"{self._need - len(self._buffer)} more byte(s) at least",
                                 stage=what, offset=self._offset)
        return Loaded(self._version, self._compat, self._chosen, tuple(self._records),
                      self._offset)

    # -- internals ------------------------------------------------------------

    def _advance(self) -> None:
        if self._state == "header":
            self._read_header()
            return
        stage = self._stages[self._position]
        assert self._delimiter is not None
        try:
            need = self._delimiter.need(memoryview(self._buffer))
        except MigrationError as exc:
            exc.offset = self._start + (exc.offset or 0)
            raise exc.located(stage.name, None) from None
        if self._start + need > self._max_size:
            raise MigrationError(errno.EFBIG, f"a payload of at least {need} bytes would take "
                                 f"the stream to {self._start + need} bytes, over the limit "
                                 f"of {self._max_size}", stage=stage.name, offset=self._start)
        if need > len(self._buffer):
            self._need = need
            return
        self._complete(stage, need)

    def _read_header(self) -> None:
        magic, version, compat = HEADER.unpack_from(self._buffer)
        chosen = check_header(self._fmt, magic, version, compat)
        self._version, self._compat, self._chosen = version, compat, chosen
        self._stages = [s for s in self._fmt.versions[chosen] if s.codec is not None]
        del self._buffer[:HEADER.size]
        self._position = 0
        self._next_stage(HEADER.size)

    def _next_stage(self, start: int) -> None:
        self._start = start
        if self._position == len(self._stages):
            self._state = "done"
            self._need = 0
            return
        codec = self._stages[self._position].codec
        delimiter = getattr(codec, "delimiter", None)
        if delimiter is None:
            raise TypeError(f"{self._fmt.name}: stage {self._stages[self._position].name!r} "
                            "has no delimiter, so an unframed stream cannot carry it")
        self._delimiter = delimiter()
        self._state = "payload"
        self._need = 1  # ask the delimiter as soon as anything is there

    def _complete(self, stage: Stage[Any], length: int) -> None:
        payload = memoryview(self._buffer)[:length]
        assert stage.codec is not None
        try:
            value = stage.codec.decode(payload)
        except MigrationError as exc:
            exc.offset = self._start + (exc.offset or 0)
            raise exc.located(stage.name, None) from None
        finally:
            payload.release()
        self._records.append(Record(self._start, stage.id, 0, length, stage, value))
        del self._buffer[:length]
        self._position += 1
        self._next_stage(self._start + length)


class FormatReader:
    """A target's reader for every format it accepts, chosen by the stream's magic."""

    def __init__(self, formats: Sequence[Format], max_size: int = DEFAULT_MAX_SIZE) -> None:
        magics = [f.magic for f in formats]
        if not formats or len(set(magics)) != len(magics):
            raise ValueError("formats must be given, each with its own magic")
        self._formats = tuple(formats)
        self._max_size = max_size
        self._head = bytearray()
        self._parser: StreamParser | UnframedParser | None = None
        self.format: Format | None = None

    @property
    def offset(self) -> int:
        return self._parser.offset if self._parser is not None else len(self._head)

    @property
    def done(self) -> bool:
        return self._parser is not None and self._parser.done

    @property
    def header(self) -> tuple[int, int, int] | None:
        return self._parser.header if self._parser is not None else None

    @property
    def records(self) -> tuple[Record, ...]:
        return self._parser.records if self._parser is not None else ()

    def feed(self, data: Buffer) -> None:
        if self._parser is not None:
            self._parser.feed(data)
            return
        view = memoryview(data).cast("B")
        take = min(8 - len(self._head), view.nbytes)
        self._head += view[:take]
        if len(self._head) < 8:
            return
        magic = int.from_bytes(self._head, "big")
        for fmt in self._formats:
            if fmt.magic == magic:
                break
        else:
            known = ", ".join(f"{f.name} {f.magic:#018x}" for f in self._formats)
            raise MigrationError(errno.EINVAL, f"expected the magic of a known format "
                                 f"({known}), found {magic:#018x}", stage="header", offset=0)
        self.format = fmt
        self._parser = (StreamParser(fmt, self._max_size) if fmt.framed
                        else UnframedParser(fmt, self._max_size))
        self._parser.feed(self._head)
        self._parser.feed(view[take:])

    def finish(self) -> Loaded:
        if self._parser is None:
            raise MigrationError(errno.ENODATA, f"stream ends inside the header: expected "
                                 f"{16 - len(self._head)} more byte(s)", stage="header",
                                 offset=len(self._head))
        return self._parser.finish()
