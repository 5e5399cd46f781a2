"""The writing end of the device-state fd, as QEMU plays it in these tests."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Sequence

from tether.migrate.stream import Buffer


def write_stream(fd: int, chunks: Sequence[Buffer], timeout: float) -> int:
    """Write every chunk to a blocking or non-blocking fd; returns the bytes written."""
    deadline = time.monotonic() + timeout
    written = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view.nbytes:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                left = deadline - time.monotonic()
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                if left <= 0 or not poller.poll(left * 1000):
                    raise TimeoutError(f"writer stuck after {written} bytes") from None
                continue
            written += n
            view = view[n:]
    return written
