"""What every part of the suite shares: prerequisites, bounded waits, namespaces.

- `require(condition, why)`: the one rule for a missing prerequisite.  Outside
  CI the test is skipped; under CI=true it fails, saying why (tests/conftest.py
  also turns any other skip into a failure there).
- `wait_for(condition, timeout, what)`: poll a real condition with a deadline;
  the only way a test waits for something to happen.
- `Netns`: a network namespace the test made, and commands run inside it.
  Tests that make one need root: mark them `@pytest.mark.root` (or the module
  with `pytestmark`); `make_netns` refuses to run in a test without the mark,
  so `pytest -m "not root"` is the suite an unprivileged user can run.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
_counter = itertools.count()


class HasFileno(Protocol):
    def fileno(self) -> int: ...


def require(condition: bool, why: str) -> None:
    """Skip outside CI; under CI=true a missing prerequisite fails, said out loud."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {why}")
    pytest.skip(why)


def wait_for(condition: Callable[[], object], timeout: float, what: str,
             interval: float = 0.01) -> None:
    """Poll `condition` until it is true, or fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)  # the pace of polling a condition, not a synchronisation


def readable(fd: int | HasFileno, timeout: float) -> bool:
    """Whether fd has something to read within timeout seconds.

    poll, not select: the suite runs with a raised descriptor limit, and
    select() refuses any descriptor from 1024 up.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def require_root(why: str = "network namespaces") -> None:
    """For fixtures that need root: the test must be marked root, and be root.
    Outside pytest (bench/, demo/ use the same labs) only the second holds."""
    if not ROOT_MARK.test:
        if os.geteuid() != 0:
            raise PermissionError(f"needs root ({why})")
        return
    if not ROOT_MARK.on:
        raise AssertionError(f"{ROOT_MARK.test} needs root ({why}): mark it @pytest.mark.root")
    require(os.geteuid() == 0, f"needs root ({why})")


class _RootMark:
    """Whether the test being set up carries the root marker (tests/conftest.py
    sets it before any of the test's fixtures run)."""

    on = False
    test = ""


ROOT_MARK = _RootMark()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10,
                 signum: int = signal.SIGTERM) -> int | None:
    """Ask a child to end (signum), kill it if it has not within timeout s; its status."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def sh(*argv: str) -> str:
    """Run a command; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


class Netns:
    """A network namespace, by name (iproute2's /run/netns/NAME)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cmd(self, *argv: str) -> list[str]:
        """argv, to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    argv = cmd

    def run(self, *argv: str, timeout: float = 60, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cmd(*argv), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd(*argv), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def ip(self, *args: str) -> str:
        """`ip -n NAME ARGS...`: its stdout, or RuntimeError."""
        return sh("ip", "-n", self.name, *args)

    def tcp_counter(self, name: str) -> int:
        """A counter from the Tcp: lines of the namespace's /proc/net/snmp."""
        snmp = sh(*self.cmd("cat", "/proc/net/snmp")).splitlines()
        heads = [line.split() for line in snmp if line.startswith("Tcp:")]
        return int(heads[1][heads[0].index(name)])

    def tcp_out_rsts(self) -> int:
        return self.tcp_counter("OutRsts")

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def make_netns(prefix: str = "tns") -> Netns:
    """A fresh, uniquely named namespace with lo up; the caller deletes it."""
    require_root()
    require(shutil.which("ip") is not None, "needs iproute2 (ip)")
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    sh("ip", "netns", "add", name)
    ns = Netns(name)
    ns.ip("link", "set", "lo", "up")
    return ns
