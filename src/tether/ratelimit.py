"""Rate-limited logging for anything a guest or a front-end can trigger.

A guest that sends one bad frame per microsecond must not turn tether's log
into its own disk-filling pipe, so every such line goes through `limited()`:
per (logger, kind) at most one line per `INTERVAL`; the first line of an
interval says how many were suppressed since the last one it printed.

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
"""Seconds between two lines of one kind."""

_last: dict[tuple[str, str], float] = {}
_suppressed: dict[tuple[str, str], int] = {}


def limited(logger: logging.Logger, level: int, msg: str, *args: object,
            kind: str | None = None, exc_info: bool = False) -> bool:
    """Log `msg % args` unless a line of this kind went out less than INTERVAL ago.

    Returns whether the line was printed.  Arguments are only formatted when
    it is, so a suppressed line costs a dictionary lookup.
    """
    if not logger.isEnabledFor(level):
        return False
    key = (logger.name, kind or msg)
    now = time.monotonic()
    last = _last.get(key)
    if last is not None and now - last < INTERVAL:
        _suppressed[key] = _suppressed.get(key, 0) + 1
        return False
    _last[key] = now
    skipped = _suppressed.pop(key, 0)
    if skipped:
        logger.log(level, msg + " (and %d more like it in %.0f s)", *args, skipped,
                   now - (last or now), exc_info=exc_info, stacklevel=2)
    else:
        logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)
    return True


def reset() -> None:
    """Forget every kind (tests that count lines start from a clean table)."""
    _last.clear()
    _suppressed.clear()
