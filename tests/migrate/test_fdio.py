"""The stream through real file descriptors: pipes, sockets, other processes."""

from __future__ import annotations

import errno
import multiprocessing
import os
import socket

import pytest

from tests.migrate.formats import BLOB, THREE_STAGES, LiveState
from tests.migrate.writer import write_stream
from tether.migrate.errors import MigrationError
from tether.migrate.fdio import read_stream
from tether.migrate.stream import StreamParser, parse, save

BIG = 3 * 1024 * 1024 + 12345  # well past any pipe buffer


def big_stream() -> bytes:
    blob = bytes((i * 7 + i // 251) & 0xFF for i in range(BIG))
    state = LiveState(values={"alpha": 42, "blob": blob, "extra": 1})
    return save(THREE_STAGES, state.sides(THREE_STAGES)).to_bytes()


def _child_reads(fd: int, other_end: int,
                 result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.close(other_end)  # or this process would hold the pipe open and never see EOF
    try:
        loaded = read_stream(fd, StreamParser(THREE_STAGES), timeout=30)
        result.put(("ok", len(loaded.value(BLOB)), loaded.value(BLOB)[-1000:]))
    except MigrationError as exc:
        result.put(("error", exc.errno, str(exc)))


def _child_writes(fd: int, other_end: int, data: bytes, cut: int | None) -> None:
    os.close(other_end)
    write_stream(fd, [data[:cut] if cut is not None else data], timeout=30)
    os.close(fd)


@pytest.fixture
def ctx() -> multiprocessing.context.BaseContext:
    return multiprocessing.get_context("fork")


def test_large_state_to_a_reader_in_another_process(
        ctx: multiprocessing.context.BaseContext) -> None:
    data = big_stream()
    read_end, write_end = os.pipe()
    result: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    reader = ctx.Process(target=_child_reads, args=(read_end, write_end, result))  # type: ignore[attr-defined]
    reader.start()
    os.close(read_end)
    assert write_stream(write_end, [data], timeout=30) == len(data)
    os.close(write_end)
    status, size, tail = result.get(timeout=60)
    reader.join(timeout=30)
    assert status == "ok", size
    assert size == BIG
    assert tail == parse(THREE_STAGES, data).value(BLOB)[-1000:]


@pytest.mark.parametrize("blocking", [True, False])
def test_large_state_from_a_writer_in_another_process(
        ctx: multiprocessing.context.BaseContext, blocking: bool) -> None:
    data = big_stream()
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, blocking)
    writer = ctx.Process(target=_child_writes, args=(write_end, read_end, data, None))  # type: ignore[attr-defined]
    writer.start()
    os.close(write_end)
    loaded = read_stream(read_end, StreamParser(THREE_STAGES), timeout=30)
    writer.join(timeout=30)
    assert loaded.size == len(data)
    assert loaded.value(BLOB) == parse(THREE_STAGES, data).value(BLOB)
    assert os.get_blocking(read_end) == blocking  # the caller's fd is left as it was
    os.close(read_end)


def test_writer_dying_mid_stream_is_enodata(ctx: multiprocessing.context.BaseContext) -> None:
    data = big_stream()
    read_end, write_end = os.pipe()
    writer = ctx.Process(target=_child_writes, args=(write_end, read_end, data, len(data) // 2))  # type: ignore[attr-defined]
    writer.start()
    os.close(write_end)
    with pytest.raises(MigrationError) as info:
        read_stream(read_end, StreamParser(THREE_STAGES), timeout=30)
    writer.join(timeout=30)
    os.close(read_end)
    assert (info.value.errno, info.value.stage, info.value.offset) == \
        (errno.ENODATA, "blob", len(data) // 2)


def test_socketpair_works_like_a_pipe() -> None:
    data = big_stream()
    a, b = socket.socketpair()
    with a, b:
        pid = os.fork()
        if pid == 0:  # child: writes, exits without running pytest's teardown
            code = 0
            try:
                a.close()
                write_stream(b.fileno(), [data[:100], data[100:]], timeout=30)
            except BaseException:
                code = 1
            os._exit(code)
        b.close()
        loaded = read_stream(a.fileno(), StreamParser(THREE_STAGES), timeout=30)
        _, status = os.waitpid(pid, 0)
    assert status == 0
    assert loaded.size == len(data)


def test_writer_that_never_finishes_times_out_the_reader() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, big_stream()[:100])
    with pytest.raises(MigrationError) as info:
        read_stream(read_end, StreamParser(THREE_STAGES), timeout=0.3)
    assert (info.value.errno, info.value.offset) == (errno.ETIMEDOUT, 100)
    os.close(read_end)
    os.close(write_end)


def test_bad_header_fails_before_the_rest_is_read() -> None:
    """A target refuses a foreign stream at once, not after buffering all of it."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"\xb1\xbb\x1d\x1b\x0b\xb1\xd1\xb0" + bytes(8) + bytes(1000))
    with pytest.raises(MigrationError) as info:
        read_stream(read_end, StreamParser(THREE_STAGES), timeout=0.5)  # writer never closes
    assert (info.value.errno, info.value.stage) == (errno.EINVAL, "header")
    os.close(read_end)
    os.close(write_end)
