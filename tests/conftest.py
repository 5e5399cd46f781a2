"""Suite-wide rules.

Under CI=true a skipped test is a failure: a missing prerequisite (root, netns,
QEMU, the guest image) must be loud there, never a quiet green.
"""

from __future__ import annotations

import os

import pytest

import tether.loop
from tests.support import IN_CI, ROOT_MARK, require
from tether import ratelimit

COMPILED = not tether.loop.__file__.endswith(".py")
"""Whether the compiled build (tools/compile.py) is what the suite runs."""


def pytest_report_header() -> str:
    return f"tether build: {'compiled (mypyc)' if COMPILED else 'pure Python'}"


def pytest_sessionstart(session: pytest.Session) -> None:
    """`./dev test --compiled` says which build it wants: a run that fell back
    to the pure modules must not pass for a run of the compiled ones."""
    if os.environ.get("TETHER_BUILD") == "compiled" and not COMPILED:
        raise pytest.UsageError("TETHER_BUILD=compiled, but tether.loop is "
                                f"{tether.loop.__file__}: the compiled build is missing")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A VM test runs QEMU in network namespaces it makes: it needs root too."""
    for item in items:
        if item.get_closest_marker("vm") and not item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked root runs as root (or is a loud skip); tests.support.make_netns
    refuses a test without the mark, so the marks stay true."""
    ROOT_MARK.on = item.get_closest_marker("root") is not None
    ROOT_MARK.test = item.nodeid
    if ROOT_MARK.on:
        require(os.geteuid() == 0, "needs root (network namespaces, CAP_NET_ADMIN)")


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
