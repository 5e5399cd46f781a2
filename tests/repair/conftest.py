"""Fixtures for the repair tests: root, network namespaces, the real helper."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Netns, make_netns, readable, require, require_root
from tether.repair.client import RepairHelper

HERE = Path(__file__).resolve().parent
AGENT = HERE / "agent.py"
HELPER = [sys.executable, "-m", "tether.repair.helper"]
_counter = itertools.count()


@pytest.fixture
def root() -> None:
    require_root("network namespaces, CAP_NET_ADMIN")
    require(shutil.which("ip") is not None, "needs iproute2's ip")


@pytest.fixture
def netns(root: None) -> Iterator[Callable[[], Netns]]:
    """Factory of fresh, uniquely named namespaces (lo up), removed afterwards."""
    made: list[Netns] = []

    def make() -> Netns:
        ns = make_netns("trp")
        made.append(ns)
        return ns

    yield make
    for ns in made:
        ns.delete()


class Proc:
    """A child speaking one JSON object per line on stdout."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.p = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.p.stdout is not None
        if not readable(self.p.stdout, timeout):
            raise AssertionError(f"{self.argv}: no answer in {timeout} s")
        line = self.p.stdout.readline()
        if not line:
            raise AssertionError(f"{self.argv} died: {self.stderr()}")
        obj: dict[str, Any] = json.loads(line)
        if "fatal" in obj:
            raise AssertionError(f"{self.argv}: {obj['fatal']}\n{self.stderr()}")
        return obj

    def ask(self, line: str, timeout: float = 30.0) -> dict[str, Any]:
        self.send(line)
        return self.read(timeout)

    def stderr(self) -> str:
        if self.p.poll() is None:
            return "(still running)"
        assert self.p.stderr is not None
        return self.p.stderr.read()

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)
        for f in (self.p.stdin, self.p.stdout, self.p.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def procs() -> Iterator[Callable[[list[str]], Proc]]:
    started: list[Proc] = []

    def start(argv: list[str]) -> Proc:
        proc = Proc(argv)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def agent(ns: Netns, *args: str) -> list[str]:
    return ns.argv(sys.executable, str(AGENT), *args)


def start_helper(path: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*HELPER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def inside(ns: Netns) -> Iterator[None]:
    """Run this thread in ns; sockets made meanwhile stay in ns."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
    try:
        if libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            if libc.setns(own, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def tcp_pairs(
    count: int, family: int = socket.AF_INET
) -> list[tuple[socket.socket, socket.socket]]:
    """count connected (ours, peer) pairs over loopback."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen(count)
        pairs = []
        for _ in range(count):
            ours = socket.socket(family, socket.SOCK_STREAM)
            ours.connect(lst.getsockname()[:2])
            peer, _ = lst.accept()
            pairs.append((ours, peer))
    return pairs


@pytest.fixture
def many_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture
def ns(netns: Callable[[], Netns]) -> Iterator[Netns]:
    space = netns()
    with inside(space):
        yield space


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[RepairHelper]:
    h = RepairHelper(str(tmp_path / "be.repair"), reply_timeout=2.0)
    yield h
    h.close()


@pytest.fixture
def real_helper(backend: RepairHelper) -> Iterator[subprocess.Popen[str]]:
    proc = start_helper(backend.path)
    backend.wait(10)
    yield proc
    backend.disconnect()
    try:
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def recv_exactly(sock: socket.socket, length: int, timeout: float = 10.0) -> bytes:
    """Read exactly length bytes, or fail after timeout (EOF: what came)."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < length:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(out)} of {length} bytes in {timeout} s")
        sock.settimeout(left)
        chunk = sock.recv(length - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)
