"""Fixtures for tests that boot a real guest under QEMU 10.

A missing prerequisite skips these tests on a developer's machine and fails
them under CI=true: CI must never pass by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .guest import GuestImage, ensure_guest
from .harness import qemu_missing_reason


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"VM test prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    reason = qemu_missing_reason()
    if reason:
        _unavailable(reason)
    try:
        return ensure_guest()
    except Exception as e:  # apt-get or dpkg-deb failed: say exactly what
        _unavailable(f"cannot build the test guest: {e}")
        raise


@pytest.fixture
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Short paths: UNIX socket paths are limited to 108 bytes.
    path = tmp_path_factory.mktemp("vm", numbered=True)
    yield path
