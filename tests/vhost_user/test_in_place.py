"""Receiving in place: a socket fills the guest's receive buffers, the device
writes only the headers (frames.InPlaceSink on the vhost-user device).

The ring tests drive the real device through the scripted front-end, with
receive buffers posted as Linux posts them (single 4 KiB descriptors, one
after another in memory), and a real kernel socket writing the payloads
(recvmsg_into the claimed views).  What the guest reads back is checked
against what was sent, and against scapy's reading of the headers.  The
last test runs the whole stack: bulk data from a real TCP peer reaches the
guest byte for byte through claim and commit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from tests.net.conftest import delete_netns, make_netns
from tether.transport.tap_setup import inside
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user.virtqueue import DESC_F_NEXT, DESC_F_WRITE

from .frontend import BUF_BASE, Frontend, Guest, RecordingPort
from .test_device import Rig
from .test_prompt_delivery import Rig as StackRig
from .test_prompt_delivery import _outbound as outbound

RX, TX = 0, 1
HDR_LEN = 12
QSIZE = 64
BUF = 4096
MEM = 4 << 20
HEADERS = bytes(Ether(src="9a:55:9a:55:9a:55", dst="02:00:00:00:00:02")
                / IP(src="10.77.0.1", dst="10.77.0.2") / TCP(sport=80, dport=40000, flags="A"))
PAYLOAD_MAX = 10000


class InPlaceRig(Rig):
    """The device on a guest that posts QSIZE adjacent 4 KiB receive buffers."""

    def __init__(self, features: int = p.OFFERED_FEATURES, buf: int = BUF) -> None:
        super().__init__()
        self.guest.close()
        self.guest = Guest(QSIZE, MEM)
        self.device.on_checksum_offload = lambda takes: takes  # as cli.py wires it
        self.fe.start(self.guest, features)
        self.buf = buf
        for head in range(QSIZE):
            self.guest.set_desc(RX, head, self.addr(head), buf, DESC_F_WRITE)
            self.guest.offer(RX, head)
        self.fe.kick_queue(RX)
        self.host, self.tether_end = socket.socketpair()

    def addr(self, head: int) -> int:
        return BUF_BASE + head * self.buf

    def claim(self, total: int) -> tuple[list[memoryview], int]:
        views: list[memoryview] = []
        return views, self.device.claim(len(HEADERS), PAYLOAD_MAX, total, views)

    def receive(self, views: list[memoryview], data: bytes) -> int:
        """The host sends data; the kernel writes it into the claimed views."""
        self.host.sendall(data)
        got = self.tether_end.recvmsg_into(views)[0]
        views.clear()
        return got

    def frames(self) -> list[tuple[bytes, bytes, int]]:
        """What the guest reads: (virtio-net header, frame, buffers) per frame."""
        out = []
        used = self.guest.used(RX)
        while used:
            head, written = used.pop(0)
            first = self.guest.read(self.addr(head), written)
            count = struct.unpack_from("<H", first, 10)[0]
            data = first[HDR_LEN:]
            for _ in range(count - 1):
                head, written = used.pop(0)
                data += self.guest.read(self.addr(head), written)
            out.append((first[:HDR_LEN], data, count))
        return out

    def close(self) -> None:
        self.host.close()
        self.tether_end.close()
        super().close()


@pytest.fixture
def rig() -> Iterator[InPlaceRig]:
    r = InPlaceRig()
    yield r
    r.close()


def _buffers(payload: int) -> int:
    return -(-(HDR_LEN + len(HEADERS) + payload) // BUF)


def test_payloads_received_in_place_reach_the_guest_as_whole_frames(rig: InPlaceRig) -> None:
    views, claimed = rig.claim(25000)
    assert claimed == 25000
    # Adjacent buffers share one view: one per frame, so one recvmsg takes all three.
    assert len(views) == 3 and sum(len(v) for v in views) == 25000
    data = os.urandom(25000)
    assert rig.receive(views, data) == 25000
    for size in (10000, 10000, 5000):
        assert rig.device.commit(memoryview(HEADERS), size)
    rig.device.flush()
    assert rig.fe.called(RX)
    frames = rig.frames()
    assert [count for _, _, count in frames] == [_buffers(10000), _buffers(10000), _buffers(5000)]
    offset = 0
    for hdr, frame, _ in frames:
        flags, gso, _, _, csum_start, csum_offset = struct.unpack_from("<BBHHHH", hdr)
        assert (flags, gso, csum_start, csum_offset) == (1, 0, 34, 16)  # NEEDS_CSUM at TCP
        parsed = Ether(frame)
        assert parsed[TCP].dport == 40000
        payload = bytes(parsed[TCP].payload)
        assert payload == data[offset:offset + len(payload)]
        offset += len(payload)
    assert offset == 25000
    assert rig.device.stats()["rx_in_place"] == 3
    # The buffers after the last used one are the next frame's.
    assert rig.device.send_frame(HEADERS + b"next")
    rig.device.flush()
    (head, _), = rig.guest.used(RX)
    assert head == 2 * _buffers(10000) + _buffers(5000)


def test_a_short_read_ends_the_batch_and_leaves_later_buffers_available(
        rig: InPlaceRig) -> None:
    views, claimed = rig.claim(30000)
    assert claimed == 30000
    data = os.urandom(12000)
    assert rig.receive(views, data) == 12000
    assert rig.device.commit(memoryview(HEADERS), 10000)
    assert rig.device.commit(memoryview(HEADERS), 2000)  # partial: the last
    assert not rig.device.commit(memoryview(HEADERS), 1)
    rig.device.flush()
    frames = rig.frames()
    assert b"".join(bytes(Ether(f)[TCP].payload) for _, f, _ in frames) == data
    # Nothing was lost from the ring: a new claim starts at the first unused buffer.
    views, claimed = rig.claim(PAYLOAD_MAX)
    assert claimed == PAYLOAD_MAX
    assert rig.receive(views, b"z" * PAYLOAD_MAX) == PAYLOAD_MAX
    assert rig.device.commit(memoryview(HEADERS), PAYLOAD_MAX)
    rig.device.flush()
    (head, _), *_ = rig.guest.used(RX)
    assert head == _buffers(10000) + _buffers(2000)


def test_a_claim_across_the_end_of_the_ring_keeps_the_guests_order(rig: InPlaceRig) -> None:
    # 40 ordinary frames, their buffers posted again: the avail ring now wraps.
    for _ in range(40):
        assert rig.device.send_frame(HEADERS + b"x" * 3000)
    rig.device.flush()
    assert len(rig.frames()) == 40
    for head in range(40):
        rig.guest.offer(RX, head)
    views: list[memoryview] = []
    payload = 30000  # 8 buffers a frame: 40 for five, more than one read of heads
    claimed = rig.device.claim(len(HEADERS), payload, 5 * payload, views)
    assert claimed == 5 * payload
    data = os.urandom(claimed)
    assert rig.receive(views, data) == claimed
    for _ in range(5):
        assert rig.device.commit(memoryview(HEADERS), payload)
    rig.device.flush()
    frames = rig.frames()
    assert b"".join(bytes(Ether(f)[TCP].payload) for _, f, _ in frames) == data
    assert [count for _, _, count in frames] == [_buffers(payload)] * 5


def test_a_frame_sent_between_claim_and_commit_voids_the_claim(rig: InPlaceRig) -> None:
    views, claimed = rig.claim(PAYLOAD_MAX)
    assert claimed
    views.clear()
    frame = HEADERS + b"sent the ordinary way"
    assert rig.device.send_frame(frame)
    assert not rig.device.commit(memoryview(HEADERS), 100)
    rig.device.flush()
    assert [f for _, f, _ in rig.frames()] == [frame]


@pytest.mark.parametrize("bad", ["chained", "read-only", "outside memory", "zero length",
                                 "head out of range"])
def test_claim_stops_before_a_buffer_it_does_not_take(bad: str) -> None:
    rig = InPlaceRig()
    try:
        g = rig.guest
        k = _buffers(PAYLOAD_MAX) + 1  # the second buffer of the second frame
        if bad == "chained":
            g.set_desc(RX, k, rig.addr(k), BUF, DESC_F_WRITE | DESC_F_NEXT, k + 1)
        elif bad == "read-only":
            g.set_desc(RX, k, rig.addr(k), BUF, 0)
        elif bad == "outside memory":
            g.set_desc(RX, k, MEM - 100, BUF, DESC_F_WRITE)
        elif bad == "zero length":
            g.set_desc(RX, k, rig.addr(k), 0, DESC_F_WRITE)
        else:
            struct.pack_into("<H", g.mem, g.avail_gpa(RX) + 4 + 2 * k, QSIZE + 5)
        views, claimed = rig.claim(3 * PAYLOAD_MAX)
        assert claimed == PAYLOAD_MAX  # the first frame only
        assert rig.receive(views, b"a" * PAYLOAD_MAX) == PAYLOAD_MAX
        assert rig.device.commit(memoryview(HEADERS), PAYLOAD_MAX)
        rig.device.flush()
        assert len(rig.frames()) == 1
        # The ordinary path meets the bad buffer, drops it and counts it, or
        # (a chain is no crime) uses it: either way the device carries on.
        before = rig.device.stats()["bad_chains"]
        rig.device.send_frame(HEADERS + b"after")
        assert rig.device.stats()["bad_chains"] in (before, before + 1)
        assert rig.serves_an_honest_front_end(fresh=True)
    finally:
        rig.close()


def test_buffers_too_small_for_the_headers_are_not_claimed() -> None:
    rig = InPlaceRig(buf=HDR_LEN + len(HEADERS))
    try:
        assert rig.claim(PAYLOAD_MAX)[1] == 0
    finally:
        rig.close()


def test_no_claim_where_the_guest_does_not_complete_checksums() -> None:
    rig = InPlaceRig(features=p.OFFERED_FEATURES & ~(1 << p.F_NET_GUEST_CSUM))
    try:
        assert rig.claim(PAYLOAD_MAX)[1] == 0
    finally:
        rig.close()


def test_without_mergeable_buffers_each_frame_takes_one_buffer() -> None:
    rig = InPlaceRig(features=p.OFFERED_FEATURES & ~(1 << p.F_NET_MRG_RXBUF), buf=0x4000)
    try:
        views, claimed = rig.claim(3 * PAYLOAD_MAX)
        assert claimed == 3 * PAYLOAD_MAX and len(views) == 3
        data = os.urandom(claimed)
        assert rig.receive(views, data) == claimed
        for _ in range(3):
            assert rig.device.commit(memoryview(HEADERS), PAYLOAD_MAX)
        rig.device.flush()
        frames = rig.frames()
        assert [count for _, _, count in frames] == [1, 1, 1]
        assert b"".join(bytes(Ether(f)[TCP].payload) for _, f, _ in frames) == data
        # A frame larger than one buffer is not claimed at all.
        views = []
        assert rig.device.claim(len(HEADERS), 0x4000, 0x4000, views) == 0
        assert views == []
    finally:
        rig.close()


def _log_bit(log_map: mmap.mmap, gpa: int) -> bool:
    page = gpa // 4096
    return bool(log_map[page // 8] >> (page % 8) & 1)


def test_frames_received_in_place_are_in_the_dirty_log(rig: InPlaceRig) -> None:
    g, fe = rig.guest, rig.fe
    log_fd = os.memfd_create("log")
    log_size = MEM // 4096 // 8
    os.ftruncate(log_fd, log_size)
    log_map = mmap.mmap(log_fd, log_size)
    try:
        assert fe.call_u64(p.Request.SET_LOG_BASE, p.LOG_PARAMS.pack(log_size, 0),
                           [log_fd]) == 0
        fe.send(p.Request.SET_FEATURES, p.U64.pack(p.OFFERED_FEATURES | (1 << p.F_LOG_ALL)),
                flags=p.VERSION | p.FLAG_NEED_REPLY)
        assert p.U64.unpack(fe.reply(p.Request.SET_FEATURES))[0] == 0
        fe.set_addr(g, RX, p.VRING_F_LOG)
        views, claimed = rig.claim(2 * PAYLOAD_MAX)
        assert rig.receive(views, os.urandom(claimed)) == claimed
        assert rig.device.commit(memoryview(HEADERS), PAYLOAD_MAX)
        assert rig.device.commit(memoryview(HEADERS), PAYLOAD_MAX)
        rig.device.flush()
        used = 2 * _buffers(PAYLOAD_MAX)
        assert all(_log_bit(log_map, rig.addr(head)) for head in range(used))
        assert not _log_bit(log_map, rig.addr(used))
        assert _log_bit(log_map, g.used_gpa(RX))
    finally:
        log_map.close()
        os.close(log_fd)


def test_a_new_memory_table_voids_a_claim(rig: InPlaceRig) -> None:
    views, claimed = rig.claim(PAYLOAD_MAX)
    assert claimed
    views.clear()  # as the stack does before it returns to the loop
    region = p.MEM_REGION.pack(0, rig.guest.mem_size, 0x7F00_0000_0000, 0)
    rig.fe.send(p.Request.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + region,
                [rig.guest.fd])
    rig.fe.pump()
    assert not rig.device.commit(memoryview(HEADERS), 100)
    assert rig.device.send_frame(HEADERS + b"still served")


def test_frontend_helper_still_serves_plain_frames(rig: InPlaceRig) -> None:
    """The ordinary path is untouched where no claim is made."""
    assert rig.device.send_frame(HEADERS + b"plain")
    rig.device.flush()
    assert [f for _, f, _ in rig.frames()] == [HEADERS + b"plain"]
    assert isinstance(rig.port, RecordingPort) and isinstance(rig.fe, Frontend)


def _completed_checksum(frame: Packet) -> int:
    """What the guest makes of a NEEDS_CSUM frame: the one's complement of the
    sum from the TCP header on, the field holding the pseudo-header sum."""
    segment = bytes(frame[TCP])
    if len(segment) % 2:
        segment += b"\0"
    total: int = sum(struct.unpack(f"!{len(segment) // 2}H", segment))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _scapy_checksum(frame: Packet) -> int:
    """scapy's own checksum of the same segment, as the oracle."""
    again = frame[IP].copy()
    del again[TCP].chksum
    return int(IP(bytes(again))[TCP].chksum)


@pytest.fixture
def stack_rig() -> Iterator[StackRig]:
    ns = make_netns("tinp")
    try:
        with inside(f"/run/netns/{ns.name}"):
            r = StackRig(ns)
            # What cli.py's checksum_offload does once the guest takes partial sums.
            r.device.datapath.partial_checksums = True
            r.stack.output.partial_l4_checksums = True
            try:
                yield r
            finally:
                r.close()
    finally:
        delete_netns(ns)


@pytest.mark.root
def test_bulk_host_data_reaches_the_guest_byte_for_byte_received_in_place(
        stack_rig: StackRig) -> None:
    rig = stack_rig
    data = os.urandom(600_000)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        peer, ours = outbound(rig, listener)
        with peer:
            peer.setblocking(False)
            port = listener.getsockname()[1]
            sent = 0
            got = bytearray()
            deadline = rig.loop.now() + 20
            while len(got) < len(data):
                assert rig.loop.now() < deadline, f"{len(got)} of {len(data)} bytes arrived"
                if sent < len(data):
                    with contextlib.suppress(BlockingIOError):
                        sent += peer.send(data[sent:sent + 65536])
                rig.one_pass(0.01)
                before = len(got)
                for frame in rig.received:
                    if TCP in frame and bytes(frame[TCP].payload):
                        assert frame[TCP].seq == (ours + len(got)) & 0xFFFFFFFF
                        assert _completed_checksum(frame) == _scapy_checksum(frame)
                        got += bytes(frame[TCP].payload)
                rig.received.clear()
                if len(got) > before:  # the guest acknowledges what it has
                    rig.tcp(port, "A", 1001, (ours + len(got)) & 0xFFFFFFFF)
    assert bytes(got) == data
    stats = rig.device.stats()
    assert stats["rx_in_place"] > 0 and stats["rx_dropped"] == 0
