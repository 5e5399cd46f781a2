"""tether.ratelimit: a burst per kind per interval, then a count of what was left out."""

from __future__ import annotations

import logging

import pytest

from tether import ratelimit

log = logging.getLogger("tether.test")


def test_a_flood_prints_a_burst_then_says_how_many_were_left_out(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="tether")
    clock = [100.0]
    monkeypatch.setattr("tether.ratelimit.time.monotonic", lambda: clock[0])
    printed = sum(ratelimit.limited(log, logging.WARNING, "bad frame %d", i)
                  for i in range(10_000))
    assert printed == ratelimit.BURST == len(caplog.records)
    clock[0] += ratelimit.INTERVAL
    assert ratelimit.limited(log, logging.WARNING, "bad frame %d", 1)
    assert caplog.records[-1].getMessage() == \
        f"bad frame 1 ({10_000 - ratelimit.BURST} more like it were left out)"
    assert caplog.records[-1].filename == "test_ratelimit.py"  # the caller's line


def test_kinds_are_counted_apart(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tether")
    for _ in range(3 * ratelimit.BURST):
        ratelimit.limited(log, logging.INFO, "queue %d started", 0, kind="started 0")
        ratelimit.limited(log, logging.INFO, "queue %d started", 1, kind="started 1")
    assert len(caplog.records) == 2 * ratelimit.BURST


def test_a_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tether")
    assert not ratelimit.limited(log, logging.DEBUG, "noise")
    assert caplog.records == []
