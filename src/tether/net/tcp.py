"""TCP translation: the guest's TCP connection ends here and continues as a host socket.

tether speaks TCP to the guest itself and uses an ordinary kernel socket towards
the host, as passt does:

* guest -> host: in-order payload is written to the socket at once and only the
  bytes the socket took are acknowledged, so nothing the guest believes delivered
  can be lost; the window offered to the guest is the socket's free send space.
* host -> guest: data is read with MSG_PEEK at SO_PEEK_OFF and stays in the
  socket's receive queue until the guest acknowledges it; only then is it
  consumed.  Retransmission rewinds the peek offset, so tether keeps no copy.

Sequence-number state mirrors passt's `struct tcp_tap_conn`, so a flow can be
dumped as passt's per-flow migration record (reference/passt-migration.md 2.5).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import socket
import struct
from typing import TYPE_CHECKING

from tether import loop as evloop
from tether.net.flows import FlowKey, TableFull
from tether.net.output import l4_offset
from tether.net.tcp_record import (
    ESTABLISHED,
    PIF_HOST,
    PIF_TAP,
    SOCK_ACCEPTED,
    SOCK_FIN_SENT,
    SYN_ACK_SENT_OR_SOCK_FIN_RCVD,
    TAP_FIN_ACKED,
    TAP_FIN_RCVD,
    TAP_FIN_SENT,
    TAP_SYN_RCVD,
    TcpFlowRecord,
)
from tether.ratelimit import limited
from tether.wire import ipv4
from tether.wire import tcp as wtcp

if TYPE_CHECKING:
    from tether.net.stack import Stack

# ESTABLISHED too: tests read it here, next to the timeouts they shorten.
__all__ = ["ACK_TIMEOUT", "CONNECT_TIMEOUT", "ESTABLISHED", "MAX_RETRIES", "SYN_TIMEOUT",
           "TcpConn", "TcpTranslator"]

log = logging.getLogger(__name__)

# The record's names for passt's 0x08, by its two meanings.
TAP_SYN_ACK_SENT = SYN_ACK_SENT_OR_SOCK_FIN_RCVD  # before ESTABLISHED
SOCK_FIN_RCVD = SYN_ACK_SENT_OR_SOCK_FIN_RCVD  # after ESTABLISHED

ACK_TIMEOUT = 1.0  # seconds before unacknowledged data is sent again
# Guest data short of two full segments is acknowledged within this (RFC 9293
# section 3.8.6.3 allows 0.5 s; Linux waits at least 40 ms): short, because a
# guest whose Nagle holds back a small tail waits for this ACK.
DELAYED_ACK = 0.001
# Options a guest data segment may carry beyond what our MSS counts: still "full-sized".
_SEGMENT_OPTIONS = 40
SNDBUF_REFRESH = 64  # windows computed between two reads of SO_SNDBUF
SYN_TIMEOUT = 3.0
CONNECT_TIMEOUT = 10.0  # a host-side connect with no answer gives its flow back (passt: 10 s)
MAX_RETRIES = 6
WS_TO_GUEST = 8
DEFAULT_GUEST_MSS = 536  # RFC 9293 section 3.7.1, when the SYN carries none
_SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
_SIOCOUTQ = 0x5411
# Largest payloads when the transport segments for us: what fits the IP length fields.
_GSO_PAYLOAD_V4 = 0xFFFF - ipv4.HLEN - wtcp.HLEN
_GSO_PAYLOAD_V6 = 0xFFFF - wtcp.HLEN
WINDOW_FLOOR = 1 << 20
PENDING_MAX = 2 << 20
_DISCARD = bytearray(1 << 20)  # MSG_TRUNC target: the kernel copies nothing into it
_OUTQ = bytearray(4)
# seq, ack, data offset, flags, window: the fields of a pure ACK that change
# (wire/tcp.py's header from byte 4, RFC 9293 section 3.1).
_ACK_FIELDS = struct.Struct("!IIBBH")


def _unscaled_syn_window(window: int, shift: int) -> int:
    """A SYN's window in the units of the connection's later segments.

    RFC 7323 section 2.2: the window of a SYN or SYN|ACK is never scaled.
    Stored as it came and shifted later, a 64 KiB window became 8 MiB; the
    guest dropped what lay beyond its real window, and the connection
    waited a whole retransmission timeout for its first data.  Rounding
    down keeps us inside what the guest offered.
    """
    return window >> shift


def _seq_diff(a: int, b: int) -> int:
    """a - b in sequence space, as a signed 32-bit value (RFC 9293 section 3.4)."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def _mapped(addr: bytes) -> bytes:
    """passt's `union inany_addr`: IPv6 as is, IPv4 as ::ffff:a.b.c.d."""
    return addr if len(addr) == 16 else bytes(10) + b"\xff\xff" + addr


def _unmapped(addr: bytes) -> bytes:
    return addr[12:] if addr[:12] == bytes(10) + b"\xff\xff" else addr


def _sockaddr_side(sock: socket.socket) -> tuple[bytes, bytes, int, int]:
    """The host side of a flow as a flowside: (our address, peer address, ports)."""
    family = sock.family
    local = sock.getsockname()
    peer = sock.getpeername()
    return (_mapped(socket.inet_pton(family, local[0])),
            _mapped(socket.inet_pton(family, peer[0])), local[1], peer[1])


class TcpConn:
    __slots__ = (
        "ack_frame",
        "ack_mac",
        "ack_timer",
        "dup_acks",
        "events",
        "fd",
        "flow_ack_due",
        "guest_addr",
        "guest_port",
        "key",
        "mss_to_guest",
        "payload_off",
        "pending",
        "pending_fin",
        "remote_addr",
        "remote_port",
        "retries",
        "seq_ack_from_tap",
        "seq_ack_to_tap",
        "seq_from_tap",
        "seq_init_from_tap",
        "seq_recover",
        "seq_to_tap",
        "sndbuf",
        "sndbuf_age",
        "sock",
        "sock_blocked",
        "tap_mss",
        "timer",
        "translator",
        "wnd_from_tap",
        "wnd_to_tap",
        "ws_from_tap",
        "ws_to_tap",
    )

    def __init__(self, translator: TcpTranslator, key: FlowKey, sock: socket.socket) -> None:
        self.translator = translator
        self.key = key
        _, self.guest_addr, self.guest_port, self.remote_addr, self.remote_port = key
        self.sock = sock
        self.fd = sock.fileno()
        # Where segment payload starts in a frame to the guest, and the MSS we offer.
        self.payload_off = l4_offset(self.guest_addr) + wtcp.HLEN
        self.mss_to_guest = translator.mss_to_guest[len(self.guest_addr)]
        self.events = 0
        # The initial sequence number is seq_to_tap - 1: the SYN takes one number.
        self.seq_to_tap = (random.getrandbits(32) + 1) & 0xFFFFFFFF
        self.seq_ack_from_tap = self.seq_to_tap
        # Where the last rewind went back from: data up to here may already be
        # with the guest, so its ACKs for it are valid although seq_to_tap is
        # behind, and its duplicate ACKs for our own resent data start no new rewind.
        self.seq_recover = self.seq_to_tap
        self.seq_from_tap = 0
        self.seq_ack_to_tap = 0
        self.seq_init_from_tap = 0
        self.wnd_from_tap = 0
        self.wnd_to_tap = 0
        self.ws_from_tap = 0
        self.ws_to_tap = 0
        self.tap_mss = DEFAULT_GUEST_MSS
        self.retries = 0
        self.dup_acks = 0
        self.sock_blocked = False
        self.flow_ack_due = False
        # Guest data the socket had no room for, not yet acked: a bytearray of its
        # own from the first time the socket is full, until then no object at all
        # (memory per flow: bench/bench_flow_memory.py).
        self.pending: bytes | bytearray = b""
        self.pending_fin = False
        self.timer: evloop.Timer | None = None
        # A pure ACK to the guest, built once: with the L4 checksum left to the
        # guest's device, only seq, ack, flags and window change between two.
        self.ack_frame: bytearray | None = None
        self.ack_mac = b""  # the guest MAC ack_frame was built for
        self.ack_timer: evloop.Timer | None = None
        self.sndbuf = 0
        self.sndbuf_age = 0  # windows computed since sndbuf was read; 0: read it now

    def on_socket_event(self, events: int) -> None:
        """The loop's handler for this connection's socket: a bound method rather
        than a closure per connection, which would cost three objects more."""
        self.translator.socket_event(self, events)

    def close(self) -> None:
        self.stop_timers()
        self.translator.stack.loop.remove(self.fd)
        self.sock.close()

    def stop_timers(self) -> None:
        """Cancel retransmission and delayed ACK: nothing more goes to the guest."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    def record(self) -> TcpFlowRecord:
        """passt's flowside is (oaddr, eaddr, oport, eport): "o" is our end of that side,
        "e" the endpoint's.  On the guest side our end is the address the guest talks to."""
        guest = (_mapped(self.remote_addr), _mapped(self.guest_addr), self.remote_port,
                 self.guest_port)
        try:
            host = _sockaddr_side(self.sock)
        except OSError:
            host = (bytes(16), bytes(16), 0, 0)  # the peer is gone; the record still stands
        inbound = bool(self.events & SOCK_ACCEPTED)
        pif = (PIF_HOST, PIF_TAP) if inbound else (PIF_TAP, PIF_HOST)
        sides = (host, guest) if inbound else (guest, host)
        return TcpFlowRecord(pif, sides, self.retries, self.ws_from_tap, self.ws_to_tap,
                             self.events, self.tap_mss, 0, 0, 0, self.wnd_from_tap,
                             self.wnd_to_tap, self.seq_to_tap, self.seq_ack_from_tap,
                             self.seq_from_tap, self.seq_ack_to_tap, self.seq_init_from_tap)


class TcpTranslator:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.conns: dict[int, TcpConn] = {}  # by socket fd
        # The MSS offered to the guest, by address length: one int for all flows.
        self.mss_to_guest = {size: stack.params.mtu - (l4_offset(bytes(size)) + wtcp.HLEN - 14)
                             for size in (4, 16)}
        self._ack_due: list[TcpConn] = []
        # Where _push builds each frame: sinks copy a frame before send_frame
        # returns (frames.FrameSink), so one buffer serves them all, and a 64 KiB
        # frame costs no allocation and no zeroing.
        self._frame_buf = bytearray(l4_offset(bytes(16)) + wtcp.HLEN + 0xFFFF)
        self._frame_view = memoryview(self._frame_buf)
        # Counters for the log and the benchmarks: how often the slow paths run.
        self.socket_full = 0
        self.gaps_from_guest = 0
        self.rewinds = 0
        self.pure_acks = 0  # ACKs without data sent to the guest
        self.delayed_acks = 0  # of those, sent by the delayed-ACK timer

    # -- frames from the guest -------------------------------------------

    def from_guest(self, src: bytes, dst: bytes, segment: memoryview) -> None:
        hdr = wtcp.parse(segment)
        key = (ipv4.PROTO_TCP, src, hdr.sport, dst, hdr.dport)
        conn = self.stack.flows.get(key)
        payload = segment[hdr.header_len:]
        if conn is None:
            self._no_flow(key, hdr, segment, payload)
            return
        assert isinstance(conn, TcpConn)
        self._segment(conn, hdr, segment, payload)

    def _no_flow(self, key: FlowKey, hdr: wtcp.Tcp, segment: memoryview,
                 payload: memoryview) -> None:
        if hdr.flags & wtcp.RST:
            return
        if hdr.flags & (wtcp.SYN | wtcp.ACK) == wtcp.SYN:
            opts = wtcp.parse_syn_options(segment[wtcp.HLEN:hdr.header_len])
            self._connect(key, hdr, opts)
            return
        # RFC 9293 section 3.10.7.1: a segment for no connection gets a reset.
        seg_len = len(payload) + (1 if hdr.flags & wtcp.SYN else 0) + (hdr.flags & wtcp.FIN)
        if hdr.flags & wtcp.ACK:
            self._raw_reset(key, hdr.ack, 0, wtcp.RST)
        else:
            self._raw_reset(key, 0, (hdr.seq + seg_len) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)

    def _connect(self, key: FlowKey, hdr: wtcp.Tcp, opts: wtcp.SynOptions) -> None:
        stack = self.stack
        target = stack.host_target(key[3], key[4])
        if target is None:
            return
        try:
            stack.flows.check_room()
        except TableFull as exc:
            limited(log, logging.WARNING, "refusing TCP connection: %s", exc)
            self._raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        family = socket.AF_INET if len(key[3]) == 4 else socket.AF_INET6
        try:
            sock = stack.outbound_socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # -o gave an address this socket cannot bind
            log.debug("tcp socket: %s", exc)
            self._raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        sock.setblocking(False)
        err = sock.connect_ex((target, key[4]))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        conn = TcpConn(self, key, sock)
        conn.events = TAP_SYN_RCVD
        conn.seq_init_from_tap = hdr.seq
        conn.seq_from_tap = conn.seq_ack_to_tap = (hdr.seq + 1) & 0xFFFFFFFF
        conn.tap_mss = opts.mss or DEFAULT_GUEST_MSS
        if opts.wscale is not None:
            conn.ws_from_tap = opts.wscale
            conn.ws_to_tap = WS_TO_GUEST
        conn.wnd_from_tap = _unscaled_syn_window(hdr.window, conn.ws_from_tap)
        stack.flows.add(conn)
        self.conns[conn.fd] = conn
        stack.loop.add(conn.fd, evloop.WRITE | evloop.HANGUP, lambda ev: self._connected(conn))
        # A peer that never answers (a blackholed address) would hold the flow
        # for the kernel's whole SYN retry time (~2 min); _send_syn re-arms.
        conn.timer = stack.loop.call_later(CONNECT_TIMEOUT, lambda: self._connect_timeout(conn))

    def _connect_timeout(self, conn: TcpConn) -> None:
        conn.timer = None
        if conn.sock.fileno() >= 0 and not conn.events & TAP_SYN_ACK_SENT:
            log.debug("connect to port %d: no answer in %g s", conn.remote_port,
                      CONNECT_TIMEOUT)
            self._reset_guest(conn)

    def _connected(self, conn: TcpConn) -> None:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.debug("connect to port %d failed: %s", conn.remote_port, os.strerror(err))
            self._reset_guest(conn)
            return
        conn.sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
        self.stack.loop.modify(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE,
                               conn.on_socket_event)
        self._send_syn(conn, wtcp.SYN | wtcp.ACK)
        conn.events |= TAP_SYN_ACK_SENT

    def _send_syn(self, conn: TcpConn, flags: int) -> None:
        """SYN (inbound) or SYN|ACK (outbound), sent again by the timer until answered."""
        if flags & wtcp.ACK and not conn.ws_to_tap:
            # The guest offered no window scaling, so neither side may use it (RFC 7323 1.3).
            opts = wtcp.mss_option(conn.mss_to_guest)
        else:
            opts = wtcp.syn_options(conn.mss_to_guest, WS_TO_GUEST)
        self._control(conn, flags, seq=(conn.seq_to_tap - 1) & 0xFFFFFFFF, options=opts)
        self._arm(conn, SYN_TIMEOUT)

    def _segment(self, conn: TcpConn, hdr: wtcp.Tcp, segment: memoryview,
                 payload: memoryview) -> None:
        flags = hdr.flags
        if flags & wtcp.RST:
            # Pass the reset on: SO_LINGER 0 makes close() send RST to the host peer.
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.remove(conn)
            return
        if not conn.events & ESTABLISHED:
            self._handshake(conn, hdr, segment)
            if not conn.events & ESTABLISHED:
                return
            if not payload and not flags & wtcp.FIN:
                return
        elif flags & wtcp.SYN:
            self._ack_later(conn)  # a retransmitted SYN|ACK: the guest lost our ACK
            return
        if flags & wtcp.ACK:
            self._guest_ack(conn, hdr, bool(payload))
            if conn.sock.fileno() < 0:
                return
        if payload or flags & wtcp.FIN:
            self._guest_data(conn, hdr.seq, payload, bool(flags & wtcp.FIN))
        self._maybe_done(conn)

    def _handshake(self, conn: TcpConn, hdr: wtcp.Tcp, segment: memoryview) -> None:
        if conn.events & SOCK_ACCEPTED:
            # We sent SYN; the guest answers SYN|ACK.
            if hdr.flags & (wtcp.SYN | wtcp.ACK) != (wtcp.SYN | wtcp.ACK) or \
                    hdr.ack != conn.seq_to_tap:
                return
            opts = wtcp.parse_syn_options(segment[wtcp.HLEN:hdr.header_len])
            conn.seq_init_from_tap = hdr.seq
            conn.seq_from_tap = (hdr.seq + 1) & 0xFFFFFFFF
            conn.tap_mss = opts.mss or DEFAULT_GUEST_MSS
            if opts.wscale is not None:
                conn.ws_from_tap = opts.wscale
                conn.ws_to_tap = WS_TO_GUEST
            conn.wnd_from_tap = _unscaled_syn_window(hdr.window, conn.ws_from_tap)
            conn.events = SOCK_ACCEPTED | ESTABLISHED
            self._disarm(conn)
            self._control(conn, wtcp.ACK)
            self._push(conn)
            return
        if conn.events & TAP_SYN_ACK_SENT and hdr.flags & wtcp.ACK and \
                hdr.ack == conn.seq_to_tap and not hdr.flags & wtcp.SYN:
            conn.events = ESTABLISHED
            conn.seq_ack_from_tap = hdr.ack
            conn.wnd_from_tap = hdr.window
            self._disarm(conn)
            self._push(conn)

    def _guest_ack(self, conn: TcpConn, hdr: wtcp.Tcp, has_data: bool) -> None:
        acked = _seq_diff(hdr.ack, conn.seq_ack_from_tap)
        in_flight = _seq_diff(conn.seq_to_tap, conn.seq_ack_from_tap)
        recovering = _seq_diff(conn.seq_recover, conn.seq_ack_from_tap)
        old_window = conn.wnd_from_tap
        conn.wnd_from_tap = hdr.window
        if acked < 0 or acked > max(in_flight, recovering):
            return  # old or from the future: ignore (RFC 9293 section 3.10.7.4)
        if acked == 0:
            if in_flight and not has_data and hdr.window == old_window:
                conn.dup_acks += 1
                # Fast retransmit (RFC 5681 section 3.2), once per window: the
                # guest answers every segment we send again with a duplicate
                # ACK, and rewinding on those would resend the window forever
                # (RFC 6582 section 3.2, step 2).
                if conn.dup_acks == 3 and recovering <= 0:
                    self._rewind(conn)
            elif hdr.window != old_window:
                self._push(conn)
            return
        conn.dup_acks = 0
        conn.retries = 0
        data_acked = acked
        if conn.events & TAP_FIN_SENT and hdr.ack == conn.seq_to_tap:
            data_acked -= 1
            conn.events |= TAP_FIN_ACKED
        if data_acked > 0 and not self._consume(conn, data_acked):
            return
        conn.seq_ack_from_tap = hdr.ack
        if acked > in_flight:
            # After a rewind the guest acknowledged data it had before: go on
            # from there, peeking from the head of the queue again.
            conn.seq_to_tap = hdr.ack
            if not self._peek_from_head(conn):
                return
        if recovering < acked:
            conn.seq_recover = hdr.ack  # recovered: keep it from going stale as seq wraps
        if conn.seq_ack_from_tap == conn.seq_to_tap:
            self._disarm(conn)
        else:
            self._arm(conn, ACK_TIMEOUT)
        self._push(conn)

    def _consume(self, conn: TcpConn, n: int) -> bool:
        """Drop n acknowledged bytes from the socket's receive queue."""
        while n > 0:
            try:
                got = conn.sock.recv_into(_DISCARD, min(n, len(_DISCARD)), socket.MSG_TRUNC)
            except OSError as exc:
                log.debug("consume: %s", exc)
                self._reset_guest(conn)
                return False
            if got <= 0:
                break
            n -= got
        return True

    def _guest_data(self, conn: TcpConn, seq: int, payload: memoryview, fin: bool) -> None:
        """In-order guest data goes to the socket; only what the socket took is acknowledged.

        When the socket is full, in-order data is held (unacknowledged, bounded by
        PENDING_MAX) and written when the socket has room, so the guest need not
        retransmit what merely arrived early; beyond the bound it is dropped and
        the guest's retransmission brings it back.
        """
        expected = (conn.seq_from_tap + len(conn.pending)) & 0xFFFFFFFF
        offset = _seq_diff(expected, seq)
        if offset < 0:
            # A gap: something before this was not accepted.  Say where we are.
            self.gaps_from_guest += 1
            self._control(conn, wtcp.ACK)
            return
        if offset > len(payload) or (offset == len(payload) and not fin):
            self._ack_later(conn)  # entirely old: a retransmission
            return
        if conn.events & TAP_FIN_RCVD:
            self._ack_later(conn)
            return
        data = payload[offset:]
        if conn.sock_blocked:
            if len(conn.pending) + len(data) > PENDING_MAX:
                return  # dropped, unacknowledged: the guest sends it again
            conn.pending += data
            conn.pending_fin = fin
            return
        written = self._to_socket(conn, data)
        if written is None:
            return
        if written < len(data):
            self.socket_full += 1
            conn.sock_blocked = True
            conn.pending = bytearray(data[written:])
            conn.pending_fin = fin
            self.stack.loop.modify(conn.fd, evloop.READ | evloop.WRITE | evloop.HANGUP
                                   | evloop.EDGE)
            self._ack_later(conn)
            return
        if fin:
            self._guest_fin(conn)
            return
        self._ack_data(conn)

    def _to_socket(self, conn: TcpConn, data: bytes | bytearray | memoryview) -> int | None:
        """Write guest data to the host socket: bytes taken (and now covered by
        seq_from_tap), or None when the socket failed and the guest was reset."""
        if not data:
            return 0
        try:
            written = conn.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.debug("send to host: %s", exc)
            self._reset_guest(conn)
            return None
        conn.seq_from_tap = (conn.seq_from_tap + written) & 0xFFFFFFFF
        return written

    def _guest_fin(self, conn: TcpConn) -> None:
        conn.seq_from_tap = (conn.seq_from_tap + 1) & 0xFFFFFFFF
        conn.events |= TAP_FIN_RCVD
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        conn.events |= SOCK_FIN_SENT
        self._control(conn, wtcp.ACK)

    def _socket_writable(self, conn: TcpConn) -> None:
        """The socket has room again: write what was held, then acknowledge it."""
        pending = conn.pending
        assert isinstance(pending, bytearray)  # set when the socket became full
        written = self._to_socket(conn, pending)
        if written is None:
            return
        del pending[:written]
        if pending:
            self._control(conn, wtcp.ACK)
            return
        conn.sock_blocked = False
        self.stack.loop.modify(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE)
        if conn.pending_fin:
            conn.pending_fin = False
            self._guest_fin(conn)
            self._maybe_done(conn)
        else:
            self._control(conn, wtcp.ACK)  # with an open window: the guest may send again

    # -- acknowledgements and windows towards the guest ---------------------

    def _ack_later(self, conn: TcpConn) -> None:
        """One ACK per connection per batch of guest frames, however many segments came."""
        if not conn.flow_ack_due:
            conn.flow_ack_due = True
            self._ack_due.append(conn)

    def _ack_data(self, conn: TcpConn) -> None:
        """Acknowledge in-order guest data the socket took once two full-sized
        segments' worth is unacknowledged (RFC 1122 section 4.2.3.2), else
        within DELAYED_ACK: a bulk upload then costs half the ACK frames or
        fewer (iperf3's 128 KiB writes make two full segments and a short
        one), and the guest half the interrupts.  Data we send the guest
        carries the ACK anyway, so a reply within the delay costs nothing."""
        full = conn.mss_to_guest - _SEGMENT_OPTIONS
        if _seq_diff(conn.seq_from_tap, conn.seq_ack_to_tap) >= 2 * full:
            self._ack_later(conn)
        elif conn.ack_timer is None:
            conn.ack_timer = self.stack.loop.call_later(DELAYED_ACK,
                                                        lambda: self._delayed_ack(conn))

    def _delayed_ack(self, conn: TcpConn) -> None:
        conn.ack_timer = None
        if conn.sock.fileno() < 0 or conn.seq_ack_to_tap == conn.seq_from_tap:
            return  # gone, or an ACK (or data) went out meanwhile
        self.delayed_acks += 1
        self._control(conn, wtcp.ACK)

    def end_of_batch(self) -> None:
        due, self._ack_due = self._ack_due, []
        for conn in due:
            if conn.flow_ack_due and conn.sock.fileno() >= 0:
                conn.flow_ack_due = False
                self._control(conn, wtcp.ACK)

    def _window(self, conn: TcpConn) -> int:
        """Free space in the socket's send buffer, but at least WINDOW_FLOOR.

        The kernel grows a socket's send buffer only as the connection speeds up,
        so offering just the free space starts a slow feedback loop (the guest
        cannot send fast because the buffer is small, and the other way round).
        What the socket cannot take at once is held in `pending` (up to
        PENDING_MAX, more than the floor), not dropped, so the floor costs no data.
        """
        if conn.sock_blocked:
            return 0
        try:
            if not conn.sndbuf_age:
                # The kernel's autotuning moves it slowly: one read per
                # SNDBUF_REFRESH windows saves a system call on every ACK.
                conn.sndbuf = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                conn.sndbuf_age = SNDBUF_REFRESH
            conn.sndbuf_age -= 1
            fcntl.ioctl(conn.fd, _SIOCOUTQ, _OUTQ)
            queued = int.from_bytes(_OUTQ, "little")
        except OSError:
            return 0
        free = max(conn.sndbuf - queued, WINDOW_FLOOR)
        return min(free >> conn.ws_to_tap, 0xFFFF)

    def _control(self, conn: TcpConn, flags: int, seq: int | None = None,
                 options: bytes = b"") -> None:
        window = self._window(conn) if conn.events & ESTABLISHED else 0xFFFF
        conn.wnd_to_tap = window
        conn.seq_ack_to_tap = conn.seq_from_tap
        conn.flow_ack_due = False
        output = self.stack.output
        if flags == wtcp.ACK:
            self.pure_acks += 1
            if seq is None and not options and output.partial_l4_checksums:
                frame = conn.ack_frame
                if frame is None or conn.ack_mac is not output.guest_mac:
                    # IP header, ports and the pseudo-header sum in the checksum
                    # field are the same for every pure ACK of this connection.
                    frame = conn.ack_frame = bytearray(conn.payload_off)
                    output.tcp(frame, 0, conn.remote_addr, conn.remote_port, conn.guest_addr,
                               conn.guest_port, 0, 0, flags, 0)
                    conn.ack_mac = output.guest_mac
                _ACK_FIELDS.pack_into(frame, conn.payload_off - wtcp.HLEN + 4, conn.seq_to_tap,
                                      conn.seq_from_tap, (wtcp.HLEN // 4) << 4, flags, window)
                self.stack.send(frame)
                return
        self.stack.send(output.tcp(
            bytearray(conn.payload_off + len(options)), 0, conn.remote_addr, conn.remote_port,
            conn.guest_addr, conn.guest_port,
            conn.seq_to_tap if seq is None else seq, conn.seq_from_tap, flags, window, options))

    def _raw_reset(self, key: FlowKey, seq: int, ack: int, flags: int) -> None:
        frame = bytearray(l4_offset(key[1]) + wtcp.HLEN)
        self.stack.send(self.stack.output.tcp(frame, 0, key[3], key[4], key[1], key[2], seq,
                                              ack, flags, 0))

    # -- host -> guest -----------------------------------------------------

    def socket_event(self, conn: TcpConn, events: int) -> None:
        if events & evloop.WRITE and conn.sock_blocked:
            self._socket_writable(conn)
            if conn.sock.fileno() < 0:
                return
        if events & (evloop.READ | evloop.HANGUP):
            self._push(conn)

    def _push(self, conn: TcpConn) -> None:
        """Send what the socket holds and the guest's window admits, peeking, not reading."""
        if not conn.events & ESTABLISHED or conn.events & TAP_FIN_SENT:
            return
        stack = self.stack
        window = conn.wnd_from_tap << conn.ws_from_tap
        if stack.output.segment_offload:
            mss = _GSO_PAYLOAD_V4 if len(conn.guest_addr) == 4 else _GSO_PAYLOAD_V6
        else:
            mss = min(conn.tap_mss, conn.mss_to_guest)
        sock = conn.sock
        window_field = -1
        payload_off = conn.payload_off
        while True:
            room = window - _seq_diff(conn.seq_to_tap, conn.seq_ack_from_tap)
            if room <= 0:
                return
            if not stack.has_room():
                stack.wait_for_room(conn)
                return
            want = min(mss, room)
            frame = self._frame_buf
            try:
                got = sock.recv_into(self._frame_view[payload_off:], want,
                                     socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                log.debug("recv from host: %s", exc)
                self._reset_guest(conn)
                return
            if got == 0:
                conn.events |= SOCK_FIN_RCVD
                self._control(conn, wtcp.FIN | wtcp.ACK)
                conn.seq_to_tap = (conn.seq_to_tap + 1) & 0xFFFFFFFF
                conn.events |= TAP_FIN_SENT
                self._arm(conn, ACK_TIMEOUT)
                return
            if window_field < 0:  # once per burst: it costs two system calls
                window_field = self._window(conn)
            conn.wnd_to_tap = window_field
            conn.seq_ack_to_tap = conn.seq_from_tap
            stack.send(stack.output.tcp(
                frame, got, conn.remote_addr, conn.remote_port, conn.guest_addr,
                conn.guest_port, conn.seq_to_tap, conn.seq_from_tap,
                wtcp.ACK | wtcp.PSH if got < want else wtcp.ACK, window_field))
            conn.seq_to_tap = (conn.seq_to_tap + got) & 0xFFFFFFFF
            if conn.timer is None:
                self._arm(conn, ACK_TIMEOUT)
            if got < want:
                return

    def room_available(self, conn: TcpConn) -> None:
        if conn.sock.fileno() >= 0:
            self._push(conn)

    # -- timers, retransmission --------------------------------------------

    def _arm(self, conn: TcpConn, delay: float) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = self.stack.loop.call_later(delay, lambda: self._timeout(conn))

    def _disarm(self, conn: TcpConn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None

    def _timeout(self, conn: TcpConn) -> None:
        conn.timer = None
        if conn.sock.fileno() < 0:
            return
        conn.retries += 1
        if conn.retries > MAX_RETRIES:
            log.debug("guest stopped answering on port %d: reset", conn.guest_port)
            self._reset_guest(conn)
            return
        if not conn.events & ESTABLISHED:
            if conn.events & SOCK_ACCEPTED:
                self._send_syn(conn, wtcp.SYN)
            elif conn.events & TAP_SYN_ACK_SENT:
                self._send_syn(conn, wtcp.SYN | wtcp.ACK)
            return
        if conn.seq_to_tap != conn.seq_ack_from_tap:
            self._rewind(conn)

    def _rewind(self, conn: TcpConn) -> None:
        """Go back to the guest's last ACK and send from there again."""
        conn.dup_acks = 0
        self.rewinds += 1
        sent = conn.seq_to_tap
        if conn.events & TAP_FIN_SENT and not conn.events & TAP_FIN_ACKED:
            conn.events &= ~(TAP_FIN_SENT | SOCK_FIN_RCVD)
            sent = (sent - 1) & 0xFFFFFFFF  # an ACK of the FIN waits for the FIN sent again
        if _seq_diff(sent, conn.seq_recover) > 0:
            conn.seq_recover = sent
        conn.seq_to_tap = conn.seq_ack_from_tap
        if not self._peek_from_head(conn):
            return
        self._arm(conn, ACK_TIMEOUT * (1 << min(conn.retries, 4)))
        self._push(conn)

    def _peek_from_head(self, conn: TcpConn) -> bool:
        """Peek from the first unacknowledged byte again (seq_to_tap was set
        to seq_ack_from_tap); False when the socket failed and the guest was reset."""
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
        except OSError:
            self._reset_guest(conn)
            return False
        return True

    # -- inbound (-t) ------------------------------------------------------

    def accepted(self, sock: socket.socket, guest_addr: bytes, guest_port: int,
                 remote_addr: bytes, remote_port: int) -> None:
        """A host peer connected to a forwarded port: open the connection to the guest."""
        key = (ipv4.PROTO_TCP, guest_addr, guest_port, remote_addr, remote_port)
        if self.stack.flows.get(key) is not None:
            sock.close()
            return
        try:
            self.stack.flows.check_room()
        except TableFull as exc:
            limited(log, logging.WARNING, "refusing inbound TCP connection: %s", exc)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
        conn = TcpConn(self, key, sock)
        conn.events = SOCK_ACCEPTED
        self.stack.flows.add(conn)
        self.conns[conn.fd] = conn
        self.stack.loop.add(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE,
                            conn.on_socket_event)
        self._send_syn(conn, wtcp.SYN)

    # -- ending ------------------------------------------------------------

    def _maybe_done(self, conn: TcpConn) -> None:
        if conn.events & TAP_FIN_RCVD and conn.events & TAP_FIN_ACKED:
            self.remove(conn)

    def _reset_guest(self, conn: TcpConn) -> None:
        if conn.events & (ESTABLISHED | TAP_SYN_ACK_SENT | SOCK_ACCEPTED | TAP_SYN_RCVD):
            self._control(conn, wtcp.RST | wtcp.ACK)
        self.remove(conn)

    def remove(self, conn: TcpConn) -> None:
        self.conns.pop(conn.fd, None)
        conn.flow_ack_due = False
        self.stack.flows.remove(conn)

    def dump(self) -> list[tuple[TcpFlowRecord, socket.socket]]:
        """Established connections: passt-style record and host socket for each.

        The socket's kernel state (sequence numbers, queues: with data the guest
        has not acknowledged still in the receive queue) is the other half of a
        flow; dumping it needs TCP_REPAIR, which is the migration code's job.
        """
        return [(c.record(), c.sock) for c in self.conns.values() if c.events & ESTABLISHED]

    def forget(self) -> list[socket.socket]:
        """Drop every connection without closing its socket: the caller owns them now."""
        sockets = []
        for conn in list(self.conns.values()):
            self.stack.loop.remove(conn.fd)
            conn.stop_timers()  # a delayed ACK too: the socket is the caller's now
            self.conns.pop(conn.fd, None)
            conn.flow_ack_due = False
            self.stack.flows.detach(conn)
            sockets.append(conn.sock)
        self.stack.forget_waiting()
        return sockets

    def restore(self, record: TcpFlowRecord, sock: socket.socket) -> TcpConn:
        """Carry on an established connection from its record and its connected socket.

        Raises ValueError (having changed nothing) for a record this stack cannot
        serve, flows.TableFull when there is no room.
        """
        if not record.events & ESTABLISHED:
            raise ValueError("only established connections can be restored")
        tap = 1 if record.pif[1] == PIF_TAP else 0
        if record.pif[tap] != PIF_TAP:
            raise ValueError(f"record has no guest side (pif {record.pif})")
        oaddr, eaddr, oport, eport = record.sides[tap]
        remote, guest = _unmapped(oaddr), _unmapped(eaddr)
        if len(remote) != len(guest):
            raise ValueError("guest side mixes IPv4 and IPv6")
        key = (ipv4.PROTO_TCP, guest, eport, remote, oport)
        if self.stack.flows.get(key) is not None:
            raise ValueError(f"a flow for {key!r} exists already")
        self.stack.flows.check_room()
        sock.setblocking(False)
        in_flight = _seq_diff(record.seq_to_tap, record.seq_ack_from_tap)
        if in_flight < 0:
            raise ValueError("record acknowledges more than was sent")
        # Data sent to the guest but not acknowledged is still in the receive queue:
        # peeking resumes right after it.  A FIN already sent takes no queue byte.
        fin_sent = bool(record.events & TAP_FIN_SENT)
        sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, max(in_flight - fin_sent, 0))
        conn = TcpConn(self, key, sock)
        conn.events = record.events
        conn.seq_to_tap = conn.seq_recover = record.seq_to_tap
        conn.seq_ack_from_tap = record.seq_ack_from_tap
        conn.seq_from_tap = record.seq_from_tap
        conn.seq_ack_to_tap = record.seq_ack_to_tap
        conn.seq_init_from_tap = record.seq_init_from_tap
        conn.wnd_from_tap = record.wnd_from_tap
        conn.wnd_to_tap = record.wnd_to_tap
        conn.ws_from_tap = record.ws_from_tap
        conn.ws_to_tap = record.ws_to_tap
        conn.tap_mss = record.tap_mss
        conn.retries = record.retries
        self.stack.flows.add(conn)
        self.conns[conn.fd] = conn
        self.stack.loop.add(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE,
                            conn.on_socket_event)
        if in_flight:
            self._arm(conn, ACK_TIMEOUT)
        def resume() -> None:
            if conn.sock.fileno() < 0:
                return
            # Segments the guest sent while the connection moved are lost: a
            # duplicate ACK with the window tells it where to resume at once.
            self._control(conn, wtcp.ACK)
            self._push(conn)

        self.stack.loop.call_soon(resume)
        return conn


