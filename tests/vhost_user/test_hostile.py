"""Nothing a front-end or a guest sends stops the device or the daemon.

Each test is the regression test of one way a hostile front-end used to end,
wedge or bloat tether: fds of the wrong kind, fd floods, a CHECK that blocked
the loop, unbounded device state, guest memory that shrinks, log floods.
In-process tests drive the real device through the scripted front-end;
those that must see the process survive run the real daemon (daemon.py).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import mmap
import os
import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from tether import ratelimit
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user import state_transfer

from .daemon import Client, Daemon
from .frontend import BUF_BASE, Guest
from .test_device import HDR, RX, TX, Rig

DATA = Path(__file__).resolve().parents[1] / "data" / "migration"
VALID_STREAM = (DATA / "guest-addresses.valid.bin").read_bytes()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


# -- files of every kind, for every fd role ----------------------------------------


def regular_file(tmp: Path) -> int:
    return os.open(tmp / "file", os.O_RDWR | os.O_CREAT, 0o600)


def read_only_file(tmp: Path) -> int:
    (tmp / "ro").write_bytes(b"x")
    return os.open(tmp / "ro", os.O_RDONLY)


def directory(tmp: Path) -> int:
    return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)


def pipe_read_end(tmp: Path) -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def pipe_write_end(tmp: Path) -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def dev_null(tmp: Path) -> int:
    return os.open("/dev/null", os.O_RDWR)


def listening_socket(tmp: Path) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp / f"l{os.getpid()}-{id(s)}"))
    s.listen()
    return s.detach()


def memfd(tmp: Path) -> int:
    fd = os.memfd_create("x")
    os.ftruncate(fd, 4096)
    return fd


NOT_A_KICK = [regular_file, read_only_file, directory, pipe_write_end, dev_null, memfd]
NOT_A_CALL = [regular_file, read_only_file, directory, pipe_read_end, dev_null, memfd]


@pytest.mark.parametrize("make", NOT_A_KICK, ids=lambda f: f.__name__)
def test_a_kick_fd_of_the_wrong_kind_is_refused(rig: Rig, tmp_path: Path,
                                                 make: Callable[[Path], int]) -> None:
    rig.fe.start(rig.guest)
    before = open_fds()
    fd = make(tmp_path)
    rig.fe.send(p.Request.SET_VRING_KICK, p.U64.pack(TX), [fd])
    os.close(fd)
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()
    assert open_fds() <= before + 2  # the new connection's socket pair


@pytest.mark.parametrize("make", NOT_A_CALL, ids=lambda f: f.__name__)
def test_a_call_fd_of_the_wrong_kind_is_refused(rig: Rig, tmp_path: Path,
                                                 make: Callable[[Path], int]) -> None:
    rig.fe.start(rig.guest)
    fd = make(tmp_path)
    rig.fe.send(p.Request.SET_VRING_CALL, p.U64.pack(RX), [fd])
    os.close(fd)
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()


def test_err_fd_of_the_wrong_kind_is_refused(rig: Rig, tmp_path: Path) -> None:
    fd = directory(tmp_path)
    rig.fe.send(p.Request.SET_VRING_ERR, p.U64.pack(0), [fd])
    os.close(fd)
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()


def test_a_call_pipe_nobody_reads_never_blocks_the_device(rig: Rig) -> None:
    """More notifications than a pipe holds (64 KiB / 8 bytes = 8192)."""
    rig.fe.start(rig.guest)
    r, w = os.pipe()  # blocking, as a front-end may send it
    rig.fe.send(p.Request.SET_VRING_CALL, p.U64.pack(TX), [w])
    os.close(w)
    g = rig.guest
    g.write(BUF_BASE, HDR + b"frame")
    vq = rig.device.queues[TX]
    for _ in range(9000):
        vq.notify()  # what every publish does; the pipe fills at 8192
    g.set_desc(TX, 0, BUF_BASE, 17, 0)
    g.offer(TX, 0)
    rig.fe.kick_queue(TX)
    assert rig.port.frames[-1:] == [b"frame"]
    assert rig.fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES
    os.close(r)


def test_a_call_socket_that_fails_on_write_costs_only_interrupts(rig: Rig,
                                                                 tmp_path: Path) -> None:
    rig.fe.start(rig.guest)
    fd = listening_socket(tmp_path)  # passes the kind check, every write fails (ENOTCONN)
    rig.fe.send(p.Request.SET_VRING_CALL, p.U64.pack(TX), [fd])
    os.close(fd)
    g = rig.guest
    g.write(BUF_BASE, HDR + b"frame")
    g.set_desc(TX, 0, BUF_BASE, 17, 0)
    g.offer(TX, 0)
    rig.fe.kick_queue(TX)
    assert rig.port.frames[-1:] == [b"frame"]
    assert rig.fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES


@pytest.mark.parametrize("make", [regular_file, directory, dev_null, memfd, pipe_write_end],
                         ids=lambda f: f.__name__)
def test_a_device_state_fd_of_the_wrong_kind_fails_the_transfer(
        rig: Rig, tmp_path: Path, make: Callable[[Path], int]) -> None:
    fe = rig.fe
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    fd = make(tmp_path)
    reply = fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                        p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [fd])
    os.close(fd)
    assert reply & 0xFF, "the reply must report the failure"
    assert fe.call_u64(p.Request.CHECK_DEVICE_STATE) == errno.EBADF
    assert rig.state.loaded == []
    assert rig.serves_an_honest_front_end()


def test_memory_fd_that_is_not_a_file_is_refused(rig: Rig, tmp_path: Path) -> None:
    r, w = os.pipe()
    region = p.MEM_REGION.pack(0, 1 << 20, 0x7F00_0000_0000, 0)
    rig.fe.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region, [r])
    os.close(r)
    os.close(w)
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()


def test_memory_file_smaller_than_its_region_is_refused(rig: Rig) -> None:
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    region = p.MEM_REGION.pack(0, 1 << 20, 0x7F00_0000_0000, 0)
    rig.fe.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region, [fd])
    os.close(fd)
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()


# -- guest memory that could shrink ---------------------------------------------------


def test_a_sealable_memfd_is_sealed_so_the_front_end_cannot_shrink_it() -> None:
    rig = Rig()
    rig.guest.close()
    rig.guest = Guest(memfd_flags=os.MFD_ALLOW_SEALING)
    try:
        rig.fe.start(rig.guest)
        with pytest.raises(PermissionError):
            os.ftruncate(rig.guest.fd, 4096)  # what killed tether with SIGBUS
        assert rig.serves_an_honest_front_end()
    finally:
        rig.close()


def test_a_memfd_sealed_by_the_front_end_is_taken_as_it_is() -> None:
    rig = Rig()
    rig.guest.close()
    rig.guest = Guest(memfd_flags=os.MFD_ALLOW_SEALING)
    fcntl.fcntl(rig.guest.fd, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # as QEMU does
    try:
        assert rig.serves_an_honest_front_end()
    finally:
        rig.close()


def test_unsealable_memory_is_refused_when_the_device_requires_pinned_memory() -> None:
    rig = Rig()
    rig.device.allow_unpinned_memory = False
    try:
        rig.fe.call_u64(p.Request.GET_FEATURES)
        region = p.MEM_REGION.pack(0, rig.guest.mem_size, 0x7F00_0000_0000, 0)
        rig.fe.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region,
                    [rig.guest.fd])  # MFD_CLOEXEC only: F_SEAL_SEAL, no F_SEAL_SHRINK
        assert rig.fe.closed_by_device()
    finally:
        rig.close()


def test_a_plain_file_as_guest_memory_works_as_memory_backend_file_sends_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = Rig()
    try:
        rig.guest.close()
        fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, rig.guest.mem_size)
        rig.guest.fd = fd
        rig.guest.mem = mmap.mmap(fd, rig.guest.mem_size)
        assert rig.serves_an_honest_front_end()
        assert "cannot be sealed" in caplog.text  # what shrinking it would do is said
    finally:
        rig.close()


def test_unsealable_memory_is_mapped_by_default_with_a_warning(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    assert rig.serves_an_honest_front_end()
    assert "cannot be sealed" in caplog.text


# -- fd floods ------------------------------------------------------------------------


def test_fds_on_every_payload_byte_are_closed_at_once(rig: Rig) -> None:
    before = open_fds()
    sock = rig.fe.sock
    header = p.HEADER.pack(p.Request.SET_MEM_TABLE, p.VERSION, 264)
    sock.sendmsg([header])
    rig.fe.pump()
    for _ in range(40):
        fds = [os.eventfd(0) for _ in range(8)]
        try:
            sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", fds))])
        except OSError:
            for fd in fds:
                os.close(fd)
            break
        for fd in fds:
            os.close(fd)
        rig.fe.pump()
        assert open_fds() <= before + 8
    assert rig.fe.closed_by_device()
    assert rig.serves_an_honest_front_end()


@pytest.mark.root
def test_accept_out_of_fds_backs_off_and_serves_the_next_front_end(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        first = Client(daemon.socket)
        assert first.works()
        # No fd number the kernel would hand out next is allowed: accept() fails.
        used = {int(fd) for fd in os.listdir(f"/proc/{daemon.pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        second = Client(daemon.socket, timeout=10)  # queued in the backlog
        second.send(p.Request.GET_FEATURES)
        wait_for(lambda: "cannot accept a front-end" in daemon.text(), 10, "EMFILE")
        assert first.works(), "the daemon must keep serving while out of fds"
        assert daemon.alive()
        first.close()
        resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (soft, hard))
        # fds to spare again: after its back-off the daemon serves the backlog.
        assert int(p.U64.unpack(second.reply(p.Request.GET_FEATURES))[0]) \
            == p.OFFERED_FEATURES
        assert "cannot accept a front-end" in daemon.text()
        second.close()
    finally:
        daemon.stop()


# -- the device-state channel ---------------------------------------------------------


def load(client: Client) -> int:
    """SET_DEVICE_STATE_FD(LOAD) with a pipe; returns our write end."""
    r, w = os.pipe()
    assert client.call_u64(p.Request.SET_DEVICE_STATE_FD,
                           p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [r]) \
        == p.DEVICE_STATE_NO_FD
    os.close(r)
    return w


def start_client(daemon: Daemon) -> Client:
    client = Client(daemon.socket)
    assert client.works()
    client.call_u64(p.Request.GET_PROTOCOL_FEATURES)
    client.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    return client


@pytest.mark.root
def test_check_during_a_load_never_blocks_the_daemon(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        client = start_client(daemon)
        w = load(client)
        os.write(w, VALID_STREAM[:40])
        client.send(p.Request.CHECK_DEVICE_STATE)  # while we still hold the write end
        # The loop runs: a second front-end is turned away at once.
        other = Client(daemon.socket)
        assert other.closed_by_peer()
        other.close()
        os.write(w, VALID_STREAM[40:])
        os.close(w)
        assert int(p.U64.unpack(client.reply(p.Request.CHECK_DEVICE_STATE))[0]) == 0
        assert client.works()
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.text()


@pytest.mark.root
def test_sigterm_ends_a_daemon_waiting_for_the_rest_of_a_load(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    client = start_client(daemon)
    w = load(client)
    os.write(w, VALID_STREAM[:40])
    client.send(p.Request.CHECK_DEVICE_STATE)
    daemon.proc.terminate()
    daemon.proc.wait(10)
    assert daemon.stop() == 0
    os.close(w)
    client.close()


def test_check_waits_at_most_the_grace_period(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_transfer, "CHECK_GRACE", 0.05)
    fe = rig.fe
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    r, w = os.pipe()
    fe.call_u64(p.Request.SET_DEVICE_STATE_FD, p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [r])
    os.close(r)
    os.write(w, b"partial")
    fe.send(p.Request.CHECK_DEVICE_STATE)
    assert fe.no_reply_pending()
    rig.loop.run(until=lambda: not rig.device.transfer.check_waiting, timeout=5)
    assert int(p.U64.unpack(fe.reply(p.Request.CHECK_DEVICE_STATE))[0]) == errno.ETIMEDOUT
    os.close(w)
    assert rig.serves_an_honest_front_end()


@pytest.mark.root
def test_max_state_stops_the_transfer_at_once(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, "--max-state", "1048576")
    try:
        client = start_client(daemon)
        rss = daemon.rss()
        w = load(client)
        # A record that claims 600 MiB: refused from its header, not after buffering.
        header = VALID_STREAM[:16] + bytes([0, 1, 0, 0, 0, 0, 0, 0]) + \
            (600 << 20).to_bytes(8, "big")
        written = 0
        with pytest.raises(BrokenPipeError):
            os.write(w, header)
            chunk = bytes(1 << 16)
            while written < 700 << 20:
                written += os.write(w, chunk)
        assert written < 2 << 20
        os.close(w)
        assert client.call_u64(p.Request.CHECK_DEVICE_STATE) == errno.EFBIG
        assert daemon.rss() < rss + (16 << 20)
        assert client.works()
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.text()


@pytest.mark.root
def test_a_bad_magic_stops_the_transfer_at_once(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    try:
        client = start_client(daemon)
        w = load(client)
        written = 0
        with pytest.raises(BrokenPipeError):
            chunk = b"\xff" * (1 << 16)
            while written < 100 << 20:
                written += os.write(w, chunk)
        assert written < 2 << 20
        os.close(w)
        assert client.call_u64(p.Request.CHECK_DEVICE_STATE) == errno.EINVAL
        assert client.works()
        client.close()
    finally:
        assert daemon.stop() == 0, daemon.text()


def test_device_state_over_a_socket_is_accepted(rig: Rig) -> None:
    fe = rig.fe
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    ours, theirs = socket.socketpair()
    assert fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                       p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [theirs.fileno()]) \
        == p.DEVICE_STATE_NO_FD
    theirs.close()
    ours.sendall(b"state")
    ours.close()
    assert fe.call_u64(p.Request.CHECK_DEVICE_STATE) == 0
    assert rig.state.loaded == [b"state"]


# -- log floods -----------------------------------------------------------------------


def test_bad_chains_log_a_burst_per_interval(rig: Rig,
                                              caplog: pytest.LogCaptureFixture) -> None:
    rig.fe.start(rig.guest)
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="tether")
    g = rig.guest
    g.set_desc(TX, 0, 1 << 40, 100, 0)  # outside guest memory
    for _ in range(2000):
        g.offer(TX, 0)
        rig.fe.kick_queue(TX)
    assert rig.device.bad_chains == 2000
    lines = [r for r in caplog.records if "dropped chain" in r.getMessage()]
    assert len(lines) == ratelimit.BURST
