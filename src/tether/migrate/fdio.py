"""Moving a migration stream through a file descriptor, with a deadline.

The fd QEMU hands over in SET_DEVICE_STATE_FD is one end of a pipe (or a
socket); the other end is drained by another process at its own pace.  So:
never assume a write or read completes in one call, never block without a
deadline, and report EOF in the middle of the stream as ENODATA.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Iterator
from typing import Protocol

from tether.migrate.errors import MigrationError
from tether.migrate.stream import Buffer, Loaded

READ_CHUNK = 1 << 18
DEFAULT_TIMEOUT = 60.0


@contextlib.contextmanager
def _nonblocking(fd: int) -> Iterator[None]:
    """Non-blocking for the duration, so that a deadline can always be kept."""
    was_blocking = os.get_blocking(fd)
    if was_blocking:
        os.set_blocking(fd, False)
    try:
        yield
    finally:
        if was_blocking:
            with contextlib.suppress(OSError):  # the fd went away: nothing to restore
                os.set_blocking(fd, True)


def _wait(fd: int, events: int, deadline: float, what: str, offset: int) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MigrationError(errno.ETIMEDOUT, f"timed out waiting to {what}", offset=offset)
    poller = select.poll()
    poller.register(fd, events)
    if not poller.poll(remaining * 1000):
        raise MigrationError(errno.ETIMEDOUT, f"timed out waiting to {what}", offset=offset)


class Parser(Protocol):
    """What read_stream feeds: stream.StreamParser, unframed.FormatReader."""

    @property
    def offset(self) -> int: ...

    def feed(self, data: Buffer) -> None: ...

    def finish(self) -> Loaded: ...


def read_stream(fd: int, parser: Parser, timeout: float = DEFAULT_TIMEOUT) -> Loaded:
    """Read to end of file, validating as the bytes arrive."""
    deadline = time.monotonic() + timeout
    buffer = bytearray(READ_CHUNK)
    view = memoryview(buffer)
    with _nonblocking(fd):
        while True:
            try:
                n = os.readv(fd, [buffer])
            except BlockingIOError:
                _wait(fd, select.POLLIN, deadline, "read the device state", parser.offset)
                continue
            except OSError as exc:
                raise MigrationError(exc.errno or errno.EIO,
                                     f"reading the device state failed: {exc.strerror}",
                                     offset=parser.offset) from exc
            if n == 0:
                return parser.finish()
            parser.feed(view[:n])
