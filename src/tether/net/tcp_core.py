"""The sans-IO core of a TCP connection with the guest: sequences, windows, ACKs.

Everything here is decided from guest segments, timers and the loop's clock;
nothing here calls a socket.  What the host side must do (peek at the data the
peer sent, consume what the guest acknowledged, write guest data, shut down)
goes through the hooks at the end of `TcpConn`, which net/tcp.py implements on
a kernel socket and tests/net/test_tcp_core.py on a byte buffer, as aioquic
drives its connections with datagrams and `now` alone.

Sequence-number state mirrors passt's `struct tcp_tap_conn` (tcp_conn.h), so a
connection dumps as passt's per-flow record (net/tcp_record.py).
"""

from __future__ import annotations

import logging
import struct
from typing import Final

from tether.net.context import NetContext
from tether.net.flows import FlowKey
from tether.net.output import l4_offset
from tether.net.tcp_record import TcpFlowRecord
from tether.net.tcp_state import (
    ALL,
    DEFAULT_GUEST_MSS,
    ESTABLISHED,
    PEEK_FAILED,
    SOCK_ACCEPTED,
    SOCK_FIN_RCVD,
    SOCK_FIN_SENT,
    TAP_FIN_ACKED,
    TAP_FIN_RCVD,
    TAP_FIN_SENT,
    TAP_SYN_ACK_SENT,
    TAP_SYN_RCVD,
    TcpState,
    seq_diff,
    unscaled_syn_window,
)
from tether.wire import ipv4
from tether.wire import tcp as wtcp

# ESTABLISHED too: tests read it here, next to the timeouts they shorten.
__all__ = ["ACK_TIMEOUT", "DELAYED_ACK", "ESTABLISHED", "MAX_RETRIES", "PENDING_MAX",
           "SYN_TIMEOUT", "WS_TO_GUEST", "TcpConn", "TcpShared"]

log = logging.getLogger(__name__)

ACK_TIMEOUT = 1.0  # seconds before unacknowledged data is sent again
# Guest data short of two full segments is acknowledged within this (RFC 9293
# section 3.8.6.3 allows 0.5 s; Linux waits at least 40 ms): short, because a
# guest whose Nagle holds back a small tail waits for this ACK.
DELAYED_ACK: Final = 0.001
# Options a guest data segment may carry beyond what our MSS counts: still "full-sized".
_SEGMENT_OPTIONS: Final = 40
SYN_TIMEOUT = 3.0
MAX_RETRIES = 6
WS_TO_GUEST: Final = 8
# Largest payloads when the transport segments for us: what fits the IP length fields.
_GSO_PAYLOAD_V4: Final = 0xFFFF - ipv4.HLEN - wtcp.HLEN
_GSO_PAYLOAD_V6: Final = 0xFFFF - wtcp.HLEN
PENDING_MAX: Final = 2 << 20
# seq, ack, data offset, flags, window: the fields of a pure ACK that change
# (wire/tcp.py's header from byte 4, RFC 9293 section 3.1).
_ACK_FIELDS: Final = struct.Struct("!IIBBH")
_SEQ: Final = struct.Struct("!I")  # the sequence number, 4 bytes into the TCP header


class TcpShared:
    """What all TCP connections of one stack share: the context, the frame
    buffer, the batch of ACKs due, and the counters the log reports."""

    def __init__(self, ctx: NetContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        # The MSS offered to the guest, by address length: one int for all flows.
        self.mss_to_guest = {size: ctx.params.mtu - (l4_offset(bytes(size)) + wtcp.HLEN - 14)
                             for size in (4, 16)}
        self.ack_due: list[TcpConn] = []
        # Where push() builds each frame: sinks copy a frame before send_frame
        # returns (frames.FrameSink), so one buffer serves them all, and a 64 KiB
        # frame costs no allocation and no zeroing.
        self.frame_buf = bytearray(l4_offset(bytes(16)) + wtcp.HLEN + 0xFFFF)
        self.frame_view = memoryview(self.frame_buf)
        # Where push() has the transport list the guest buffers a claim gave
        # it (frames.InPlaceSink); empty between pushes.
        self.claimed: list[memoryview] = []
        # Counters for the log and the benchmarks: how often the slow paths run.
        self.socket_full = 0
        self.gaps_from_guest = 0
        self.rewinds = 0
        self.pure_acks = 0  # ACKs without data sent to the guest
        self.delayed_acks = 0  # of those, sent by the delayed-ACK timer

    def end_of_batch(self) -> None:
        """After a batch of guest frames: one ACK for each connection that owes one."""
        due, self.ack_due = self.ack_due, []
        for conn in due:
            if conn.flow_ack_due and not conn.closed:
                conn.flow_ack_due = False
                conn.control(wtcp.ACK)


class TcpConn(TcpState):
    """One TCP connection with the guest, without its host socket.

    The guest's side is terminated here: the connection keeps passt's sequence
    state, decides what to acknowledge, when to send again and how much the
    guest may send, and builds the frames.  Its state is the set of events in
    net/tcp_state.py, changed only through `_event`.  The host side is behind
    the hooks at the end (net/tcp.py's `SocketConn`).
    """

    __slots__ = ("ctx", "loop", "shared")

    def __init__(self, shared: TcpShared, key: FlowKey) -> None:
        super().__init__(key, shared.mss_to_guest[len(key[1])])
        self.shared = shared
        self.ctx = shared.ctx
        self.loop = shared.loop

    # -- opening -----------------------------------------------------------

    def guest_syn(self, hdr: wtcp.Tcp, opts: wtcp.SynOptions) -> None:
        """The guest's SYN opened this connection; the host socket is connecting."""
        self._event(TAP_SYN_RCVD)
        self.seq_init_from_tap = hdr.seq
        self.seq_from_tap = self.seq_ack_to_tap = (hdr.seq + 1) & 0xFFFFFFFF
        self._syn_options(hdr, opts)

    def _syn_options(self, hdr: wtcp.Tcp, opts: wtcp.SynOptions) -> None:
        self.tap_mss = opts.mss or DEFAULT_GUEST_MSS
        if opts.wscale is not None:
            self.ws_from_tap = opts.wscale
            self.ws_to_tap = WS_TO_GUEST
        self.wnd_from_tap = unscaled_syn_window(hdr.window, self.ws_from_tap)

    def host_connected(self) -> None:
        """The host socket connected: answer the guest's SYN."""
        self._send_syn(wtcp.SYN | wtcp.ACK)
        self._event(TAP_SYN_ACK_SENT)

    def host_accepted(self) -> None:
        """A host peer connected to a forwarded port: open the connection to the guest."""
        self._event(SOCK_ACCEPTED)
        self._send_syn(wtcp.SYN)

    def _send_syn(self, flags: int) -> None:
        """SYN (inbound) or SYN|ACK (outbound), sent again by the timer until answered."""
        if flags & wtcp.ACK and not self.ws_to_tap:
            # The guest offered no window scaling, so neither side may use it (RFC 7323 1.3).
            opts = wtcp.mss_option(self.mss_to_guest)
        else:
            opts = wtcp.syn_options(self.mss_to_guest, WS_TO_GUEST)
        self.control(flags, seq=(self.seq_to_tap - 1) & 0xFFFFFFFF, options=opts)
        self._arm(SYN_TIMEOUT)

    def _handshake(self, hdr: wtcp.Tcp, segment: memoryview) -> None:
        if self.events & SOCK_ACCEPTED:
            # We sent SYN; the guest answers SYN|ACK.
            if hdr.flags & (wtcp.SYN | wtcp.ACK) != (wtcp.SYN | wtcp.ACK) or \
                    hdr.ack != self.seq_to_tap:
                return
            opts = wtcp.parse_syn_options(segment[wtcp.HLEN:hdr.header_len])
            self.seq_init_from_tap = hdr.seq
            self.seq_from_tap = (hdr.seq + 1) & 0xFFFFFFFF
            self._syn_options(hdr, opts)
            self._event(ESTABLISHED, off=ALL & ~SOCK_ACCEPTED)
            self._disarm()
            self.control(wtcp.ACK)
            self.push()
            return
        if self.events & TAP_SYN_ACK_SENT and hdr.flags & wtcp.ACK and \
                hdr.ack == self.seq_to_tap and not hdr.flags & wtcp.SYN:
            self._event(ESTABLISHED, off=ALL)
            self.seq_ack_from_tap = hdr.ack
            self.wnd_from_tap = hdr.window
            self._disarm()
            self.push()

    # -- segments from the guest ---------------------------------------------

    def segment(self, hdr: wtcp.Tcp, segment: memoryview, payload: memoryview) -> None:
        """A segment from the guest for this connection."""
        flags = hdr.flags
        if flags & wtcp.RST:
            self._reset_host()
            self.remove()
            return
        if not self.events & ESTABLISHED:
            self._handshake(hdr, segment)
            if not self.events & ESTABLISHED:
                return
            if not payload and not flags & wtcp.FIN:
                return
        elif flags & wtcp.SYN:
            self._ack_later()  # a retransmitted SYN|ACK: the guest lost our ACK
            return
        if flags & wtcp.ACK:
            self._guest_ack(hdr, bool(payload))
            if self.closed:
                return
        if payload or flags & wtcp.FIN:
            self._guest_data(hdr.seq, payload, bool(flags & wtcp.FIN))
        self._maybe_done()

    def _guest_ack(self, hdr: wtcp.Tcp, has_data: bool) -> None:
        acked = seq_diff(hdr.ack, self.seq_ack_from_tap)
        in_flight = seq_diff(self.seq_to_tap, self.seq_ack_from_tap)
        recovering = seq_diff(self.seq_recover, self.seq_ack_from_tap)
        old_window = self.wnd_from_tap
        self.wnd_from_tap = hdr.window
        if acked < 0 or acked > max(in_flight, recovering):
            return  # old or from the future: ignore (RFC 9293 section 3.10.7.4)
        if acked == 0:
            if in_flight and not has_data and hdr.window == old_window:
                self.dup_acks += 1
                # Fast retransmit (RFC 5681 section 3.2), once per window: the
                # guest answers every segment we send again with a duplicate
                # ACK, and rewinding on those would resend the window forever
                # (RFC 6582 section 3.2, step 2).
                if self.dup_acks == 3 and recovering <= 0:
                    self._rewind()
            elif hdr.window != old_window and not self.host_dry:
                self.push()
            return
        self.dup_acks = 0
        self.retries = 0
        data_acked = acked
        if self.events & TAP_FIN_SENT and hdr.ack == self.seq_to_tap:
            data_acked -= 1
            self._event(TAP_FIN_ACKED)
        if data_acked > 0 and not self._consume(data_acked):
            self.reset_guest()
            return
        self.seq_ack_from_tap = hdr.ack
        if acked > in_flight:
            # After a rewind the guest acknowledged data it had before: go on
            # from there, peeking from the head of the queue again.
            self.seq_to_tap = hdr.ack
            if not self._peek_from_head():
                self.reset_guest()
                return
            self.host_dry = False
        if recovering < acked:
            self.seq_recover = hdr.ack  # recovered: keep it from going stale as seq wraps
        if self.seq_ack_from_tap == self.seq_to_tap:
            self._disarm()
        else:
            self._arm(ACK_TIMEOUT)
        # What the guest's window held back goes now; nothing, if the last
        # push found the socket dry: new data comes with an event of its own
        # (on_socket_event), and in request/response that peek was a system
        # call per transaction that always came back empty.
        if not self.host_dry:
            self.push()

    def _guest_data(self, seq: int, payload: memoryview, fin: bool) -> None:
        """In-order guest data goes to the socket; only what the socket took is acknowledged.

        When the socket is full, in-order data is held (unacknowledged, bounded by
        PENDING_MAX) and written when the socket has room, so the guest need not
        retransmit what merely arrived early; beyond the bound it is dropped and
        the guest's retransmission brings it back.
        """
        expected = (self.seq_from_tap + len(self.pending)) & 0xFFFFFFFF
        offset = seq_diff(expected, seq)
        if offset < 0:
            # A gap: something before this was not accepted.  Say where we are.
            self.shared.gaps_from_guest += 1
            self.control(wtcp.ACK)
            return
        if offset > len(payload) or (offset == len(payload) and not fin):
            self._ack_later()  # entirely old: a retransmission
            return
        if self.events & TAP_FIN_RCVD:
            self._ack_later()
            return
        data = payload[offset:]
        if self.sock_blocked:
            if len(self.pending) + len(data) > PENDING_MAX:
                return  # dropped, unacknowledged: the guest sends it again
            self.pending += data
            self.pending_fin = fin
            return
        # Written here and in host_writable rather than in a helper: this is
        # once per guest segment.  Only what the host took is covered by
        # seq_from_tap, so only that is acknowledged.
        written = self._write(data) if data else 0
        if written < 0:
            self.reset_guest()
            return
        self.seq_from_tap = (self.seq_from_tap + written) & 0xFFFFFFFF
        if written < len(data):
            self.shared.socket_full += 1
            self.sock_blocked = True
            self.pending = bytearray(data[written:])
            self.pending_fin = fin
            self._watch_writable(True)
            self._ack_later()
            return
        if fin:
            self._guest_fin()
            return
        self._ack_data()

    def _guest_fin(self) -> None:
        self.seq_from_tap = (self.seq_from_tap + 1) & 0xFFFFFFFF
        self._event(TAP_FIN_RCVD)
        self._shutdown_write()
        self._event(SOCK_FIN_SENT)
        self.control(wtcp.ACK)

    def host_writable(self) -> None:
        """The socket has room again: write what was held, then acknowledge it."""
        pending = self.pending
        assert isinstance(pending, bytearray)  # set when the socket became full
        written = self._write(pending)
        if written < 0:
            self.reset_guest()
            return
        self.seq_from_tap = (self.seq_from_tap + written) & 0xFFFFFFFF
        del pending[:written]
        if pending:
            self.control(wtcp.ACK)
            return
        self.sock_blocked = False
        self._watch_writable(False)
        if self.pending_fin:
            self.pending_fin = False
            self._guest_fin()
            self._maybe_done()
        else:
            self.control(wtcp.ACK)  # with an open window: the guest may send again

    # -- acknowledgements and windows towards the guest ---------------------

    def _ack_later(self) -> None:
        """One ACK per connection per batch of guest frames, however many segments came."""
        if not self.flow_ack_due:
            self.flow_ack_due = True
            self.shared.ack_due.append(self)

    def _ack_data(self) -> None:
        """Acknowledge in-order guest data the socket took once two full-sized
        segments' worth is unacknowledged (RFC 1122 section 4.2.3.2), else
        within DELAYED_ACK: a bulk upload then costs half the ACK frames or
        fewer (iperf3's 128 KiB writes make two full segments and a short
        one), and the guest half the interrupts.  Data we send the guest
        carries the ACK anyway, so a reply within the delay costs nothing."""
        full = self.mss_to_guest - _SEGMENT_OPTIONS
        if seq_diff(self.seq_from_tap, self.seq_ack_to_tap) >= 2 * full:
            self._ack_later()
        elif self.ack_timer is None:
            self.ack_timer = self.loop.call_later(DELAYED_ACK, self._delayed_ack)

    def _delayed_ack(self) -> None:
        self.ack_timer = None
        if self.closed or self.seq_ack_to_tap == self.seq_from_tap:
            return  # gone, or an ACK (or data) went out meanwhile
        self.shared.delayed_acks += 1
        self.control(wtcp.ACK)

    def control(self, flags: int, seq: int | None = None, options: bytes = b"") -> None:
        """A segment without data: ACK, FIN, RST or SYN, with our current ACK and window."""
        if not self.events & ESTABLISHED:
            window = 0xFFFF
        elif self.sock_blocked:
            window = 0
        else:
            window = self._free_window()
        self.wnd_to_tap = window
        self.seq_ack_to_tap = self.seq_from_tap
        self.flow_ack_due = False
        ctx = self.ctx
        output = ctx.output
        if flags == wtcp.ACK:
            self.shared.pure_acks += 1
            if seq is None and not options and output.partial_l4_checksums:
                frame = self.ack_frame
                if frame is None or self.ack_mac is not output.guest_mac:
                    # IP header, ports and the pseudo-header sum in the checksum
                    # field are the same for every pure ACK of this connection.
                    frame = self.ack_frame = bytearray(self.payload_off)
                    output.tcp(frame, 0, self.remote_addr, self.remote_port, self.guest_addr,
                               self.guest_port, 0, 0, flags, 0)
                    self.ack_mac = output.guest_mac
                _ACK_FIELDS.pack_into(frame, self.payload_off - wtcp.HLEN + 4, self.seq_to_tap,
                                      self.seq_from_tap, (wtcp.HLEN // 4) << 4, flags, window)
                ctx.send(frame)
                return
        ctx.send(output.tcp(
            bytearray(self.payload_off + len(options)), 0, self.remote_addr, self.remote_port,
            self.guest_addr, self.guest_port,
            self.seq_to_tap if seq is None else seq, self.seq_from_tap, flags, window, options))

    # -- host -> guest -------------------------------------------------------

    def push(self) -> None:
        """Send what the host sent and the guest's window admits, peeking, not reading."""
        if not self.events & ESTABLISHED or self.events & TAP_FIN_SENT:
            return
        ctx = self.ctx
        shared = self.shared
        window = self.wnd_from_tap << self.ws_from_tap
        if ctx.output.segment_offload:
            mss = _GSO_PAYLOAD_V4 if len(self.guest_addr) == 4 else _GSO_PAYLOAD_V6
        else:
            mss = min(self.tap_mss, self.mss_to_guest)
        window_field = -1
        payload_off = self.payload_off
        output = ctx.output
        while True:
            room = window - seq_diff(self.seq_to_tap, self.seq_ack_from_tap)
            if room <= 0:
                return
            if not ctx.has_room():
                ctx.wait_for_room(self)
                return
            views = shared.claimed
            want = 0
            total = room
            all_held = False  # total is all the socket holds
            if output.in_place:
                if room > mss and not self.host_had_more:
                    # Several frames: claim no more than the socket holds, as
                    # a claim costs work per buffer.  While the socket is known
                    # to hold more than the last peek took, the window alone:
                    # a bulk sender keeps it full, and a short peek (one
                    # claim's buffers planned in vain) ends that.
                    held = self._unread() - seq_diff(self.seq_to_tap, self.seq_ack_from_tap)
                    if held <= room:
                        total, all_held = held, True
                if total > 0:
                    want = ctx.claim(payload_off, mss, total, views)
            in_place = want > 0
            if in_place:
                # Several frames' payloads peeked straight into the guest's
                # buffers by one system call: no copy here, and one call
                # for up to frames.InPlaceSink's claim instead of one per frame.
                try:
                    got = self._peek_into(views)
                finally:
                    views.clear()  # the guest's memory may go; no view may outlive this
            else:
                want = min(mss, room)
                got = self._peek(shared.frame_view[payload_off:], want)
            # Drained: a short peek (an empty or failed one too: want > 0), or
            # one that took all the socket held (no second look to find it
            # empty).  More is queued if the peek got all it asked for, and
            # that was less than the socket held (or than the window, not
            # knowing).  Dry unless the host has closed or failed: its FIN (or
            # error) came with an event already handled, and only a peek finds it.
            drained = got < want or (all_held and got >= total)
            self.host_had_more = not drained and want < total
            self.host_dry = drained and not self.host_hup
            if got <= 0:
                if got == 0:
                    self._host_fin()
                elif got == PEEK_FAILED:
                    self.reset_guest()
                return
            if window_field < 0:  # once per burst: it costs two system calls
                window_field = 0 if self.sock_blocked else self._free_window()
            self.wnd_to_tap = window_field
            self.seq_ack_to_tap = self.seq_from_tap
            if in_place:
                self._commit_claimed(got, drained, mss, window_field)
            else:
                ctx.send(ctx.output.tcp(
                    shared.frame_buf, got, self.remote_addr, self.remote_port,
                    self.guest_addr, self.guest_port, self.seq_to_tap, self.seq_from_tap,
                    wtcp.ACK | wtcp.PSH if drained else wtcp.ACK, window_field))
                self.seq_to_tap = (self.seq_to_tap + got) & 0xFFFFFFFF
            if self.timer is None:
                self._arm(ACK_TIMEOUT)
            if drained:
                return

    def _commit_claimed(self, got: int, drained: bool, mss: int, window_field: int) -> None:
        """The frames of `got` bytes peeked into claimed buffers: headers only,
        mss bytes each but the last; PSH on the last when the socket ran dry."""
        ctx = self.ctx
        output = ctx.output
        frame_buf = self.shared.frame_buf
        payload_off = self.payload_off
        headers = self.shared.frame_view[:payload_off]
        built_size = built_flags = -1
        left = got
        while left > 0:
            size = mss if left > mss else left
            left -= size
            flags = wtcp.ACK | wtcp.PSH if drained and left == 0 else wtcp.ACK
            if size == built_size and flags == built_flags:
                # The frame before had the same length and flags: only the
                # sequence number differs, since the checksum field holds the
                # pseudo-header sum alone (claims need partial checksums).
                _SEQ.pack_into(frame_buf, payload_off - wtcp.HLEN + 4, self.seq_to_tap)
            else:
                output.tcp(frame_buf, size, self.remote_addr, self.remote_port,
                           self.guest_addr, self.guest_port, self.seq_to_tap,
                           self.seq_from_tap, flags, window_field)
                built_size, built_flags = size, flags
            # Not sent when the claim was voided: like a frame the guest had
            # no room for, the retransmission timer sends it again.
            ctx.commit(headers, size)
            self.seq_to_tap = (self.seq_to_tap + size) & 0xFFFFFFFF

    def _host_fin(self) -> None:
        """The host peer closed its side: FIN to the guest, after all its data."""
        self._event(SOCK_FIN_RCVD)
        self.control(wtcp.FIN | wtcp.ACK)
        self.seq_to_tap = (self.seq_to_tap + 1) & 0xFFFFFFFF
        self._event(TAP_FIN_SENT)
        self._arm(ACK_TIMEOUT)

    def host_readable(self, hangup: bool) -> None:
        """The host socket reported new data, or a hangup (a FIN, reset or
        error queued): send what there is."""
        self.host_dry = False
        if hangup:
            self.host_hup = True
        self.push()

    def room_available(self) -> None:
        """The guest's queue has room again (context.RoomWaiter)."""
        if not self.closed:
            self.push()

    # -- timers, retransmission ----------------------------------------------

    def _arm(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._timeout)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def stop_timers(self) -> None:
        """Cancel retransmission and delayed ACK: nothing more goes to the guest."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None

    def _timeout(self) -> None:
        self.timer = None
        if self.closed:
            return
        self.retries += 1
        if self.retries > MAX_RETRIES:
            log.debug("guest stopped answering on port %d: reset", self.guest_port)
            self.reset_guest()
            return
        if not self.events & ESTABLISHED:
            if self.events & SOCK_ACCEPTED:
                self._send_syn(wtcp.SYN)
            elif self.events & TAP_SYN_ACK_SENT:
                self._send_syn(wtcp.SYN | wtcp.ACK)
            return
        if self.seq_to_tap != self.seq_ack_from_tap:
            self._rewind()

    def _rewind(self) -> None:
        """Go back to the guest's last ACK and send from there again."""
        self.dup_acks = 0
        self.shared.rewinds += 1
        sent = self.seq_to_tap
        if self.events & TAP_FIN_SENT and not self.events & TAP_FIN_ACKED:
            self._event(0, off=TAP_FIN_SENT | SOCK_FIN_RCVD)
            sent = (sent - 1) & 0xFFFFFFFF  # an ACK of the FIN waits for the FIN sent again
        if seq_diff(sent, self.seq_recover) > 0:
            self.seq_recover = sent
        self.seq_to_tap = self.seq_ack_from_tap
        if not self._peek_from_head():
            self.reset_guest()
            return
        self.host_dry = False
        self._arm(ACK_TIMEOUT * (1 << min(self.retries, 4)))
        self.push()

    # -- ending ----------------------------------------------------------------

    def _maybe_done(self) -> None:
        if self.events & TAP_FIN_RCVD and self.events & TAP_FIN_ACKED:
            self.remove()

    def reset_guest(self) -> None:
        """Reset the guest's end (if it knows of the connection) and drop the flow."""
        if self.events & (ESTABLISHED | TAP_SYN_ACK_SENT | SOCK_ACCEPTED | TAP_SYN_RCVD):
            self.control(wtcp.RST | wtcp.ACK)
        self.remove()

    def remove(self) -> None:
        """Take the flow out of the table, which closes it."""
        self.flow_ack_due = False
        self.ctx.flows.remove(self)

    # -- migration -------------------------------------------------------------

    def load(self, record: TcpFlowRecord) -> None:
        super().load(record)
        if self.seq_to_tap != self.seq_ack_from_tap:
            self._arm(ACK_TIMEOUT)  # what was in flight may be lost: send it again

    def resume(self) -> None:
        """After a migration: segments the guest sent while the connection moved
        are lost, so a duplicate ACK with the window tells it where to resume."""
        if self.closed:
            return
        self.control(wtcp.ACK)
        self.push()
