"""Suite-wide rules.

Under CI=true a skipped test is a failure: a missing prerequisite (root, netns,
QEMU, the guest image) must be loud there, never a quiet green.
"""

from __future__ import annotations

import os

import pytest

from tether import ratelimit

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.fixture(autouse=True)
def _fresh_log_limits() -> None:
    """Each test sees the first line of every rate-limited kind (tether.ratelimit)."""
    ratelimit.reset()
