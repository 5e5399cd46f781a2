"""Fixtures for the stack's end-to-end tests: a network namespace is the guest.

The guest's kernel (its ARP, DHCP client, TCP stack) runs inside a namespace
each test creates; tether runs in the initial namespace, as a user would run
it, with its tap device inside the test's namespace.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import Netns as BaseNetns
from tests.support import make_netns as make_base_netns
from tests.support import require, stop_process, wait_for

GUEST = "10.77.0.2"
GATEWAY = "10.77.0.1"
GUEST6 = "fd00:77::2"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"  # tether's link-local address, from its MAC
HERE = Path(__file__).parent
GUEST_TOOL = str(HERE / "guest_tool.py")
_counter = itertools.count()


class Netns(BaseNetns):
    """The suite's Netns, as a guest of the stack: plus the guest-side tool."""

    def guest_tool(self, *args: str, timeout: float = 120) -> str:
        done = self.run(sys.executable, GUEST_TOOL, *args, timeout=timeout, check=False)
        assert done.returncode == 0, f"guest_tool {args}: {done.stdout}{done.stderr}"
        return done.stdout


def make_netns(prefix: str = "tnet") -> Netns:
    """A fresh namespace (lo up) for a test marked root; delete_netns removes it."""
    require(os.path.exists("/dev/net/tun"), "needs /dev/net/tun")
    return Netns(make_base_netns(prefix).name)


def delete_netns(ns: Netns) -> None:
    ns.delete()


class Tether:
    """A tether process serving one namespace."""

    def __init__(self, ns: Netns, args: list[str], tmp: Path, host_ns: Netns | None = None,
                 ) -> None:
        self.ns = ns
        self.log = tmp / f"tether-{ns.name}.log"
        argv = [sys.executable, "-m", "tether.cli", "-f", "-l", str(self.log),
                "--netns", ns.name, *args]
        if host_ns is not None:
            argv = host_ns.cmd(*argv)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        wait_for(self._ready, 10, "tether to start")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"tether exited {self.proc.returncode}: "
                                 f"{self.proc.stderr.read() if self.proc.stderr else ''}"
                                 f"{self.log_text()}")
        return "running" in self.log_text()

    def log_text(self) -> str:
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop tether; any internal error it logged fails the test that ran it."""
        stop_process(self.proc)
        text = self.log_text()
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]


def configure_guest(ns: Netns, mtu: int | None = None) -> None:
    """What a DHCP client would do, statically (the DHCP test checks the real client)."""
    ns.run("ip", "addr", "add", f"{GUEST}/24", "dev", "tap0")
    if mtu is not None:
        ns.run("ip", "link", "set", "tap0", "mtu", str(mtu))
    ns.run("ip", "route", "add", "default", "via", GATEWAY)
    # The address tether's DHCPv6 hands out (busybox has no DHCPv6 client).
    ns.run("ip", "-6", "addr", "add", f"{GUEST6}/64", "dev", "tap0", "nodad")


class Recorder:
    """A FrameSink that keeps what the stack sends (the stack is what is under test)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        self.frames.append(bytes(frame))
        return True

    def has_room(self) -> bool:
        return True

    def flush(self) -> None:
        pass


TETHER_ARGS = ["-a", GUEST, "-n", "24", "-g", GATEWAY, "-D", GATEWAY, "-a", GUEST6,
               "-D", "fd00:77::53"]


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = make_netns()
    yield ns
    delete_netns(ns)


@pytest.fixture
def start_tether(tmp_path: Path) -> Iterator[Callable[..., Tether]]:
    started: list[Tether] = []
    namespaces: list[Netns] = []

    def start(*extra: str, configure: bool = True, mtu: int | None = None,
              host_ns: Netns | None = None) -> Tether:
        ns = make_netns()
        namespaces.append(ns)
        t = Tether(ns, [*TETHER_ARGS, *extra], tmp_path, host_ns)
        started.append(t)
        if configure:
            configure_guest(ns, mtu)
        return t

    yield start
    for t in started:
        t.stop()
    for ns in namespaces:
        delete_netns(ns)
