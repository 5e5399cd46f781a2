"""tether started the way libvirt starts passt: real processes, real sockets.

libvirt runs the back-end, waits for that command to return, reads the pid file
and lets QEMU connect; on `virsh destroy` it relies on --one-off for the
back-end to go away.  Each test runs tether inside its own network namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net.conftest import Netns, delete_netns, make_netns
from tests.support import require, wait_for
from tether.cli import _OneOff
from tether.handover.device_state import Handover
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack

SRC = str(Path(__file__).parents[2] / "src")
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by any user, unlike a root-only venv
BASE = ["-a", "10.0.2.15/24", "-D", "10.0.2.3"]


@pytest.fixture
def ns() -> Iterator[Netns]:
    n = make_netns("tdmn")
    yield n
    delete_netns(n)


@pytest.fixture
def rundir() -> Iterator[Path]:
    # World-writable and reachable: tether started as root runs as nobody before it
    # creates its socket, as passt does.
    d = Path(tempfile.mkdtemp(prefix="tether-daemon-", dir="/tmp"))
    d.chmod(0o1777)
    yield d
    # A test that failed half-way leaves its daemon: end it by the pid it wrote.
    for pid_file in d.glob("*pid"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    shutil.rmtree(d, ignore_errors=True)


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _gone(pid: int) -> bool:
    try:
        return _status(pid).get("State", "").startswith("Z")
    except FileNotFoundError:
        return True


def _listening(pid: int, path: Path) -> bool:
    # /proc/net is per network namespace: read it as tether sees it.
    with open(f"/proc/{pid}/net/unix") as f:
        return any(line.split()[-1] == str(path) and line.split()[5] == "01"
                   for line in f if len(line.split()) >= 8)


def _start(ns: Netns, *argv: str, python: str = sys.executable,
           prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(ns.cmd(*prefix, python, "-m", "tether.cli", *argv),
                          capture_output=True, text=True, timeout=60, check=False, env=env)


def _pid(pid_file: Path) -> int:
    return int(pid_file.read_text())


@pytest.mark.parametrize("vhost_user", [False, True], ids=["stream", "vhost-user"])
@pytest.mark.root
def test_start_returns_listening_and_one_off_exits_with_qemu(
        ns: Netns, rundir: Path, vhost_user: bool) -> None:
    sock, pid_file = rundir / "net0.socket", rundir / "net0.pid"
    done = _start(ns, *(["--vhost-user"] if vhost_user else []), "--one-off",
                  "--socket", str(sock), "--pid", str(pid_file), *BASE)
    assert done.returncode == 0, done.stderr
    # What libvirt relies on once the command returned: the pid and a listening socket.
    pid = _pid(pid_file)
    assert not _gone(pid) and _listening(pid, sock)
    status = _status(pid)
    assert status["Uid"].split()[0] == "65534"  # started as root: nobody, like passt
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    files = next(line for line in limits if line.startswith("Max open files")).split()
    assert files[3] == files[4]  # soft raised to hard
    assert "NAT to host 127.0.0.1: 10.0.2.1" in done.stderr  # the start-up summary
    # QEMU connects, then goes away (virsh destroy): --one-off ends tether.
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock))
    wait_for(lambda: _gone(pid), 10, "tether to exit after its one client")
    assert not sock.exists()


@pytest.mark.root
def test_sigterm_is_a_clean_exit(ns: Netns, rundir: Path) -> None:
    sock, pid_file, log = rundir / "s", rundir / "p", rundir / "log"
    done = _start(ns, "--socket", str(sock), "--pid", str(pid_file), "-l", str(log), *BASE)
    assert done.returncode == 0, done.stderr
    pid = _pid(pid_file)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _gone(pid), 10, "tether to exit on SIGTERM")
    assert not sock.exists()
    text = log.read_text()
    assert "exiting:" in text and "Traceback" not in text


@pytest.mark.root
def test_a_failed_start_is_one_line_and_status_1(ns: Netns, rundir: Path) -> None:
    done = _start(ns, "--one-off", "--socket", str(rundir / "no" / "such" / "dir"), *BASE)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("tether: ")


@pytest.mark.root
def test_unprivileged_without_capabilities_as_libvirt_runs_it(ns: Netns, rundir: Path) -> None:
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux)")
    require(os.access(SYSTEM_PYTHON, os.X_OK), f"needs {SYSTEM_PYTHON}")
    sock, pid_file = rundir / "u.socket", rundir / "u.pid"
    drop = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all")
    done = _start(ns, "--vhost-user", "--one-off", "--socket", str(sock), "--pid",
                  str(pid_file), *BASE, python=SYSTEM_PYTHON, prefix=drop)
    assert done.returncode == 0, done.stderr
    pid = _pid(pid_file)
    assert _listening(pid, sock) and int(_status(pid)["CapEff"], 16) == 0
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock))
    wait_for(lambda: _gone(pid), 10, "tether to exit after its one client")


@pytest.mark.root
def test_fd_serves_an_inherited_socket_and_exits_when_it_closes(ns: Netns) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(ns.cmd(sys.executable, "-m", "tether.cli", "-f", "-q",
                                   "--fd", str(theirs.fileno()), *BASE),
                            pass_fds=[theirs.fileno()], env=env, stderr=subprocess.PIPE,
                            text=True)
    theirs.close()
    try:
        # An ARP request for the gateway, framed as QEMU's -netdev stream frames it.
        guest_mac = bytes.fromhex("020000000002")
        arp = (b"\xff" * 6 + guest_mac + b"\x08\x06" + bytes.fromhex("0001080006040001") +
               guest_mac + socket.inet_aton("10.0.2.15") + bytes(6) +
               socket.inet_aton("10.0.2.1"))
        ours.sendall(struct.pack("!I", len(arp)) + arp)
        ours.settimeout(20)
        (length,) = struct.unpack("!I", ours.recv(4, socket.MSG_WAITALL))
        reply = ours.recv(length, socket.MSG_WAITALL)
        assert reply[12:14] == b"\x08\x06" and reply[20:22] == b"\x00\x02"  # ARP reply
        assert reply[28:32] == socket.inet_aton("10.0.2.1")
    finally:
        ours.close()
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.root
def test_fd_serves_an_inherited_vhost_user_connection(ns: Netns) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(ns.cmd(sys.executable, "-m", "tether.cli", "-f", "-q",
                                   "--vhost-user", "--fd", str(theirs.fileno()), *BASE),
                            pass_fds=[theirs.fileno()], env=env, stderr=subprocess.PIPE,
                            text=True)
    theirs.close()
    try:
        # VHOST_USER_GET_FEATURES (1), version 1, no payload; the reply has flags 0x5.
        ours.sendall(struct.pack("<III", 1, 1, 0))
        ours.settimeout(20)
        request, flags, size = struct.unpack("<III", ours.recv(12, socket.MSG_WAITALL))
        (features,) = struct.unpack("<Q", ours.recv(size, socket.MSG_WAITALL))
        assert (request, flags, size) == (1, 0x5, 8)
        assert features & (1 << 32)  # VIRTIO_F_VERSION_1
    finally:
        ours.close()
    assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""


@pytest.mark.root
def test_version_and_capabilities_on_stdout(ns: Netns) -> None:
    done = _start(ns, "--version")
    assert done.returncode == 0 and done.stdout.startswith("tether ")
    done = _start(ns, "--print-capabilities")
    assert done.returncode == 0 and done.stdout.strip() == '{"type": "net"}'


def _handover() -> tuple[Loop, Handover]:
    loop = Loop()
    stack = Stack(loop, NetParams(addr4=socket.inet_aton("10.0.2.15"), prefix4=24,
                                  gateway4=socket.inet_aton("10.0.2.2")))
    return loop, Handover(stack, None)


def _stops(loop: Loop, handler: _OneOff) -> bool:
    loop.call_soon(handler.front_end_gone)
    return loop.run(timeout=0.5)


def test_one_off_stays_after_a_completed_migration_as_source() -> None:
    loop, handover = _handover()
    handler = _OneOff(handover, loop, one_off=True, migrate_exit=False)
    handler.save_state()
    assert not _stops(loop, handler)  # exiting would reset the migrated connections
    assert _stops(loop, handler)  # the next front-end leaving ends it


def test_one_off_exits_when_a_failed_migration_was_rolled_back() -> None:
    loop, handover = _handover()
    handler = _OneOff(handover, loop, one_off=True, migrate_exit=False)
    handler.save_state()
    handler.rings_started()  # QEMU resumed the source: the migration failed
    assert _stops(loop, handler)


def test_migrate_exit_exits_after_migrating_out_only() -> None:
    loop, handover = _handover()
    handler = _OneOff(handover, loop, one_off=False, migrate_exit=True)
    assert not _stops(loop, handler)
    handler.save_state()
    assert _stops(loop, handler)
