"""tether itself under a real VM: a host network namespace, tether processes,
tether-repair helpers and host-side tstream peers.

The "host" is a network namespace the test creates, set up like the lab in
shared/reference/lab-results.md: veth0 with 10.200.0.2/24 and fd00:200::2/64,
default routes via .1 and ::1, its peer a dead end.  tether copies that
configuration for the guest and maps the gateway to the namespace's loopback,
where the host-side peers listen.  Nothing outside the namespace is touched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tests.support import require_root, stop_process, wait_for

from . import pattern

HOST_ADDR = "10.200.0.2"
GATEWAY = "10.200.0.1"
HOST_ADDR6 = "fd00:200::2"
SRC = Path(__file__).resolve().parents[2] / "src"
_names = itertools.count()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def host_namespace(prefix: str = "tvm") -> Iterator[str]:
    """A namespace configured like a host whose default route is veth0."""
    require_root()
    name = f"{prefix}{os.getpid()}x{next(_names)}"
    peer = f"{name}p"[:15]
    _ip("netns", "add", name)
    try:
        _ip("link", "add", "veth0", "netns", name, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "up")
        ns = ["-n", name]
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "link", "set", "veth0", "up")
        _ip(*ns, "addr", "add", f"{HOST_ADDR}/24", "dev", "veth0")
        _ip(*ns, "addr", "add", f"{HOST_ADDR6}/64", "dev", "veth0", "nodad")
        _ip(*ns, "route", "add", "default", "via", GATEWAY)
        _ip(*ns, "-6", "route", "add", "default", "via", "fd00:200::1")
        # A new namespace forbids ping sockets ("1 0"); tether answers the
        # guest's pings through them, as any unprivileged user's ping would.
        subprocess.run(in_ns(name, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"),
                       check=True, capture_output=True, timeout=30)
        yield name
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", peer)
        _ip("netns", "del", name)


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


class Process:
    """A long-running process whose output goes to a log file."""

    def __init__(self, cmd: Sequence[str], log_path: Path, cwd: Path | None = None,
                 src: Path = SRC) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        env = dict(os.environ, PYTHONPATH=str(src))
        self.proc = subprocess.Popen(list(cmd), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> None:
        regex = re.compile(pattern)
        wait_for(lambda: len(regex.findall(self.text())) >= count or self.proc.poll() is not None,
                 timeout, f"/{pattern}/ x{count} in {self.log_path.name}:\n{self.text()[-3000:]}")
        if len(regex.findall(self.text())) < count:
            raise AssertionError(f"{self.log_path.name}: exited ({self.proc.returncode}) before "
                                 f"/{pattern}/:\n{self.text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """The process's user + system CPU time so far, from /proc/PID/stat."""
        return sum(self.cpu_split())

    def cpu_user(self) -> float:
        return self.cpu_split()[0]

    def cpu_split(self) -> tuple[float, float]:
        """The process's (user, system) CPU seconds so far, from /proc/PID/stat.

        `ip netns exec` execs the command in place, so the pid is the process's own."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def stop(self, signum: int = signal.SIGTERM) -> str:
        stop_process(self.proc, 20, signum)
        self._log.close()
        return self.text()


def _knows_runas(src: Path) -> bool:
    return "--runas" in (src / "tether" / "config.py").read_text()


class Tether(Process):
    """`tether --vhost-user --socket PATH` inside a host namespace; with
    vhost_user=False, `tether --socket PATH` for QEMU's `-netdev stream`.
    debug=False leaves out -d (benchmarks: per-event debug logging costs CPU)."""

    def __init__(self, workdir: Path, name: str, ns: str, *extra: str,
                 vhost_user: bool = True, debug: bool = True, src: Path = SRC) -> None:
        self.socket = workdir / f"{name}.sock"
        self.repair_path = Path(f"{self.socket}.repair")
        mode = ["--vhost-user"] if vhost_user else []
        # --runas root: the lab's sockets live in root's own test directories, which
        # the nobody tether would otherwise become cannot write.  A tree older than
        # --runas (a benchmark's --baseline) stays root anyway.
        runas = ["--runas", "root"] if _knows_runas(src) else []
        cmd = in_ns(ns, sys.executable, "-m", "tether.cli", *mode, "--socket",
                    str(self.socket), "-f", *runas, *(["-d"] if debug else []), *extra)
        super().__init__(cmd, workdir / f"{name}.log", src=src)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 30,
                 f"{name} socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"tether {name} exited:\n{self.text()}")


def namespace_nameservers4(ns: str) -> list[str]:
    """The IPv4 resolvers a process in the namespace sees in /etc/resolv.conf
    (what tether copies for the guest when not given --dns)."""
    out = subprocess.run(in_ns(ns, "cat", "/etc/resolv.conf"), capture_output=True,
                         text=True, check=False, timeout=30).stdout
    found = []
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and ":" not in words[1]:
            found.append(words[1])
    return found


class Helper(Process):
    """tether-repair, privileged, connected to a back-end's repair socket (tether's
    or passt's: the protocol is the same)."""

    def __init__(self, workdir: Path, name: str, backend: Tether | HasRepairPath) -> None:
        super().__init__([sys.executable, "-m", "tether.repair.helper",
                          str(backend.repair_path)], workdir / f"{name}.log")


class HasRepairPath(Protocol):
    repair_path: Path


class Peer(Process):
    """A host-side tstream inside the host namespace."""

    def __init__(self, workdir: Path, name: str, ns: str, tstream: Path, *args: str) -> None:
        super().__init__(in_ns(ns, str(tstream), *args), workdir / f"{name}.log")

    def result(self, timeout: float = 120.0) -> dict[str, str]:
        """The peer's final TSTREAM line, once it has exited."""
        self.proc.wait(timeout)
        self._log.close()
        return pattern.parse_result(self.text())


PEER_ADDR = "10.200.0.100"
HOST_MAC = "02:54:00:00:02:02"


@dataclass
class TwoHosts:
    """Two "hosts" with the same address and MAC on one bridge, and a peer.

    Only one host's bridge port forwards at a time, as when a VM's address
    moves from one node to another: `move_address()` switches it.
    """

    source: str
    target: str
    peer: str
    bridge: str

    def move_address(self) -> None:
        _ip("-n", self.bridge, "link", "set", "port-src", "down")
        _ip("-n", self.bridge, "link", "set", "port-dst", "up")


@contextlib.contextmanager
def two_hosts(prefix: str = "txh") -> Iterator[TwoHosts]:
    require_root()
    base = f"{prefix}{os.getpid()}x{next(_names)}"
    names = TwoHosts(f"{base}s", f"{base}t", f"{base}p", f"{base}b")
    created: list[str] = []
    try:
        for ns in (names.bridge, names.source, names.target, names.peer):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("-n", names.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", names.bridge, "link", "set", "br0", "up")
        for ns, port in ((names.source, "port-src"), (names.target, "port-dst"),
                         (names.peer, "port-peer")):
            _ip("link", "add", "veth0", "netns", ns, "type", "veth", "peer", "name", port,
                "netns", names.bridge)
            _ip("-n", names.bridge, "link", "set", port, "master", "br0")
            _ip("-n", ns, "link", "set", "lo", "up")
            # IPv6 autoconfiguration chatter from the waiting host would teach the
            # bridge its port early; the test is about IPv4.
            subprocess.run(in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.veth0.disable_ipv6=1",
                                 "net.ipv4.ping_group_range=0 2147483647"),
                           check=True, capture_output=True, timeout=30)
        for ns in (names.source, names.target):
            _ip("-n", ns, "link", "set", "veth0", "address", HOST_MAC)
            _ip("-n", ns, "addr", "add", f"{HOST_ADDR}/24", "dev", "veth0")
            _ip("-n", ns, "link", "set", "veth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", GATEWAY)
        _ip("-n", names.peer, "addr", "add", f"{PEER_ADDR}/24", "dev", "veth0")
        _ip("-n", names.peer, "link", "set", "veth0", "up")
        _ip("-n", names.bridge, "link", "set", "port-src", "up")
        _ip("-n", names.bridge, "link", "set", "port-peer", "up")
        # port-dst stays down: the target host has no carrier until the address moves.
        yield names
    finally:
        for ns in reversed(created):
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", ns)
