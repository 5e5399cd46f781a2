"""The state vocabulary of a TCP connection: its event bits, named once.

A connection's state is a set of events, as in passt's tcp_conn.h: what
happened on each side (SYN, FIN, their ACKs), not one enum, because the two
directions close independently.  The bits are passt's, so a record carries
them unchanged, with one exception: passt's 0x08 means TAP_SYN_ACK_SENT before
ESTABLISHED and SOCK_FIN_RCVD after.  In memory the two get bits of their own,
and `to_wire` / `from_wire` fold them into 0x08 and back, so the migration
record stays byte-identical (net/tcp_record.py).

Every change goes through `TcpState._event` below, which logs it by these
names; `TcpState` is the rest of what a connection knows, and net/tcp_core.py
the decisions made on it.
"""

from __future__ import annotations

import logging
import random
from typing import Final

from tether import loop as evloop
from tether.net import tcp_record as wire
from tether.net.flows import FlowKey
from tether.net.output import l4_offset
from tether.net.tcp_record import PIF_HOST, PIF_TAP, TcpFlowRecord
from tether.wire import inany
from tether.wire import tcp as wtcp

log = logging.getLogger(__name__)

DEFAULT_GUEST_MSS: Final = 536  # RFC 9293 section 3.7.1, when the SYN carries none
# What a host-side peek may return besides a byte count.
PEEK_NOTHING: Final = -1  # nothing to read now
PEEK_FAILED: Final = -2  # the socket failed

SOCK_ACCEPTED: Final = wire.SOCK_ACCEPTED
"""A host peer connected to a -t port; we sent the guest SYN."""
TAP_SYN_RCVD: Final = wire.TAP_SYN_RCVD
"""The guest sent SYN; the host socket is connecting."""
ESTABLISHED: Final = wire.ESTABLISHED
"""The three-way handshake with the guest completed."""
TAP_SYN_ACK_SENT: Final = wire.SYN_ACK_SENT_OR_SOCK_FIN_RCVD
"""The host socket connected and we sent the guest SYN|ACK (before ESTABLISHED)."""
SOCK_FIN_SENT: Final = wire.SOCK_FIN_SENT
"""The guest's FIN was passed on: the socket is shut down for writing."""
TAP_FIN_RCVD: Final = wire.TAP_FIN_RCVD
"""The guest sent FIN and the socket took everything before it."""
TAP_FIN_SENT: Final = wire.TAP_FIN_SENT
"""We sent the guest FIN (the host peer closed its side)."""
TAP_FIN_ACKED: Final = wire.TAP_FIN_ACKED
"""The guest acknowledged our FIN."""
SOCK_FIN_RCVD: Final = 0x100
"""The host socket read end-of-file (after ESTABLISHED; passt's 0x08 on the wire)."""

ALL: Final = 0x1FF  # every bit above: `_event(on, off=ALL)` replaces the state

NAMES: Final[tuple[tuple[int, str], ...]] = (
    (SOCK_ACCEPTED, "SOCK_ACCEPTED"), (TAP_SYN_RCVD, "TAP_SYN_RCVD"),
    (ESTABLISHED, "ESTABLISHED"), (TAP_SYN_ACK_SENT, "TAP_SYN_ACK_SENT"),
    (SOCK_FIN_RCVD, "SOCK_FIN_RCVD"), (SOCK_FIN_SENT, "SOCK_FIN_SENT"),
    (TAP_FIN_RCVD, "TAP_FIN_RCVD"), (TAP_FIN_SENT, "TAP_FIN_SENT"),
    (TAP_FIN_ACKED, "TAP_FIN_ACKED"),
)


def describe(events: int) -> str:
    """`events` by name, for the log: 'ESTABLISHED|TAP_FIN_SENT', or 'CLOSED' for none."""
    return "|".join(name for bit, name in NAMES if events & bit) or "CLOSED"


def to_wire(events: int) -> int:
    """In-memory events -> passt's bits, SOCK_FIN_RCVD folded into 0x08."""
    out = events & 0xFF
    if events & SOCK_FIN_RCVD:
        out |= wire.SYN_ACK_SENT_OR_SOCK_FIN_RCVD
    return out


def from_wire(bits: int) -> int:
    """passt's bits -> in-memory events: 0x08 is SOCK_FIN_RCVD once ESTABLISHED."""
    shared = wire.SYN_ACK_SENT_OR_SOCK_FIN_RCVD
    if bits & ESTABLISHED and bits & shared:
        return (bits & ~shared) | SOCK_FIN_RCVD
    return bits & 0xFF


def unscaled_syn_window(window: int, shift: int) -> int:
    """A SYN's window in the units of the connection's later segments.

    RFC 7323 section 2.2: the window of a SYN or SYN|ACK is never scaled.
    Stored as it came and shifted later, a 64 KiB window became 8 MiB; the
    guest dropped what lay beyond its real window, and the connection
    waited a whole retransmission timeout for its first data.  Rounding
    down keeps us inside what the guest offered.
    """
    return window >> shift


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space, as a signed 32-bit value (RFC 9293 section 3.4)."""
    return ((a - b + 0x80000000) & 0xFFFFFFFF) - 0x80000000


class TcpState:
    """What one connection with the guest knows, as passt's `struct tcp_tap_conn`:
    its events, sequence numbers, windows and scales, and the bookkeeping of
    what is due (timers, a held-back ACK, guest data the host had no room for).
    net/tcp_core.py's `TcpConn` decides on it.
    """

    __slots__ = (
        "ack_frame",
        "ack_mac",
        "ack_timer",
        "closed",
        "dup_acks",
        "events",
        "flow_ack_due",
        "guest_addr",
        "guest_port",
        "host_dry",
        "host_had_more",
        "host_hup",
        "key",
        "mss_to_guest",
        "outq_clear",
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
        "sock_blocked",
        "tap_mss",
        "timer",
        "wnd_from_tap",
        "wnd_to_tap",
        "ws_from_tap",
        "ws_to_tap",
    )

    def __init__(self, key: FlowKey, mss_to_guest: int) -> None:
        self.key = key
        _, self.guest_addr, self.guest_port, self.remote_addr, self.remote_port = key
        # Where segment payload starts in a frame to the guest, and the MSS we offer.
        self.payload_off = l4_offset(self.guest_addr) + wtcp.HLEN
        self.mss_to_guest = mss_to_guest
        self.events = 0
        self.closed = False  # closed or handed elsewhere: nothing more may happen
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
        # The last peek got all it asked for, less than the socket held: push()
        # claims by the window, without asking the socket again (SIOCINQ).
        self.host_had_more = False
        # The last push took all the host had sent (or found nothing): until the
        # socket's next read event, an ACK from the guest gives push nothing to do.
        self.host_dry = False
        self.host_hup = False  # the socket reported a hangup: push() must always look
        # The host's send queue was empty at the last look (or is new) and
        # nothing was written since: it still is (it only drains by itself),
        # so the window needs no SIOCOUTQ; in a host -> guest transfer, that
        # is every burst's.  SocketConn's, kept beside the other flags, where
        # it costs no memory (SocketConn's own fields end on a word boundary).
        self.outq_clear = False
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

    # -- state -------------------------------------------------------------

    def _event(self, on: int, off: int = 0) -> None:
        """The one place the event bits change (passt's conn_event_do): clear
        `off`, then set `on`, logging the transition when debugging."""
        old = self.events
        new = (old & ~off) | on
        self.events = new
        if new != old and log.isEnabledFor(logging.DEBUG):
            log.debug("tcp %d -> %d: %s -> %s", self.guest_port, self.remote_port,
                      describe(old), describe(new))

    # -- migration: passt's record (net/tcp_record.py) ----------------------------

    def record(self, host: tuple[bytes, bytes, int, int]) -> TcpFlowRecord:
        """passt's flowside is (oaddr, eaddr, oport, eport): "o" is our end of that side,
        "e" the endpoint's.  On the guest side our end is the address the guest talks to;
        `host` is the host side, from the socket."""
        guest = (inany.mapped(self.remote_addr), inany.mapped(self.guest_addr),
                 self.remote_port, self.guest_port)
        inbound = bool(self.events & SOCK_ACCEPTED)
        pif = (PIF_HOST, PIF_TAP) if inbound else (PIF_TAP, PIF_HOST)
        sides = (host, guest) if inbound else (guest, host)
        return TcpFlowRecord(pif, sides, self.retries, self.ws_from_tap, self.ws_to_tap,
                             to_wire(self.events), self.tap_mss, 0, 0, 0, self.wnd_from_tap,
                             self.wnd_to_tap, self.seq_to_tap, self.seq_ack_from_tap,
                             self.seq_from_tap, self.seq_ack_to_tap, self.seq_init_from_tap)

    def load(self, record: TcpFlowRecord) -> None:
        """Take the sequence state of a record (an established connection)."""
        self._event(from_wire(record.events))
        self.seq_to_tap = self.seq_recover = record.seq_to_tap
        self.seq_ack_from_tap = record.seq_ack_from_tap
        self.seq_from_tap = record.seq_from_tap
        self.seq_ack_to_tap = record.seq_ack_to_tap
        self.seq_init_from_tap = record.seq_init_from_tap
        self.wnd_from_tap = record.wnd_from_tap
        self.wnd_to_tap = record.wnd_to_tap
        self.ws_from_tap = record.ws_from_tap
        self.ws_to_tap = record.ws_to_tap
        self.tap_mss = record.tap_mss
        self.retries = record.retries

    # -- the host side, as TcpConn (net/tcp_core.py) uses it: net/tcp.py's SocketConn --

    def _peek(self, into: memoryview, want: int) -> int:
        """Copy up to `want` bytes the host sent, from the first not yet peeked,
        keeping them queued: bytes copied, 0 at end of stream, PEEK_NOTHING or
        PEEK_FAILED."""
        raise NotImplementedError

    def _peek_into(self, views: list[memoryview]) -> int:
        """_peek, filling `views` in order (one recvmsg): bytes copied, 0 at end
        of stream, PEEK_NOTHING or PEEK_FAILED."""
        raise NotImplementedError

    def _unread(self) -> int:
        """Bytes the host sent that are still queued (peeked or not); 0 if unknown."""
        raise NotImplementedError

    def _peek_from_head(self) -> bool:
        """Peek from the first byte the guest has not acknowledged again; False: failed."""
        raise NotImplementedError

    def _consume(self, n: int) -> bool:
        """Drop n bytes the guest acknowledged from the host queue; False: failed."""
        raise NotImplementedError

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        """Write guest data to the host: bytes taken (maybe 0), -1 when the socket failed."""
        raise NotImplementedError

    def _free_window(self) -> int:
        """The window to offer the guest, unscaled, from the host's free send space."""
        raise NotImplementedError

    def _watch_writable(self, on: bool) -> None:
        """Be told (host_writable) when the host takes data again, or stop being told."""
        raise NotImplementedError

    def _shutdown_write(self) -> None:
        """The guest sent FIN: pass it on to the host peer."""
        raise NotImplementedError

    def _reset_host(self) -> None:
        """The guest reset the connection: the host peer is to get RST on close."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the host side and timers (flows.Flow); called once, on removal."""
        raise NotImplementedError
