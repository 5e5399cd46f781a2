"""tcp_core without sockets or root: a connection driven by frames, timers and a clock.

The host side is a byte buffer (`BufferConn`), the loop a fake clock, and the
frames in both directions are built and read by scapy, not by tether's own
builder, so the tests check the wire and not tether against itself.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from tether import loop as evloop
from tether.net import tcp_core
from tether.net.context import RoomWaiter
from tether.net.flows import FlowTable
from tether.net.output import Output
from tether.net.params import NetParams
from tether.net.tcp_core import TcpConn, TcpShared
from tether.net.tcp_record import SYN_ACK_SENT_OR_SOCK_FIN_RCVD, TcpFlowRecord
from tether.net.tcp_state import (
    ESTABLISHED,
    PEEK_NOTHING,
    SOCK_FIN_RCVD,
    TAP_FIN_SENT,
    describe,
    from_wire,
    to_wire,
)
from tether.wire import tcp as wtcp

GUEST, REMOTE = "10.77.0.2", "93.184.216.34"
GPORT, RPORT = 40000, 80
GUEST_ISN = 1000
GUEST_MSS = 1000
WINDOW = 0xFFFF


class FakeLoop(evloop.Loop):
    """The loop's timers on a clock that moves only when told (tcp_core uses no more)."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = 0.0
        self._fake_timers: list[tuple[float, int, evloop.Timer]] = []
        self._seq = itertools.count()
        self.soon: list[Callable[[], None]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> evloop.Timer:
        timer = evloop.Timer(self.clock + delay, callback)
        heapq.heappush(self._fake_timers, (timer.deadline, next(self._seq), timer))
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self.soon.append(callback)

    def advance(self, seconds: float) -> None:
        """Move the clock, firing each timer due on the way at its own time."""
        end = self.clock + seconds
        while self._fake_timers and self._fake_timers[0][0] <= end:
            deadline, _, timer = heapq.heappop(self._fake_timers)
            self.clock = max(self.clock, deadline)
            if not timer.cancelled:
                timer.cancelled = True
                timer.callback()
        self.clock = end

    def pending(self) -> int:
        return sum(not t.cancelled for _, _, t in self._fake_timers)


class FakeContext:
    """net.context.NetContext with a recording sink: what tcp_core needs of a stack."""

    def __init__(self) -> None:
        self.clock = FakeLoop()
        self.loop: evloop.Loop = self.clock
        self.params = NetParams(addr4=socket.inet_aton(GUEST), prefix4=24,
                                gateway4=socket.inet_aton("10.77.0.1"))
        self.flows = FlowTable(16)
        self.output = Output(self.params.our_mac)
        self.output.guest_mac = b"\x02\x00\x00\x00\x00\x01"
        self.sent: list[bytes] = []
        self.room = True
        self.waiting: list[RoomWaiter] = []

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        self.sent.append(bytes(frame))
        return True

    def has_room(self) -> bool:
        return self.room

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        return 0  # frames go through send(); in-place receive is tested in tests/vhost_user

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        raise AssertionError("nothing was claimed")

    def wait_for_room(self, waiter: RoomWaiter) -> None:
        self.waiting.append(waiter)

    def forget_waiting(self) -> None:
        self.waiting.clear()

    def host_target(self, dst: bytes, port: int) -> str | None:
        return socket.inet_ntoa(dst)

    def outbound_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        raise AssertionError("tcp_core opens no sockets")

    def guest_view_of(self, host_addr: str) -> bytes:
        return socket.inet_aton(host_addr)

    def guest_addr_for(self, family: int, remote: bytes = b"") -> bytes | None:
        return socket.inet_aton(GUEST)


class BufferConn(TcpConn):
    """tcp_core's host-side hooks on two byte buffers instead of a socket."""

    __slots__ = (
        "from_host",
        "host_eof",
        "host_reset",
        "host_room",
        "host_shut",
        "peek_off",
        "to_host",
        "watching",
    )

    def __init__(self, shared: TcpShared) -> None:
        super().__init__(shared, (6, socket.inet_aton(GUEST), GPORT, socket.inet_aton(REMOTE),
                                  RPORT))
        self.from_host = bytearray()  # the socket's receive queue
        self.peek_off = 0
        self.host_eof = False
        self.to_host = bytearray()  # what the socket took
        self.host_room = 1 << 30
        self.host_shut = False
        self.host_reset = False
        self.watching = False

    def host_closes(self) -> None:
        """The host peer's FIN is queued, and its socket said so (a hangup event)."""
        self.host_eof = True
        self.host_readable(hangup=True)

    def _peek(self, into: memoryview, want: int) -> int:
        chunk = self.from_host[self.peek_off:self.peek_off + want]
        if not chunk:
            return 0 if self.host_eof else PEEK_NOTHING
        into[:len(chunk)] = chunk
        self.peek_off += len(chunk)
        return len(chunk)

    def _peek_from_head(self) -> bool:
        self.peek_off = 0
        return True

    def _consume(self, n: int) -> bool:
        del self.from_host[:n]
        self.peek_off = max(self.peek_off - n, 0)
        return True

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        n = min(len(data), self.host_room)
        self.to_host += data[:n]
        self.host_room -= n
        return n

    def _free_window(self) -> int:
        return min(max(self.host_room, 0) >> self.ws_to_tap, 0xFFFF)

    def _watch_writable(self, on: bool) -> None:
        self.watching = on

    def _shutdown_write(self) -> None:
        self.host_shut = True

    def _reset_host(self) -> None:
        self.host_reset = True

    def close(self) -> None:
        self.closed = True
        self.stop_timers()


class Rig:
    """One outbound connection: the guest connected to REMOTE:RPORT through tcp_core."""

    def __init__(self, ctx: FakeContext | None = None,
                 conn_class: type[BufferConn] | None = None) -> None:
        self.ctx = ctx or FakeContext()
        self.shared = TcpShared(self.ctx)
        self.conn = (conn_class or BufferConn)(self.shared)
        self.ctx.flows.add(self.conn)
        self.guest_seq = GUEST_ISN + 1
        syn = self.segment(flags="S", seq=GUEST_ISN, options=[("MSS", GUEST_MSS)])
        hdr = wtcp.parse(syn)
        self.conn.guest_syn(hdr, wtcp.parse_syn_options(syn[wtcp.HLEN:hdr.header_len]))
        self.conn.host_connected()  # the host socket connected
        syn_ack = self.take()[0]
        assert syn_ack.flags == "SA" and syn_ack.ack == GUEST_ISN + 1
        self.isn = syn_ack.seq
        self.host_acked = self.isn + 1  # what the guest acknowledged of ours
        self.feed(flags="A", ack=self.host_acked)
        assert self.conn.events & ESTABLISHED

    def segment(self, flags: str, seq: int | None = None, ack: int = 0, payload: bytes = b"",
                *, window: int = WINDOW, options: list[tuple[str, int]] | None = None,
                ) -> memoryview:
        """A guest segment as scapy builds it: the TCP header and payload."""
        pkt = IP(src=GUEST, dst=REMOTE) / TCP(
            sport=GPORT, dport=RPORT, seq=self.guest_seq if seq is None else seq,
            ack=ack, flags=flags, window=window, options=options or [])
        if payload:
            pkt = pkt / Raw(payload)
        raw = bytes(pkt)
        return memoryview(raw)[IP(raw).ihl * 4:]

    def feed(self, flags: str = "A", payload: bytes = b"", seq: int | None = None,
             ack: int | None = None, window: int = WINDOW) -> None:
        """One guest segment, then the end of its batch (as Stack.frames_from_guest)."""
        seg = self.segment(flags, seq, self.host_acked if ack is None else ack, payload,
                           window=window)
        hdr = wtcp.parse(seg)
        self.conn.segment(hdr, seg, seg[hdr.header_len:])
        if seq is None:
            self.guest_seq += len(payload) + ("F" in flags)
        self.shared.end_of_batch()

    def take(self) -> list[TCP]:
        """The segments sent to the guest since last time, parsed by scapy."""
        out = []
        for frame in self.ctx.sent:
            pkt = Ether(frame)
            assert IP in pkt and TCP in pkt, pkt.summary()
            ip = pkt[IP]
            check_sums(ip)
            assert ip.src == REMOTE and ip.dst == GUEST
            out.append(pkt[TCP])
        self.ctx.sent.clear()
        return out


def check_sums(ip: IP) -> None:
    """The IP and TCP checksums as a receiver checks them: scapy computes them afresh."""
    fresh = ip.copy()
    fresh.chksum = None
    fresh[TCP].chksum = None
    again = IP(bytes(fresh))
    assert (ip.chksum, ip[TCP].chksum) == (again.chksum, again[TCP].chksum)


def data(tcp: TCP) -> bytes:
    return bytes(tcp[Raw].load) if Raw in tcp else b""


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.ctx.loop.close()


# -- delayed ACK ---------------------------------------------------------------

def test_a_short_segment_is_acked_after_the_delay_not_at_once(rig: Rig) -> None:
    rig.feed("PA", b"q" * 100)
    assert rig.take() == []  # not within the batch
    rig.ctx.clock.advance(tcp_core.DELAYED_ACK)
    acks = rig.take()
    assert len(acks) == 1 and acks[0].flags == "A" and data(acks[0]) == b""
    assert acks[0].ack == GUEST_ISN + 1 + 100
    assert rig.shared.delayed_acks == 1
    assert bytes(rig.conn.to_host) == b"q" * 100


def test_a_nagle_bound_guest_gets_its_ack_within_the_delay(rig: Rig) -> None:
    """Nagle (RFC 9293 section 3.7.4) holds a small tail until everything before
    it is acknowledged: the ACK must come within DELAYED_ACK, however short."""
    for i in range(20):
        rig.feed("PA", bytes([i]) * 10)
        rig.ctx.clock.advance(tcp_core.DELAYED_ACK)
        (ack,) = rig.take()
        assert ack.ack == rig.guest_seq  # all of it: the guest may send its next tail
    assert tcp_core.DELAYED_ACK <= 0.04  # never longer than Linux's shortest delay


def test_two_full_segments_are_acked_in_their_batch(rig: Rig) -> None:
    full = rig.conn.mss_to_guest
    rig.feed("A", b"a" * full)
    assert rig.take() == []
    rig.feed("A", b"b" * full)
    (ack,) = rig.take()  # at the end of the second batch, no timer needed
    assert ack.ack == GUEST_ISN + 1 + 2 * full
    rig.ctx.clock.advance(tcp_core.DELAYED_ACK)
    assert rig.take() == []  # the timer found the ACK already sent
    assert rig.shared.delayed_acks == 0


def test_data_to_the_guest_carries_the_ack_and_saves_the_delayed_one(rig: Rig) -> None:
    rig.feed("PA", b"ping")
    rig.conn.from_host += b"pong"
    rig.conn.push()
    (reply,) = rig.take()
    assert data(reply) == b"pong" and reply.ack == rig.guest_seq
    rig.ctx.clock.advance(tcp_core.DELAYED_ACK)
    assert rig.take() == []


# -- pending: guest data the host had no room for --------------------------------

def test_data_the_host_cannot_take_is_held_unacknowledged_then_written(rig: Rig) -> None:
    rig.conn.host_room = 600
    rig.feed("A", b"1" * 1000)
    (ack,) = rig.take()
    assert ack.ack == GUEST_ISN + 1 + 600  # only what the host took
    assert ack.window == 0  # and no room for more
    assert rig.conn.watching and rig.shared.socket_full == 1
    rig.feed("PA", b"2" * 500)  # in order behind what is held: held too, not acked
    assert rig.take() == []
    assert bytes(rig.conn.pending) == b"1" * 400 + b"2" * 500

    rig.conn.host_room = 10_000
    rig.conn.host_writable()
    (ack,) = rig.take()
    assert ack.ack == GUEST_ISN + 1 + 1500 and ack.window > 0
    assert bytes(rig.conn.to_host) == b"1" * 1000 + b"2" * 500
    assert not rig.conn.watching and not rig.conn.pending


def test_held_data_is_bounded_and_what_is_beyond_is_dropped(rig: Rig) -> None:
    rig.conn.host_room = 0
    rig.feed("A", b"x" * 1000)
    rig.take()
    chunk = b"y" * 60_000
    while len(rig.conn.pending) + len(chunk) <= tcp_core.PENDING_MAX:
        rig.feed("A", chunk)
    held = len(rig.conn.pending)
    rig.feed("A", chunk)  # over the bound: dropped, the guest sends it again
    assert len(rig.conn.pending) == held
    assert rig.conn.seq_from_tap == GUEST_ISN + 1  # nothing acknowledged


def test_a_fin_behind_held_data_waits_for_it(rig: Rig) -> None:
    rig.conn.host_room = 100
    rig.feed("A", b"d" * 300)
    rig.take()
    rig.feed("FA", b"e" * 10)
    assert not rig.conn.host_shut
    rig.conn.host_room = 1000
    rig.conn.host_writable()
    assert rig.conn.host_shut and bytes(rig.conn.to_host) == b"d" * 300 + b"e" * 10
    (ack,) = rig.take()
    assert ack.ack == GUEST_ISN + 1 + 310 + 1  # the FIN takes a sequence number


# -- rewind and seq_recover ----------------------------------------------------------

def fill(rig: Rig, n: int) -> list[TCP]:
    rig.conn.from_host += bytes(i & 0xFF for i in range(n))
    rig.conn.push()
    return rig.take()


def test_a_timeout_rewinds_to_the_last_ack_and_sends_the_same_bytes(rig: Rig) -> None:
    sent = fill(rig, 3000)
    assert [len(data(s)) for s in sent] == [GUEST_MSS] * 3
    rig.host_acked = rig.isn + 1 + 1000
    rig.feed("A")  # the guest got the first segment only
    assert rig.take() == []
    rig.ctx.clock.advance(tcp_core.ACK_TIMEOUT)
    again = rig.take()
    assert rig.shared.rewinds == 1
    assert [s.seq for s in again] == [s.seq for s in sent[1:]]
    assert [data(s) for s in again] == [data(s) for s in sent[1:]]


def test_three_duplicate_acks_rewind_once_per_window(rig: Rig) -> None:
    sent = fill(rig, 3000)
    for _ in range(3):
        rig.feed("A")  # duplicate ACKs of the SYN|ACK: the first segment was lost
    assert rig.shared.rewinds == 1  # fast retransmit
    again = rig.take()
    assert [s.seq for s in again] == [s.seq for s in sent]
    # The guest answers each segment sent again with another duplicate ACK:
    # inside the window being recovered they start no second rewind.
    for _ in range(6):
        rig.feed("A")
    assert rig.shared.rewinds == 1
    assert rig.conn.seq_recover == rig.isn + 1 + 3000


def test_an_ack_beyond_a_rewind_is_valid_and_skips_what_the_guest_has(rig: Rig) -> None:
    fill(rig, 3000)
    rig.host_acked = rig.isn + 1 + 1000
    rig.feed("A", window=1000)  # and the guest's window shrinks to one segment
    rig.ctx.clock.advance(tcp_core.ACK_TIMEOUT)
    (again,) = rig.take()  # rewound to 1000; the window lets one segment go
    assert again.seq == rig.isn + 1 + 1000
    assert rig.conn.seq_to_tap == rig.isn + 1 + 2000
    assert rig.conn.seq_recover == rig.isn + 1 + 3000  # where the rewind came from
    # The guest had it all before: acknowledging 3000 is beyond seq_to_tap but
    # not beyond seq_recover, so it counts, and nothing is sent a third time.
    rig.host_acked = rig.isn + 1 + 3000
    rig.feed("A")
    assert rig.conn.seq_ack_from_tap == rig.conn.seq_to_tap == rig.isn + 1 + 3000
    assert rig.conn.from_host == b""  # all of it consumed
    assert rig.take() == []
    assert rig.ctx.clock.pending() == 0  # nothing in flight: no retransmission timer
    assert fill(rig, 10)[0].seq == rig.isn + 1 + 3000


def test_an_ack_from_the_future_is_ignored(rig: Rig) -> None:
    fill(rig, 1000)
    rig.host_acked = rig.isn + 1 + 5000
    rig.feed("A")
    assert rig.conn.seq_ack_from_tap == rig.isn + 1  # RFC 9293 section 3.10.7.4
    assert len(rig.conn.from_host) == 1000


def test_a_fin_lost_is_sent_again_after_the_data(rig: Rig) -> None:
    rig.conn.from_host += b"z" * 500
    rig.conn.host_closes()  # the data, short of a segment: the next push finds the end
    rig.conn.push()
    seg, fin = rig.take()
    assert data(seg) == b"z" * 500 and fin.flags == "FA" and fin.seq == seg.seq + 500
    assert rig.conn.events & TAP_FIN_SENT and rig.conn.events & SOCK_FIN_RCVD
    rig.ctx.clock.advance(tcp_core.ACK_TIMEOUT)  # neither arrived
    (seg2,) = rig.take()
    assert (seg2.seq, data(seg2)) == (seg.seq, data(seg))
    assert not rig.conn.events & TAP_FIN_SENT  # the FIN goes again after the data
    rig.host_acked = seg.seq + 500
    rig.feed("A")
    (fin2,) = rig.take()
    assert fin2.flags == "FA" and fin2.seq == fin.seq


def test_a_guest_that_stops_answering_is_reset(rig: Rig) -> None:
    fill(rig, 100)
    for _ in range(tcp_core.MAX_RETRIES + 1):
        rig.ctx.clock.advance(tcp_core.ACK_TIMEOUT * 16)
    assert rig.take()[-1].flags == "RA"
    assert rig.conn.closed and len(rig.ctx.flows) == 0


def test_the_guest_queue_full_makes_the_connection_wait(rig: Rig) -> None:
    rig.ctx.room = False
    rig.conn.from_host += b"w" * 100
    rig.conn.push()
    assert rig.take() == [] and rig.ctx.waiting == [rig.conn]
    rig.ctx.room = True
    rig.conn.room_available()
    assert data(rig.take()[0]) == b"w" * 100


# -- the state vocabulary --------------------------------------------------------------

def test_every_event_change_is_logged_by_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="tether.net.tcp_state"):
        Rig().ctx.loop.close()
    said = [r.getMessage() for r in caplog.records]
    assert any("CLOSED -> TAP_SYN_RCVD" in s for s in said), said
    assert any("TAP_SYN_RCVD|TAP_SYN_ACK_SENT -> ESTABLISHED" in s for s in said), said


def test_the_two_meanings_of_0x08_fold_into_the_record_and_back(rig: Rig) -> None:
    rig.conn.host_closes()
    record = rig.conn.record((bytes(16), bytes(16), 0, 0))
    assert record.events & SYN_ACK_SENT_OR_SOCK_FIN_RCVD  # passt's SOCK_FIN_RCVD
    assert record.events == to_wire(rig.conn.events) and record.events < 0x100
    assert from_wire(record.events) == rig.conn.events
    assert TcpFlowRecord.unpack(record.pack()) == record
    assert describe(rig.conn.events) == "ESTABLISHED|SOCK_FIN_RCVD|TAP_FIN_SENT"
    # Before ESTABLISHED, 0x08 is TAP_SYN_ACK_SENT and stays what it is.
    assert from_wire(0x02 | 0x08) == 0x02 | 0x08


# -- in place: payloads peeked straight into claimed guest buffers ----------------

FRAMES_PER_CLAIM = 8  # as the vhost-user device plans them (datapath.CLAIM_FRAMES)


class InPlaceContext(FakeContext):
    """A sink that offers claim(), as the vhost-user device does: room for
    `frames_free` frames, a view per frame's payload, up to FRAMES_PER_CLAIM
    frames a claim; commit() takes the claimed frames in order.  The real
    device's claims are tested in tests/vhost_user/test_in_place.py; here the
    batches are exact, so what each push asks of the socket can be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.output.in_place = True
        self.frames_free = 1 << 20
        self.planned: list[memoryview] = []
        self.planned_bytes = 0  # all claims together, used or not
        self.committed: list[tuple[TCP, bytes]] = []

    def has_room(self) -> bool:
        return self.frames_free > 0

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        self.planned = []
        planned = 0
        while (planned < total
               and len(self.planned) < min(FRAMES_PER_CLAIM, self.frames_free)):
            view = memoryview(bytearray(min(payload_max, total - planned)))
            self.planned.append(view)
            views.append(view)
            planned += len(view)
        self.planned_bytes += planned
        return planned

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        view = self.planned.pop(0)
        self.frames_free -= 1
        # The headers hold a partial checksum (the guest completes it): read, not checked.
        self.committed.append((Ether(bytes(headers))[TCP], bytes(view[:payload_len])))
        return True


class InPlaceConn(BufferConn):
    """BufferConn with the in-place hooks, counting how often it is asked
    what the socket holds (SIOCINQ, a system call on a real socket)."""

    __slots__ = ("unread_asked",)

    def __init__(self, shared: TcpShared) -> None:
        super().__init__(shared)
        self.unread_asked = 0

    def _unread(self) -> int:
        self.unread_asked += 1
        return len(self.from_host)

    def _peek_into(self, views: list[memoryview]) -> int:
        got = 0
        for view in views:
            chunk = self.from_host[self.peek_off:self.peek_off + len(view)]
            view[:len(chunk)] = chunk
            self.peek_off += len(chunk)
            got += len(chunk)
        if got == 0:
            return 0 if self.host_eof else PEEK_NOTHING
        return got


def test_a_bulk_transfer_asks_what_the_socket_holds_once_per_burst_not_per_claim() -> None:
    ctx = InPlaceContext()
    rig = Rig(ctx, InPlaceConn)
    ctx.output.partial_l4_checksums = True  # claims need them (Stack.claim)
    conn = rig.conn
    assert isinstance(conn, InPlaceConn)
    conn.unread_asked = 0  # the handshake's push looked once, for nothing
    burst = os.urandom(50 * GUEST_MSS + 123)
    ctx.frames_free = 20  # the guest posted buffers for 20 frames only
    conn.from_host += burst
    conn.push()
    assert len(ctx.committed) == 20 and ctx.waiting == [conn]
    # The guest takes them, acknowledges them and posts buffers for 40 more:
    # the socket is known to hold more, so the claims follow the window, and
    # the last, short peek wastes one claim's buffers at most.
    ctx.frames_free = 40
    ctx.waiting.clear()
    rig.feed("A", ack=rig.isn + 1 + 20 * GUEST_MSS)
    assert len(ctx.committed) == 51
    assert ctx.planned_bytes - len(burst) < FRAMES_PER_CLAIM * GUEST_MSS
    # A new, small burst: the socket is asked again, and the claim is exact.
    conn.from_host += b"0123456789"
    conn.push()
    assert conn.unread_asked == 2
    assert ctx.planned_bytes - len(burst) - 10 < FRAMES_PER_CLAIM * GUEST_MSS
    segments = ctx.committed
    seq = rig.isn + 1
    for tcp, payload in segments:
        assert tcp.seq == seq & 0xFFFFFFFF
        seq += len(payload)
    assert b"".join(payload for _, payload in segments) == burst + b"0123456789"
    # PSH where the socket ran dry: the end of each burst, and only there.
    assert [i for i, (tcp, _) in enumerate(segments) if "P" in tcp.flags] == [50, 51]
    rig.ctx.loop.close()


class CountingConn(BufferConn):
    """BufferConn counting its peeks (each a system call on a real socket)."""

    __slots__ = ("peeks",)

    def __init__(self, shared: TcpShared) -> None:
        super().__init__(shared)
        self.peeks = 0

    def _peek(self, into: memoryview, want: int) -> int:
        self.peeks += 1
        return super()._peek(into, want)


def test_an_ack_after_the_host_ran_dry_peeks_no_more_until_it_has_news() -> None:
    rig = Rig(conn_class=CountingConn)
    conn = rig.conn
    assert isinstance(conn, CountingConn)
    conn.from_host += b"answer"
    conn.host_readable(hangup=False)
    (answer,) = rig.take()
    assert data(answer) == b"answer" and "P" in answer.flags
    # The guest's next request acknowledges the answer: the socket gave all
    # it had and said nothing since, so there is nothing to look for.
    peeks = conn.peeks
    rig.host_acked = answer.seq + len(b"answer")
    rig.feed("PA", b"request")
    assert conn.peeks == peeks and conn.to_host == bytearray(b"request")
    # The next answer comes with its read event, and the FIN after it with
    # a hangup: both reach the guest, the FIN on the ACK of the data.
    conn.from_host += b"again"
    conn.host_readable(hangup=False)
    (again,) = rig.take()
    assert data(again) == b"again"
    conn.host_closes()
    rig.host_acked = again.seq + len(b"again")
    rig.feed("A")
    assert [seg.flags for seg in rig.take()] == ["FA"]
    rig.ctx.loop.close()
