"""Rate-limited logging for anything a guest or a front-end can trigger.

A guest that sends one bad frame per microsecond must not turn tether's log
into its own disk-filling pipe, so every such line goes through `limited()`:
per (logger, kind), at most `BURST` lines in each `INTERVAL`; the first line
after lines were left out says how many.  The burst lets ordinary events
through whole (two migrations a few seconds apart each log their lines);
a flood costs at most BURST / INTERVAL lines a second per kind.

    from tether.ratelimit import limited
    limited(log, logging.WARNING, "queue %d: dropped chain: %s", q, e)

The kind is the format string unless given: a literal in the code, never
built from guest data, so the table of kinds stays small whatever the guest
does.
"""

from __future__ import annotations

import logging
import time

INTERVAL = 5.0
"""Seconds of one window."""
BURST = 10
"""Lines of one kind per window."""


class _Window:
    __slots__ = ("left_out", "printed", "start")

    def __init__(self, start: float, left_out: int) -> None:
        self.start = start
        self.printed = 0
        self.left_out = left_out  # lines of the previous window(s) not printed yet


_windows: dict[tuple[str, str], _Window] = {}


def limited(logger: logging.Logger, level: int, msg: str, *args: object,
            kind: str | None = None, exc_info: bool = False) -> bool:
    """Log `msg % args` unless BURST lines of this kind went out this INTERVAL.

    Returns whether the line was printed.  Arguments are only formatted when
    it is, so a suppressed line costs a dictionary lookup.
    """
    if not logger.isEnabledFor(level):
        return False
    key = (logger.name, kind or msg)
    now = time.monotonic()
    window = _windows.get(key)
    if window is None or now - window.start >= INTERVAL:
        window = _Window(now, window.left_out if window is not None else 0)
        _windows[key] = window
    if window.printed >= BURST:
        window.left_out += 1
        return False
    window.printed += 1
    if window.left_out:
        left_out, window.left_out = window.left_out, 0
        logger.log(level, msg + " (%d more like it were left out)", *args, left_out,
                   exc_info=exc_info, stacklevel=2)
    else:
        logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
    return True


def reset() -> None:
    """Forget every kind (tests that count lines start from a clean table)."""
    _windows.clear()
