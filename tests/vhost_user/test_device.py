"""The vhost-user net device against a scripted front-end on synthetic memory."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator

import pytest

from tether.loop import Loop
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user.device import VhostUserNetDevice
from tether.transport.vhost_user.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE

from .frontend import BUF_BASE, MEM_SIZE, QSIZE, Frontend, Guest, RecordingPort, RecordingState

RX, TX = 0, 1
HDR = bytes(12)
BIG = 0x11000  # a receive buffer that holds any frame (has_room's measure)


class Rig:
    def __init__(self) -> None:
        self.loop = Loop()
        self.port = RecordingPort()
        self.state = RecordingState()
        self.device = VhostUserNetDevice(self.loop, self.port, state=self.state)
        self.guest = Guest()
        self.fe = Frontend(self.loop, self.device)

    def close(self) -> None:
        self.fe.close()
        self.device.disconnect("test over")
        self.guest.close()
        self.loop.close()

    def serves_an_honest_front_end(self, fresh: bool = False) -> bool:
        """Whatever came before, the device serves an honest front-end: a
        connection (a new one if the old was dropped, or if `fresh`), ring
        start, and one TX frame through to the port."""
        if fresh or not self.device.connected:
            self.fe.close()
            if self.device.connected:
                self.device.disconnect("example over")
            self.fe = Frontend(self.loop, self.device)
        self.guest.avail_idx = [0, 0]
        self.guest.used_seen = [0, 0]
        self.fe.start(self.guest)
        self.guest.write(BUF_BASE, HDR + b"alive")
        self.guest.set_desc(TX, 0, BUF_BASE, 17, 0)
        self.guest.offer(TX, 0)
        self.fe.kick_queue(TX)
        return self.port.frames[-1:] == [b"alive"]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def started(rig: Rig) -> Rig:
    rig.fe.start(rig.guest)
    return rig


def test_replies_carry_flags_0x5_and_offer_the_features(rig: Rig) -> None:
    features = rig.fe.call_u64(p.Request.GET_FEATURES)
    for bit in (p.F_VERSION_1, p.F_NET_MRG_RXBUF, p.F_LOG_ALL, p.F_PROTOCOL_FEATURES):
        assert features >> bit & 1
    protocol = rig.fe.call_u64(p.Request.GET_PROTOCOL_FEATURES)
    assert protocol == (1 << p.PF_LOG_SHMFD) | (1 << p.PF_RARP) | (1 << p.PF_REPLY_ACK) | (
        1 << p.PF_DEVICE_STATE)


def test_need_reply_is_acked_only_with_reply_ack(rig: Rig) -> None:
    rig.fe.send(p.Request.SET_OWNER, flags=p.VERSION | p.FLAG_NEED_REPLY)
    assert rig.fe.no_reply_pending()  # REPLY_ACK not negotiated yet
    rig.fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(1 << p.PF_REPLY_ACK))
    assert rig.fe.call_u64(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(0, 1),
                           flags=p.VERSION | p.FLAG_NEED_REPLY) == 0


def test_guest_frames_reach_the_port_and_buffers_come_back(started: Rig) -> None:
    g, fe = started.guest, started.fe
    frame = bytes(range(60))
    # head 0: header+frame in one descriptor
    g.write(BUF_BASE, HDR + frame)
    g.set_desc(TX, 0, BUF_BASE, 12 + len(frame), 0)
    # head 1: header alone, then the frame in two pieces
    g.write(BUF_BASE + 0x1000, HDR)
    g.write(BUF_BASE + 0x2000, frame[:20])
    g.write(BUF_BASE + 0x3000, frame[20:])
    g.set_desc(TX, 1, BUF_BASE + 0x1000, 12, DESC_F_NEXT, 2)
    g.set_desc(TX, 2, BUF_BASE + 0x2000, 20, DESC_F_NEXT, 3)
    g.set_desc(TX, 3, BUF_BASE + 0x3000, 40, 0)
    # head 4: an indirect table of two descriptors
    table = BUF_BASE + 0x4000
    struct.pack_into("<QIHH", g.mem, table, BUF_BASE + 0x1000, 12, DESC_F_NEXT, 1)
    struct.pack_into("<QIHH", g.mem, table + 16, BUF_BASE + 0x2000, 20, 0, 0)
    g.set_desc(TX, 4, table, 32, DESC_F_INDIRECT)
    for head in (0, 1, 4):
        g.offer(TX, head)
    fe.kick_queue(TX)
    assert started.port.frames == [frame, frame, frame[:20]]
    assert g.used(TX) == [(0, 0), (1, 0), (4, 0)]
    assert fe.called(TX)


def test_frames_to_the_guest_fill_buffers_with_header(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    g.set_desc(RX, 0, BUF_BASE, 2048, DESC_F_WRITE)
    g.offer(RX, 0)
    fe.kick_queue(RX)
    frame = os.urandom(100)
    assert dev.send_frame(frame)
    dev.flush()
    assert g.used(RX) == [(0, 112)]
    assert g.read(BUF_BASE, 112) == HDR[:10] + b"\x01\x00" + frame
    assert fe.called(RX)


def test_large_frame_spans_merged_buffers(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    for i in range(8):
        g.set_desc(RX, i, BUF_BASE + i * 0x1000, 1500, DESC_F_WRITE)
        g.offer(RX, i)
    fe.kick_queue(RX)
    frame = os.urandom(4000)
    assert dev.send_frame(frame)
    dev.flush()
    used = g.used(RX)
    assert used == [(0, 1500), (1, 1500), (2, 1012)]
    got = b"".join(g.read(BUF_BASE + h * 0x1000, n) for h, n in used)
    assert struct.unpack_from("<H", got, 10)[0] == 3  # num_buffers
    assert got[12:] == frame


def test_receive_chains_take_header_and_frame_in_one_pass(rig: Rig) -> None:
    """Linux's big-packets mode (no MRG_RXBUF): each receive buffer is a chain
    whose first descriptor holds the header alone; one buffer per frame."""
    g, fe, dev = rig.guest, rig.fe, rig.device
    fe.start(g, features=p.OFFERED_FEATURES & ~(1 << p.F_NET_MRG_RXBUF))
    g.set_desc(RX, 0, BUF_BASE, 12, DESC_F_WRITE | DESC_F_NEXT, 1)
    g.set_desc(RX, 1, BUF_BASE + 0x1000, 1000, DESC_F_WRITE | DESC_F_NEXT, 2)
    g.set_desc(RX, 2, BUF_BASE + 0x2000, 4096, DESC_F_WRITE)
    g.offer(RX, 0)
    fe.kick_queue(RX)
    frame = os.urandom(3000)
    assert dev.send_frame(frame)
    assert not dev.send_frame(b"no second buffer")
    dev.flush()
    assert g.used(RX) == [(0, 3012)]
    assert g.read(BUF_BASE, 12) == HDR[:10] + b"\x01\x00"
    assert g.read(BUF_BASE + 0x1000, 1000) + g.read(BUF_BASE + 0x2000, 2000) == frame


def test_header_split_over_merged_buffers_still_counts_them(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    g.set_desc(RX, 0, BUF_BASE, 7, DESC_F_WRITE)  # shorter than the header
    table = BUF_BASE + 0x8000  # an indirect buffer: 3 header bytes, then 500
    struct.pack_into("<QIHH", g.mem, table, BUF_BASE + 0x1000, 3, DESC_F_WRITE | DESC_F_NEXT, 1)
    struct.pack_into("<QIHH", g.mem, table + 16, BUF_BASE + 0x2000, 500, DESC_F_WRITE, 0)
    g.set_desc(RX, 1, table, 32, DESC_F_INDIRECT)
    g.set_desc(RX, 2, BUF_BASE + 0x3000, 1500, DESC_F_WRITE)
    for head in range(3):
        g.offer(RX, head)
    fe.kick_queue(RX)
    frame = os.urandom(1000)
    assert dev.send_frame(frame)
    dev.flush()
    used = g.used(RX)
    assert used == [(0, 7), (1, 503), (2, 502)]
    got = (g.read(BUF_BASE, 7) + g.read(BUF_BASE + 0x1000, 3) + g.read(BUF_BASE + 0x2000, 500)
           + g.read(BUF_BASE + 0x3000, 502))
    assert struct.unpack_from("<H", got, 10)[0] == 3  # num_buffers, split over two buffers
    assert got[12:] == frame
    assert dev.stats()["rx_multi_buffer"] == 1


def test_a_bad_chain_drops_the_frame_and_returns_the_buffers_before_it(
        started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    g.set_desc(RX, 0, BUF_BASE, 1500, DESC_F_WRITE)
    g.set_desc(RX, 1, BUF_BASE + 0x1000, 1500, 0)  # device-readable: not a receive buffer
    g.set_desc(RX, 2, BUF_BASE + 0x2000, 4096, DESC_F_WRITE)
    for head in range(3):
        g.offer(RX, head)
    fe.kick_queue(RX)
    assert not dev.send_frame(os.urandom(2000))
    assert dev.bad_chains == 1 and dev.stats()["rx_dropped"] == 1
    assert dev.send_frame(b"next")
    dev.flush()
    assert g.used(RX) == [(0, 0), (1, 0), (2, 16)]


def test_no_room_drops_frame_and_keeps_buffers_then_signals_room(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    g.set_desc(RX, 0, BUF_BASE, 1500, DESC_F_WRITE)
    g.offer(RX, 0)
    fe.kick_queue(RX)
    assert not dev.has_room()  # one 1500-byte buffer cannot hold a 64 KiB frame
    assert not dev.send_frame(os.urandom(3000))
    assert g.used(RX) == []
    for i in range(1, QSIZE):
        g.set_desc(RX, i, BUF_BASE + i * 0x2000, 8192, DESC_F_WRITE)
        g.offer(RX, i)
    fe.kick_queue(RX)
    assert started.port.room_calls == 1
    assert dev.has_room()
    assert dev.send_frame(b"x" * 3000)  # the kept buffer 0 is used first
    dev.flush()
    assert [h for h, _ in g.used(RX)] == [0, 1]


def test_receive_kicks_are_wanted_only_while_the_device_waits_for_room(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    assert not dev.send_frame(b"x" * 100)  # no buffers yet
    assert g.kicks_wanted(RX)
    for i in range(4):  # room for a full-sized frame (has_room's measure)
        g.set_desc(RX, i, BUF_BASE + i * BIG, BIG, DESC_F_WRITE)
        g.offer(RX, i)
    fe.kick_queue(RX)
    assert started.port.room_calls == 1
    # Room again: the guest's further refills need not wake the device.
    assert not g.kicks_wanted(RX)
    assert dev.send_frame(b"x" * 100)
    dev.flush()
    assert [h for h, _ in g.used(RX)] == [0]


def test_a_buffer_added_while_kicks_were_off_is_not_missed(
        started: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of virtio 1.2 §2.7.10: the guest adds a buffer while it still
    sees NO_NOTIFY, just after the device looked and just before it asks for
    kicks again; no kick ever comes for it, so the device must notice alone."""
    g, fe, dev, port = started.guest, started.fe, started.device, started.port

    def offer(head: int) -> None:
        g.set_desc(RX, head, BUF_BASE + head * BIG, BIG, DESC_F_WRITE)
        g.offer(RX, head)

    offer(0)
    fe.kick_queue(RX)
    assert dev.send_frame(b"x" * 100)
    assert not dev.has_room()  # waits, with kicks on
    offer(1)
    fe.kick_queue(RX)
    assert port.room_calls == 1
    assert not g.kicks_wanted(RX)  # room: kicks off again
    assert dev.send_frame(b"x" * 100)

    looked = dev.datapath._room

    def look_then_guest_adds() -> bool:
        result = looked()
        offer(2)  # no kick: the guest still sees NO_NOTIFY
        return result

    monkeypatch.setattr(dev.datapath, "_room", look_then_guest_adds)
    assert not dev.has_room()
    monkeypatch.setattr(dev.datapath, "_room", looked)
    started.loop.run_once(0)
    assert port.room_calls == 2
    assert dev.send_frame(b"x" * 100)
    dev.flush()
    assert [h for h, _ in g.used(RX)] == [0, 1, 2]


def test_hostile_chains_are_dropped_counted_and_the_device_keeps_working(
        started: Rig) -> None:
    g, fe = started.guest, started.fe
    g.set_desc(TX, 0, BUF_BASE, 100, DESC_F_NEXT, 0)  # loops on itself
    g.set_desc(TX, 1, MEM_SIZE - 10, 100, 0)  # runs off guest memory
    g.set_desc(TX, 2, BUF_BASE, 0, 0)  # zero length
    g.set_desc(TX, 3, BUF_BASE, 100, DESC_F_WRITE)  # writable on TX
    g.set_desc(TX, 4, BUF_BASE, 100, DESC_F_NEXT, QSIZE + 3)  # next out of range
    g.set_desc(TX, 5, BUF_BASE, 33, DESC_F_INDIRECT)  # indirect length not 16k
    g.set_desc(TX, 6, BUF_BASE, 10, 0)  # shorter than the virtio-net header
    for head in range(7):
        g.offer(TX, head)
    g.offer(TX, QSIZE + 1)  # head out of range
    fe.kick_queue(TX)
    assert started.device.bad_chains == 8
    assert started.port.frames == []
    assert len(g.used(TX)) == 8  # every buffer given back, so the guest can go on
    g.write(BUF_BASE, HDR + b"ok" * 30)
    g.set_desc(TX, 7, BUF_BASE, 72, 0)
    g.offer(TX, 7)
    fe.kick_queue(TX)
    assert started.port.frames == [b"ok" * 30]


def test_avail_index_far_ahead_stops_only_that_ring(started: Rig) -> None:
    g, fe = started.guest, started.fe
    struct.pack_into("<H", g.mem, g.avail_gpa(TX) + 2, QSIZE + 5)
    fe.kick_queue(TX)
    assert started.port.frames == []
    assert started.device.bad_chains == 1
    assert fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES  # still serving


@pytest.mark.parametrize("request_id, payload", [
    (999, b""),  # unknown request
    (p.Request.SET_VRING_NUM, b"\0" * 7),  # wrong size
    (p.Request.SET_VRING_NUM, p.VRING_STATE.pack(5, 256)),  # no such queue
    (p.Request.SET_VRING_NUM, p.VRING_STATE.pack(0, 100)),  # not a power of 2
    (p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(9, 0)),  # too many regions
    (p.Request.SET_FEATURES, p.U64.pack(1 << 60)),  # never offered
    (p.Request.GET_MAX_MEM_SLOTS, b""),  # not negotiated, not implemented
])
def test_malformed_message_disconnects_cleanly_and_next_connection_is_clean(
        rig: Rig, request_id: int, payload: bytes, caplog: pytest.LogCaptureFixture) -> None:
    rig.fe.start(rig.guest)
    rig.fe.send(request_id, payload)
    assert rig.fe.closed_by_device()
    assert "vhost-user protocol error" in caplog.text
    assert "Traceback" not in caplog.text
    assert rig.device.memory is None and not any(q.started for q in rig.device.queues)
    # A new front-end gets a device that starts from scratch and works.
    rig.fe.close()
    rig.fe = Frontend(rig.loop, rig.device)
    rig.guest.avail_idx = [0, 0]
    rig.fe.start(rig.guest)
    rig.guest.write(BUF_BASE, HDR + b"again")
    rig.guest.set_desc(TX, 0, BUF_BASE, 17, 0)
    rig.guest.offer(TX, 0)
    rig.fe.kick_queue(TX)
    assert rig.port.frames[-1] == b"again"


def test_bad_header_version_disconnects(rig: Rig) -> None:
    rig.fe.send(p.Request.GET_FEATURES, flags=0x2)
    assert rig.fe.closed_by_device()


def test_get_vring_base_stops_ring_and_returns_next_avail(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    g.write(BUF_BASE, HDR + b"a" * 50)
    for i in range(3):
        g.set_desc(TX, i, BUF_BASE, 62, 0)
        g.offer(TX, i)
    fe.kick_queue(TX)
    for q in (RX, TX):
        fe.send(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(q, 0))
        assert p.VRING_STATE.unpack(fe.reply(p.Request.GET_VRING_BASE)) == (q, 3 if q else 0)
    assert started.state.stopped == 1
    # Stopped: new buffers are not touched, frames for the guest are dropped.
    g.offer(TX, 0)
    fe.kick_queue(TX)
    assert len(started.port.frames) == 3
    assert not dev.send_frame(b"late")
    # QEMU restarts the rings (a failed migration on the source): rings_started again.
    for q in (RX, TX):
        fe.send(p.Request.SET_VRING_BASE, p.VRING_STATE.pack(q, 3 if q else 0))
        fe.set_addr(g, q, 0)
        fe.send(p.Request.SET_VRING_KICK, p.U64.pack(q), [fe.kick[q]])
    assert started.state.started == 2
    assert len(started.port.frames) == 4  # the buffer offered while stopped


def _log_bits(log_map: mmap.mmap, gpa: int) -> bool:
    page = gpa // 4096
    return bool(log_map[page // 8] >> (page % 8) & 1)


def test_dirty_log_marks_buffers_and_used_ring_while_log_all(started: Rig) -> None:
    g, fe, dev = started.guest, started.fe, started.device
    log_fd = os.memfd_create("log")
    log_size = MEM_SIZE // 4096 // 8
    os.ftruncate(log_fd, log_size)
    log_map = mmap.mmap(log_fd, log_size)
    assert fe.call_u64(p.Request.SET_LOG_BASE, p.LOG_PARAMS.pack(log_size, 0), [log_fd]) == 0
    fe.send(p.Request.SET_FEATURES, p.U64.pack(
        p.OFFERED_FEATURES | (1 << p.F_LOG_ALL)), flags=p.VERSION | p.FLAG_NEED_REPLY)
    assert p.U64.unpack(fe.reply(p.Request.SET_FEATURES))[0] == 0
    for q in (RX, TX):
        fe.set_addr(g, q, p.VRING_F_LOG)
    buf = BUF_BASE + 0x5000 - 600  # straddles a page boundary
    g.set_desc(RX, 0, buf, 1500, DESC_F_WRITE)
    g.offer(RX, 0)
    fe.kick_queue(RX)
    assert dev.send_frame(os.urandom(1000))
    dev.flush()
    assert _log_bits(log_map, buf) and _log_bits(log_map, buf + 1000)
    assert not _log_bits(log_map, buf + 0x2000)
    assert _log_bits(log_map, g.used_gpa(RX))
    assert not _log_bits(log_map, g.used_gpa(TX))
    # TX only writes the used ring.
    g.write(BUF_BASE, HDR + b"t" * 50)
    g.set_desc(TX, 0, BUF_BASE, 62, 0)
    g.offer(TX, 0)
    fe.kick_queue(TX)
    assert _log_bits(log_map, g.used_gpa(TX))
    assert not _log_bits(log_map, BUF_BASE)
    log_map.close()
    os.close(log_fd)


def _pipe_read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


def test_device_state_save_larger_than_a_pipe(started: Rig) -> None:
    fe = started.fe
    started.state.blob = os.urandom(300_000)
    r, w = os.pipe()
    result = fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                         p.TRANSFER_PARAMS.pack(p.TRANSFER_SAVE, 0), [w])
    os.close(w)
    assert result == p.DEVICE_STATE_NO_FD  # reply first, before any data
    data = b""
    os.set_blocking(r, False)
    while True:
        fe.pump()
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    os.close(r)
    assert data == started.state.blob
    assert fe.call_u64(p.Request.CHECK_DEVICE_STATE) == 0


def test_device_state_load_is_kept_until_rings_start(rig: Rig) -> None:
    fe = rig.fe
    fe.call_u64(p.Request.GET_FEATURES)
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    r, w = os.pipe()
    blob = os.urandom(200_000)
    assert fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                       p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [r]) == 0x100
    os.close(r)
    os.set_blocking(w, False)
    pos = 0
    while pos < len(blob):
        try:
            pos += os.write(w, blob[pos:pos + 65536])
        except BlockingIOError:
            fe.pump()
    os.close(w)
    # CHECK may arrive before the loop saw EOF: the device finishes the read.
    assert fe.call_u64(p.Request.CHECK_DEVICE_STATE) == 0
    assert rig.state.loaded == [blob]
    assert rig.state.started == 0
    fe.start(rig.guest)
    assert rig.state.started == 1


def test_device_state_load_failure_is_reported_by_check(rig: Rig) -> None:
    fe = rig.fe
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    rig.state.reject = True
    r, w = os.pipe()
    assert fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                       p.TRANSFER_PARAMS.pack(p.TRANSFER_LOAD, 0), [r]) == 0x100
    os.close(r)
    os.write(w, b"garbage")
    os.close(w)
    fe.pump()
    assert fe.call_u64(p.Request.CHECK_DEVICE_STATE) == 71


def test_device_state_bad_phase_is_refused_without_fd(rig: Rig) -> None:
    r, w = os.pipe()
    result = rig.fe.call_u64(p.Request.SET_DEVICE_STATE_FD,
                             p.TRANSFER_PARAMS.pack(p.TRANSFER_SAVE, 1), [w])
    os.close(w)
    assert result & 0xFF and result & 0x100
    assert _pipe_read_all(r) == b""  # the device closed its copy
    os.close(r)
    assert rig.fe.call_u64(p.Request.CHECK_DEVICE_STATE) != 0


def test_memory_table_replaced_while_running_remaps_rings(started: Rig) -> None:
    g, fe = started.guest, started.fe
    region = p.MEM_REGION.pack(0, MEM_SIZE, 0x7E00_0000_0000, 0)  # new front-end address
    fe.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region, [g.fd])
    # Ring addresses are front-end addresses: until QEMU re-sends them they
    # no longer translate, so the rings are parked rather than misread.
    for q in (RX, TX):
        fe.send(p.Request.SET_VRING_ADDR, p.VRING_ADDR.pack(
            q, 0, 0x7E00_0000_0000 + g.desc_gpa(q), 0x7E00_0000_0000 + g.used_gpa(q),
            0x7E00_0000_0000 + g.avail_gpa(q), g.used_gpa(q)))
    g.write(BUF_BASE, HDR + b"moved")
    g.set_desc(TX, 0, BUF_BASE, 17, 0)
    g.offer(TX, 0)
    fe.kick_queue(TX)
    assert started.port.frames == [b"moved"]


def test_ring_outside_memory_is_refused_by_reply_ack_and_connection_kept(
        rig: Rig) -> None:
    fe, g = rig.fe, rig.guest
    fe.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(p.OFFERED_PROTOCOL_FEATURES))
    region = p.MEM_REGION.pack(0, MEM_SIZE, 0x7F00_0000_0000, 0)
    assert fe.call_u64(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region, [g.fd],
                       flags=p.VERSION | p.FLAG_NEED_REPLY) == 0
    fe.send(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(0, QSIZE))
    bad = p.VRING_ADDR.pack(0, 0, 0x1000, 0x2000, 0x3000, 0)  # not front-end addresses
    assert fe.call_u64(p.Request.SET_VRING_ADDR, bad,
                       flags=p.VERSION | p.FLAG_NEED_REPLY) == 1
    assert fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES


def test_send_rarp_reports_the_mac(rig: Rig) -> None:
    seen: list[bytes] = []
    rig.device.on_rarp = seen.append
    rig.fe.send(p.Request.SEND_RARP, bytes.fromhex("525400123456") + b"\0\0")
    assert seen == [bytes.fromhex("525400123456")]


def test_get_vring_base_publishes_and_logs_what_the_stack_did_not_flush(
        started: Rig) -> None:
    """No buffer stays in flight across a stop: frames written but not yet
    flushed are made visible, and logged, before GET_VRING_BASE replies."""
    g, fe, dev = started.guest, started.fe, started.device
    log_fd = os.memfd_create("log")
    log_size = MEM_SIZE // 4096 // 8
    os.ftruncate(log_fd, log_size)
    log_map = mmap.mmap(log_fd, log_size)
    fe.call_u64(p.Request.SET_LOG_BASE, p.LOG_PARAMS.pack(log_size, 0), [log_fd])
    fe.send(p.Request.SET_FEATURES, p.U64.pack(p.OFFERED_FEATURES | (1 << p.F_LOG_ALL)))
    fe.set_addr(g, RX, p.VRING_F_LOG)
    for i in range(2):
        g.set_desc(RX, i, BUF_BASE + i * 0x1000, 2048, DESC_F_WRITE)
        g.offer(RX, i)
    fe.kick_queue(RX)
    assert dev.send_frame(b"a" * 100) and dev.send_frame(b"b" * 100)
    assert g.used_idx(RX) == 0  # not flushed yet
    fe.send(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(RX, 0))
    assert p.VRING_STATE.unpack(fe.reply(p.Request.GET_VRING_BASE)) == (RX, 2)
    assert g.used_idx(RX) == 2
    assert _log_bits(log_map, g.used_gpa(RX)) and _log_bits(log_map, BUF_BASE + 0x1000)
    log_map.close()
    os.close(log_fd)


@pytest.mark.parametrize("request_id", [
    p.Request.SET_VRING_KICK, p.Request.SET_VRING_CALL, p.Request.SET_VRING_ERR])
def test_ring_fd_for_a_missing_queue_is_closed(rig: Rig, request_id: int) -> None:
    before = len(os.listdir("/proc/self/fd"))
    fd = os.eventfd(0)
    rig.fe.send(request_id, p.U64.pack(7), [fd])
    os.close(fd)
    assert rig.fe.closed_by_device()
    assert len(os.listdir("/proc/self/fd")) == before - 1  # the device's socket end


def test_new_memory_table_for_stopped_rings_is_accepted(started: Rig) -> None:
    """A guest reset stops the rings; the next start may bring a table in
    which the old ring addresses mean nothing, before fresh SET_VRING_ADDRs."""
    fe, g = started.fe, started.guest
    for q in (RX, TX):
        fe.send(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(q, 0))
        fe.reply(p.Request.GET_VRING_BASE)
    region = p.MEM_REGION.pack(0, MEM_SIZE, 0x7E00_0000_0000, 0)
    assert fe.call_u64(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region, [g.fd],
                       flags=p.VERSION | p.FLAG_NEED_REPLY) == 0


def test_tx_works_in_batches_and_yields_to_the_loop_between_them() -> None:
    loop = Loop()
    port = RecordingPort()
    device = VhostUserNetDevice(loop, port)
    guest = Guest(qsize=256)
    fe = Frontend(loop, device)
    try:
        fe.start(guest)
        guest.write(BUF_BASE, HDR + b"x" * 50)
        for i in range(200):
            guest.set_desc(TX, i, BUF_BASE, 62, 0)
            guest.offer(TX, i)
        os.eventfd_write(fe.kick[TX], 1)
        loop.run_once(0)
        # The kick's batch, then at most the one continuation that was due
        # when the pass began: the loop polls again before the rest.
        assert len(port.frames) in (64, 128)
        # Coming back anyway, the device tells the guest not to kick meanwhile...
        assert not guest.kicks_wanted(TX)
        fe.pump()
        assert len(port.frames) == 200
        # ...and asks for kicks again once the ring is empty.
        assert guest.kicks_wanted(TX)
    finally:
        fe.close()
        device.disconnect("test over")
        guest.close()
        loop.close()


def test_has_room_tracks_the_posted_capacity_exactly_when_tight() -> None:
    loop = Loop()
    port = RecordingPort()
    device = VhostUserNetDevice(loop, port)
    guest = Guest(qsize=256)
    fe = Frontend(loop, device)
    sizes = [1500, 700, 4000, 1500] * 40  # uneven buffers, as a guest may post
    try:
        fe.start(guest)
        posted = 0
        remaining: list[int] = []
        for step in range(120):
            if step % 10 == 0:  # the guest refills now and then
                for _ in range(12):
                    size = sizes[posted % len(sizes)]
                    guest.set_desc(RX, posted % 256, BUF_BASE + (posted % 256) * 0x1000,
                                   size, DESC_F_WRITE)
                    guest.offer(RX, posted % 256)
                    remaining.append(size)
                    posted += 1
                fe.kick_queue(RX)
            assert device.has_room() == (sum(remaining) >= 65535 + 14 + 12), step
            if not device.send_frame(b"z" * 988):  # 1000 bytes with the header
                assert sum(remaining) < 1000
                continue
            # The frame took buffers from the front until 1000 bytes fit.
            taken = 0
            while taken < 1000:
                taken += remaining.pop(0)
        device.flush()
    finally:
        fe.close()
        device.disconnect("test over")
        guest.close()
        loop.close()


def test_ring_size_changed_on_a_running_ring_is_not_read_with_old_bounds(
        started: Rig) -> None:
    g, fe = started.guest, started.fe
    fe.send(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(TX, 32768))  # rings no longer fit
    g.offer(TX, 0)
    fe.kick_queue(TX)  # must not read past what was checked
    assert started.port.frames == []
    assert fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES


def test_the_guest_never_sees_used_idx_half_written(started: Rig) -> None:
    """The guest reads used->idx while we publish it, from another CPU: every
    value it can see must be one we published, or the guest takes a stale
    slot for a used buffer ("id N is not a head!", the ring declared broken).
    A reader process polls the index with 16-bit loads, as the guest does,
    while the device publishes 200000 times; the index must only ever move
    forward.  struct.pack_into fails this (it clears the field first)."""
    g = started.guest
    vq = started.device.queues[TX]
    stop_at = MEM_SIZE - 1  # a byte the test owns: set when the publishing is done
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "guest": no pytest machinery past this point
        try:
            index = memoryview(g.mem)[g.used_gpa(TX) + 2:g.used_gpa(TX) + 4].cast("H")
            reads = backwards = 0
            last = index[0]
            os.write(ready_w, b"r")
            stop = memoryview(g.mem)
            while not stop[stop_at] and reads < 100_000_000:
                now = index[0]
                if (now - last) & 0xFFFF >= 0x8000:
                    backwards += 1
                last = now
                reads += 1
            os.write(result_w, f"{reads} {backwards}".encode())
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        for _ in range(200_000):
            vq.push_used(0, 0, None)
            vq.publish(None)
        g.mem[stop_at] = 1
        reads, backwards = map(int, os.read(result_r, 64).split())
    finally:
        g.mem[stop_at] = 1
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, result_r, result_w):
            os.close(fd)
    assert reads > 10_000  # it really read while we wrote
    assert backwards == 0, f"{backwards} of {reads} reads saw used->idx go backwards"


def test_bulk_frames_are_taken_without_kicks_small_ones_ask_for_kicks_at_once(
        started: Rig) -> None:
    """TX mitigation: after a batch with bulk data the device keeps kicks off
    and comes back to the ring by itself (the guest's next frames cost no
    vCPU exit); a ring it finds empty then, or a batch of small frames, gets
    kicks asked for again at once, so a request is never left waiting."""
    g, fe, loop = started.guest, started.fe, started.loop
    big = bytes(40_000)
    g.write(BUF_BASE, HDR + big)
    g.set_desc(TX, 0, BUF_BASE, 12 + len(big), 0)
    g.offer(TX, 0)
    fe.kick_queue(TX)
    assert started.port.frames == [big]
    assert not g.kicks_wanted(TX)
    # The guest honours NO_NOTIFY: a frame without a kick.
    g.offer(TX, 0)
    assert loop.run(until=lambda: len(started.port.frames) == 2, timeout=5)
    # Nothing more: the next look finds the ring empty and asks for kicks.
    assert loop.run(until=lambda: g.kicks_wanted(TX), timeout=5)

    small = bytes(60)
    g.write(BUF_BASE, HDR + small)
    g.set_desc(TX, 1, BUF_BASE, 12 + len(small), 0)
    g.offer(TX, 1)
    fe.kick_queue(TX)
    assert started.port.frames[-1] == small
    assert g.kicks_wanted(TX)
