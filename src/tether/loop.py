"""The one event loop: epoll for file descriptors, a heap of timers, deferred work.

Single-threaded on purpose, as in passt: every protocol handler runs to
completion on this thread, so no state needs locks.  Handlers must not block;
anything that may wait takes a deadline and comes back through a timer or an
fd event.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

FdHandler = Callable[[int], None]
"""Called with the epoll event mask that fired."""

READ: Final = select.EPOLLIN
WRITE: Final = select.EPOLLOUT
HANGUP: Final = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
EDGE: Final = select.EPOLLET  # report a file once per change, not while it stays ready


class Timer:
    """A pending call; `cancel()` is O(1) and safe to call more than once."""

    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ReadPace:
    """How many reads a level-triggered descriptor gets when it wakes the loop.

    Reading until EAGAIN costs a failed read (a system call and a raised
    BlockingIOError) on every wake-up, and request/response traffic brings
    one message per wake-up: a third of its system calls went on those, and
    UDP request/response took 28% less CPU without them.  So a descriptor
    starts at one read per wake-up, which level-triggered epoll makes safe
    (whatever is left wakes the next pass), and drains up to `batch` once it
    is readable again in the very next pass: a burst, where the failed read
    is spread over many.  A drain that finds at most one message goes back
    to one read per wake-up.
    """

    __slots__ = ("_batch", "_last_pass", "_loop", "budget")

    def __init__(self, loop: Loop, batch: int) -> None:
        self._loop = loop
        self._batch = batch
        self._last_pass = -2
        self.budget = 1

    def wake(self) -> int:
        """The reads to make now (stop early at EAGAIN); then call done()."""
        now = self._loop.passes
        if self.budget == 1 and now - self._last_pass <= 1:
            self.budget = self._batch
        self._last_pass = now
        return self.budget

    def done(self, got: int) -> None:
        """This wake-up read `got` messages."""
        if got <= 1:
            self.budget = 1


class Loop:
    """epoll, timers and deferred calls on one thread, run until stopped.

    Each pass waits for file events (no longer than the next timer), calls
    the handler of every ready descriptor, fires the timers that are due and
    then the callbacks queued with call_soon(), which therefore run after all
    the I/O of the pass (the stack's flush of frames to the guest is one).
    Handlers and callbacks run to completion and must not block.  now() is
    the monotonic clock the timers use.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, FdHandler] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._sequence = itertools.count()
        self._deferred: list[Callable[[], None]] = []
        self._running = False
        self.passes = 0  # run_once() calls so far (ReadPace tells bursts by them)

    # -- file descriptors -------------------------------------------------

    def add(self, fd: int, events: int, handler: FdHandler) -> None:
        if fd in self._handlers:
            raise ValueError(f"fd {fd} is already watched")
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, fd: int, events: int, handler: FdHandler | None = None) -> None:
        self._epoll.modify(fd, events)
        if handler is not None:
            self._handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching fd; harmless if it is not watched or already closed."""
        if self._handlers.pop(fd, None) is None:
            return
        # Closed before removal: the kernel already dropped it from the set.
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._handlers

    # -- time ---------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._sequence), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run callback at the end of the current pass, after all fd handlers."""
        self._deferred.append(callback)

    # -- running ------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self, until: Callable[[], bool] | None = None, timeout: float | None = None) -> bool:
        """Run until stop(), until() turns true, or timeout seconds pass.

        Returns True if it ended because of stop() or until(), False on timeout.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._running = True
        while self._running:
            if until is not None and until():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                self._running = False
                return False
            self.run_once(self._next_wait(deadline))
        return True

    def run_once(self, timeout: float | None = None) -> None:
        """One pass: wait for events (at most timeout s), dispatch, fire timers, deferred."""
        self.passes += 1
        if self._deferred:
            timeout = 0
        try:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            events = []
        handlers = self._handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                handler(mask)
        self._fire_timers()
        while self._deferred:
            pending, self._deferred = self._deferred, []
            for callback in pending:
                callback()

    def _fire_timers(self) -> None:
        timers = self._timers
        if not timers:
            return
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            _, _, timer = heapq.heappop(timers)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()

    def _next_wait(self, deadline: float | None) -> float | None:
        # Twice per request/response, so no list, no min(): plain comparisons.
        timers = self._timers
        while timers and timers[0][2].cancelled:
            heapq.heappop(timers)
        if timers:
            wake = timers[0][0]
            if deadline is not None and deadline < wake:
                wake = deadline
        elif deadline is not None:
            wake = deadline
        else:
            return None
        wait = wake - time.monotonic()
        return wait if wait > 0.0 else 0.0

    def close(self) -> None:
        self._handlers.clear()
        self._timers.clear()
        self._deferred.clear()
        self._epoll.close()
