"""Hypothesis: message streams carrying fds of every kind, and the device-state
channel, never stop the device.

After every example the device serves an honest front-end (a fresh
connection, the start sequence, one TX frame), no fd is left open, and the
process's memory has not grown with what the examples sent.
"""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.handover.device_state import Handover
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user import state_transfer
from tether.transport.vhost_user.device import VhostUserNetDevice

from .frontend import QVA_BASE, Frontend, Guest, RecordingPort
from .test_device import Rig

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
DATA = Path(__file__).resolve().parents[1] / "data" / "migration"
SEEDS = [(DATA / name).read_bytes() for name in
         ("guest-addresses.valid.bin", "nothing-seen.valid.bin", "one-tcp-flow.valid.bin",
          "future-optional-stage.valid.bin", "truncated.invalid.bin")]
_TMP = Path(tempfile.mkdtemp(prefix="tether-fuzz-"))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- fds of every kind -------------------------------------------------------------


def _pipe(end: int) -> int:
    r, w = os.pipe()
    os.close(w if end == 0 else r)
    return r if end == 0 else w


def _file(flags: int) -> int:
    if not (_TMP / "f").exists():
        (_TMP / "f").write_bytes(bytes(1 << 20))
    return os.open(_TMP / "f", flags)


def _memfd(flags: int, size: int) -> int:
    fd = os.memfd_create("fuzz", flags)
    os.ftruncate(fd, size)
    return fd


def _socket(kind: int) -> int:
    a, b = socket.socketpair(socket.AF_UNIX, kind)
    b.close()
    return a.detach()


def _listening() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    return s.detach()


FD_KINDS: list[Callable[[], int]] = [
    lambda: os.eventfd(0),
    lambda: os.eventfd(0, os.EFD_NONBLOCK),
    lambda: _pipe(0),
    lambda: _pipe(1),
    lambda: _file(os.O_RDWR),
    lambda: _file(os.O_RDONLY),
    lambda: os.open(_TMP, os.O_RDONLY | os.O_DIRECTORY),
    lambda: os.open("/dev/null", os.O_RDWR),
    lambda: _memfd(0, 1 << 20),
    lambda: _memfd(os.MFD_ALLOW_SEALING, 1 << 20),
    lambda: _memfd(0, 4096),  # smaller than any region it is offered for
    lambda: _socket(socket.SOCK_STREAM),
    lambda: _socket(socket.SOCK_DGRAM),
    _listening,
]

FD_REQUESTS = [p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL, p.Request.SET_VRING_ERR,
               p.Request.SET_MEM_TABLE, p.Request.SET_LOG_BASE, p.Request.SET_LOG_FD,
               p.Request.SET_DEVICE_STATE_FD, p.Request.CHECK_DEVICE_STATE,
               p.Request.GET_VRING_BASE, p.Request.SET_VRING_ADDR]


def payload_for(request: int, data: st.DataObject) -> bytes:
    if request in (p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL,
                   p.Request.SET_VRING_ERR):
        return p.U64.pack(data.draw(st.sampled_from([0, 1, 2, 0x100, 0x101])))
    if request == p.Request.SET_MEM_TABLE:
        size = data.draw(st.sampled_from([4096, 1 << 20, 2 << 20]))
        offset = data.draw(st.sampled_from([0, 4096, 1 << 20]))
        return p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(0, size, QVA_BASE, offset)
    if request == p.Request.SET_LOG_BASE:
        return p.LOG_PARAMS.pack(data.draw(st.sampled_from([4096, 1 << 20, 8 << 20])),
                                 data.draw(st.sampled_from([0, 4096])))
    if request == p.Request.SET_DEVICE_STATE_FD:
        return p.TRANSFER_PARAMS.pack(data.draw(st.integers(0, 2)), data.draw(st.integers(0, 1)))
    if request in (p.Request.GET_VRING_BASE,):
        return p.VRING_STATE.pack(data.draw(st.integers(0, 2)), 0)
    if request == p.Request.SET_VRING_ADDR:
        return p.VRING_ADDR.pack(0, 0, QVA_BASE + 0x1000, QVA_BASE + 0x3000,
                                 QVA_BASE + 0x1100, 0x3000)
    return data.draw(st.binary(max_size=16))


RUNS = {"fd messages": 0, "state transfers": 0}
MEMORY_SLACK = 64 << 20


@FUZZ
@given(st.data())
def test_messages_with_fds_of_every_kind(data: st.DataObject) -> None:
    RUNS["fd messages"] += 1
    fds_before = open_fds()
    rss_before = rss()
    rig = Rig()
    try:
        if data.draw(st.booleans()):
            rig.fe.start(rig.guest)
        for _ in range(data.draw(st.integers(1, 8))):
            if not rig.device.connected:
                break
            request = data.draw(st.sampled_from(FD_REQUESTS))
            makers = data.draw(st.lists(st.sampled_from(FD_KINDS), max_size=3))
            fds = [make() for make in makers]
            flags = data.draw(st.sampled_from([p.VERSION, p.VERSION | p.FLAG_NEED_REPLY]))
            try:
                rig.fe.sock.sendmsg(
                    [p.encode_request(request, payload_for(request, data), flags)],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    if fds else [])
            finally:
                for fd in fds:
                    os.close(fd)
            rig.fe.pump()
            # Whatever was asked, the loop is never stuck: the device still
            # turns pending work around (a CHECK may wait for its load).
            rig.loop.run_once(0)
        rig.fe.sock.setblocking(False)
        try:
            while rig.fe.sock.recv(65536):
                pass
        except (BlockingIOError, ConnectionResetError):
            pass
        rig.fe.sock.settimeout(5)
        assert rig.serves_an_honest_front_end(fresh=True)
    finally:
        rig.close()
    # At most: objects of earlier tests (subprocess pipes) may be collected meanwhile.
    assert open_fds() <= fds_before, "the device leaked file descriptors"
    assert rss() < rss_before + MEMORY_SLACK


class StateRig(Rig):
    """The scripted front-end against a device whose state handler is tether's
    own Handover: the real stream parser fed from the fd handler."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.port = RecordingPort()
        self.stack = Stack(self.loop, NetParams(
            addr4=socket.inet_aton("10.0.2.15"), prefix4=24,
            gateway4=socket.inet_aton("10.0.2.2"), max_flows=16))
        self.handover = Handover(self.stack, None, max_size=1 << 16)
        self.device = VhostUserNetDevice(self.loop, self.port, state=self.handover)
        self.guest = Guest()
        self.fe = Frontend(self.loop, self.device)

    def close(self) -> None:
        super().close()
        self.stack.close()


def stream_bytes(data: st.DataObject) -> bytes:
    seed = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(0, 3))):
        if seed:
            seed[data.draw(st.integers(0, len(seed) - 1))] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(seed)))
    return bytes(seed[:cut]) + data.draw(st.binary(max_size=64)) + (
        bytes(data.draw(st.sampled_from([0, 1 << 17]))))  # past --max-state, sometimes


@FUZZ
@given(st.data())
def test_the_device_state_channel(data: st.DataObject) -> None:
    RUNS["state transfers"] += 1
    fds_before = open_fds()
    rss_before = rss()
    saved_grace = state_transfer.CHECK_GRACE
    state_transfer.CHECK_GRACE = 0.05
    rig = StateRig()
    try:
        fe = rig.fe
        fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
        for _ in range(data.draw(st.integers(1, 3))):
            use_socket = data.draw(st.booleans())
            if use_socket:
                ours_s, theirs_s = socket.socketpair()
                ours_s.setblocking(False)
                ours, theirs = ours_s.detach(), theirs_s.detach()
            else:
                theirs, ours = os.pipe()
                os.set_blocking(ours, False)
            reply = fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                                p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [theirs])
            os.close(theirs)
            assert reply == p.DEVICE_STATE_NO_FD
            blob = stream_bytes(data)
            step = data.draw(st.integers(1, 4096))
            written = 0
            try:
                while written < len(blob):
                    try:
                        written += os.write(ours, blob[written:written + step])
                    except BlockingIOError:
                        fe.pump()
                        if not rig.device.transfer.current:
                            break
            except (BrokenPipeError, ConnectionResetError):
                pass  # the device stopped reading at the first bad byte
            hold = data.draw(st.booleans())  # CHECK while we still hold the write end
            if not hold:
                os.close(ours)
            fe.send(p.Request.CHECK_DEVICE_STATE)
            rig.loop.run(until=lambda: not rig.device.transfer.check_waiting, timeout=5)
            assert not rig.device.transfer.check_waiting, "CHECK_DEVICE_STATE never answered"
            result = int(p.U64.unpack(fe.reply(p.Request.CHECK_DEVICE_STATE))[0])
            assert result == 0 or result in (errno.EINVAL, errno.ENOTSUP, errno.ENODATA,
                                             errno.EFBIG, errno.EBADMSG, errno.ETIMEDOUT)
            if hold:
                os.close(ours)
        assert rig.serves_an_honest_front_end(fresh=True)
    finally:
        rig.close()
        state_transfer.CHECK_GRACE = saved_grace
    # At most: objects of earlier tests (subprocess pipes) may be collected meanwhile.
    assert open_fds() <= fds_before, "the device leaked file descriptors"
    assert rss() < rss_before + MEMORY_SLACK


def test_fuzz_counts() -> None:
    """Printed with -s: how many examples the two fuzzers above ran."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"fuzz examples: {RUNS}, peak RSS {peak} KiB")
