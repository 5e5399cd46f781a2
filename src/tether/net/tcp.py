"""TCP translation: the guest's TCP connection ends here and continues as a host socket.

tether speaks TCP to the guest itself and uses an ordinary kernel socket towards
the host, as passt does:

* guest -> host: in-order payload is written to the socket at once and only the
  bytes the socket took are acknowledged, so nothing the guest believes delivered
  can be lost; the window offered to the guest is the socket's free send space.
* host -> guest: data is read with MSG_PEEK at SO_PEEK_OFF and stays in the
  socket's receive queue until the guest acknowledges it; only then is it
  consumed.  Retransmission rewinds the peek offset, so tether keeps no copy.

The guest's side of a connection (sequence numbers, windows, ACKs, timers) is
net/tcp_core.py, which calls no socket; this module is its socket edge: the
translator that opens, accepts, dumps and restores connections, and
`SocketConn`, the core's host-side hooks on a kernel socket.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
from typing import Final

from tether import loop as evloop
from tether.net.context import NetContext
from tether.net.flows import FlowKey, TableFull
from tether.net.output import l4_offset
from tether.net.sockets import SIOCINQ, SIOCOUTQ, SO_PEEK_OFF, reset_on_close
from tether.net.tcp_core import TcpConn, TcpShared
from tether.net.tcp_record import ESTABLISHED, PIF_TAP, TAP_FIN_SENT, TcpFlowRecord
from tether.net.tcp_state import PEEK_FAILED, PEEK_NOTHING, TAP_SYN_ACK_SENT, seq_diff
from tether.ratelimit import limited
from tether.wire import inany, ipv4
from tether.wire import tcp as wtcp

log = logging.getLogger(__name__)

SNDBUF_REFRESH: Final = 64  # windows computed between two reads of SO_SNDBUF
CONNECT_TIMEOUT = 10.0  # a host-side connect with no answer gives its flow back (passt: 10 s)
WINDOW_FLOOR: Final = 1 << 20
_DISCARD: Final = bytearray(1 << 20)  # MSG_TRUNC target: the kernel copies nothing into it
_OUTQ: Final = bytearray(4)
_INQ: Final = bytearray(4)
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: IntFlag costs per call
_TRUNC: Final = int(socket.MSG_TRUNC)


def _sockaddr_side(sock: socket.socket) -> tuple[bytes, bytes, int, int]:
    """The host side of a flow as a flowside: (our address, peer address, ports)."""
    local = sock.getsockname()
    peer = sock.getpeername()
    # The family from the address's shape: sock.family builds an enum per call,
    # and a migration asks once per connection.
    family = socket.AF_INET6 if len(local) == 4 else socket.AF_INET
    return (inany.mapped(socket.inet_pton(family, local[0])),
            inany.mapped(socket.inet_pton(family, peer[0])), local[1], peer[1])


class SocketConn(TcpConn):
    """A TCP connection whose host side is a kernel socket: tcp_core's hooks."""

    __slots__ = ("fd", "sndbuf", "sndbuf_age", "sock", "translator")

    def __init__(self, translator: TcpTranslator, key: FlowKey, sock: socket.socket) -> None:
        super().__init__(translator, key)
        self.translator = translator
        self.sock = sock
        self.fd = sock.fileno()
        # A new connection's first windows take the floor, which the kernel's
        # first send buffer rarely passes: one system call less per short
        # connection.  restore() reads it at once.
        self.sndbuf = 0
        self.sndbuf_age = SNDBUF_REFRESH  # windows until sndbuf is read; 0: read it now
        self.outq_clear = True  # a new socket has queued nothing; restore() says otherwise

    def on_socket_event(self, events: int) -> None:
        """The loop's handler for this connection's socket: a bound method rather
        than a closure per connection, which would cost three objects more."""
        if events & evloop.WRITE and self.sock_blocked:
            self.host_writable()
            if self.closed:
                return
        if events & (evloop.READ | evloop.HANGUP):
            self.host_readable(bool(events & evloop.HANGUP))

    def _connected(self, _events: int) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            log.debug("connect to port %d failed: %s", self.remote_port, os.strerror(err))
            self.reset_guest()
            return
        self.loop.modify(self.fd, evloop.READ | evloop.HANGUP | evloop.EDGE,
                         self.on_socket_event)
        self.established()

    def established(self) -> None:
        """The host socket is connected (and watched for reading)."""
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        self.host_connected()

    def _connect_timeout(self) -> None:
        self.timer = None
        if not self.closed and not self.events & TAP_SYN_ACK_SENT:
            log.debug("connect to port %d: no answer in %g s", self.remote_port,
                      CONNECT_TIMEOUT)
            self.reset_guest()

    def close(self) -> None:
        self.closed = True
        self.stop_timers()
        self.translator.conns.pop(self.fd, None)
        self.loop.remove(self.fd)
        self.sock.close()

    def host_side(self) -> tuple[bytes, bytes, int, int]:
        try:
            return _sockaddr_side(self.sock)
        except OSError:
            return (bytes(16), bytes(16), 0, 0)  # the peer is gone; the record still stands

    # -- tcp_core's hooks ----------------------------------------------------

    def _peek(self, into: memoryview, want: int) -> int:
        try:
            return self.sock.recv_into(into, want, _PEEK)
        except BlockingIOError:
            return PEEK_NOTHING
        except OSError as exc:
            log.debug("recv from host: %s", exc)
            return PEEK_FAILED

    def _peek_into(self, views: list[memoryview]) -> int:
        try:
            return self.sock.recvmsg_into(views, 0, _PEEK)[0]
        except BlockingIOError:
            return PEEK_NOTHING
        except OSError as exc:
            log.debug("recv from host: %s", exc)
            return PEEK_FAILED

    def _unread(self) -> int:
        try:
            fcntl.ioctl(self.fd, SIOCINQ, _INQ)
        except OSError:
            return 0
        return int.from_bytes(_INQ, "little")

    def _peek_from_head(self) -> bool:
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError:
            return False
        return True

    def _consume(self, n: int) -> bool:
        while n > 0:
            try:
                got = self.sock.recv_into(_DISCARD, min(n, len(_DISCARD)), _TRUNC)
            except OSError as exc:
                log.debug("consume: %s", exc)
                return False
            if got <= 0:
                break
            n -= got
        return True

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        self.outq_clear = False
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            log.debug("send to host: %s", exc)
            return -1

    def _free_window(self) -> int:
        """Free space in the socket's send buffer, but at least WINDOW_FLOOR.

        The kernel grows a socket's send buffer only as the connection speeds up,
        so offering just the free space starts a slow feedback loop (the guest
        cannot send fast because the buffer is small, and the other way round).
        What the socket cannot take at once is held in `pending` (up to
        PENDING_MAX, more than the floor), not dropped, so the floor costs no data.
        """
        try:
            if not self.sndbuf_age:
                # The kernel's autotuning moves it slowly: one read per
                # SNDBUF_REFRESH windows saves a system call on every ACK.
                self.sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                self.sndbuf_age = SNDBUF_REFRESH
            self.sndbuf_age -= 1
            if self.outq_clear:
                # Nothing written since the queue was last seen empty (or
                # ever: most short connections' windows).
                queued = 0
            else:
                fcntl.ioctl(self.fd, SIOCOUTQ, _OUTQ)
                queued = int.from_bytes(_OUTQ, "little")
                self.outq_clear = queued == 0
        except OSError:
            return 0
        free = max(self.sndbuf - queued, WINDOW_FLOOR)
        return min(free >> self.ws_to_tap, 0xFFFF)

    def _watch_writable(self, on: bool) -> None:
        events = evloop.READ | evloop.HANGUP | evloop.EDGE
        self.loop.modify(self.fd, events | evloop.WRITE if on else events)

    def _shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _reset_host(self) -> None:
        reset_on_close(self.sock)


class TcpTranslator(TcpShared):
    """The stack's TCP: guest segments to their connections, a host socket for each.

    Opens a host socket when the guest sends SYN (outbound) and a connection to
    the guest when a host peer connects to a -t port (inbound), answers
    segments for no connection with RST, and dumps, forgets and restores
    established connections for migration.  `conns` holds the connections by
    socket fd; the flow table holds them by their guest-side 4-tuple.
    """

    def __init__(self, ctx: NetContext) -> None:
        super().__init__(ctx)
        self.conns: dict[int, SocketConn] = {}  # by socket fd

    def raw_reset(self, key: FlowKey, seq: int, ack: int, flags: int) -> None:
        """A reset for a segment that has no connection (RFC 9293 section 3.10.7.1)."""
        frame = bytearray(l4_offset(key[1]) + wtcp.HLEN)
        self.ctx.send(self.ctx.output.tcp(frame, 0, key[3], key[4], key[1], key[2], seq,
                                          ack, flags, 0))

    # -- frames from the guest -------------------------------------------

    def from_guest(self, src: bytes, dst: bytes, segment: memoryview) -> None:
        hdr = wtcp.parse(segment)
        key = (ipv4.PROTO_TCP, src, hdr.sport, dst, hdr.dport)
        conn = self.ctx.flows.get(key)
        payload = segment[hdr.header_len:]
        if conn is None:
            self._no_flow(key, hdr, segment, payload)
            return
        assert isinstance(conn, TcpConn)
        conn.segment(hdr, segment, payload)

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
            self.raw_reset(key, hdr.ack, 0, wtcp.RST)
        else:
            self.raw_reset(key, 0, (hdr.seq + seg_len) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)

    def _connect(self, key: FlowKey, hdr: wtcp.Tcp, opts: wtcp.SynOptions) -> None:
        ctx = self.ctx
        target = ctx.host_target(key[3], key[4])
        if target is None:
            return
        try:
            ctx.flows.check_room()
        except TableFull as full:
            limited(log, logging.WARNING, "refusing TCP connection: %s", full)
            self.raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        family = socket.AF_INET if len(key[3]) == 4 else socket.AF_INET6
        try:
            # Non-blocking from the start: no fcntl of its own.
            sock = ctx.outbound_socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # -o gave an address this socket cannot bind
            log.debug("tcp socket: %s", exc)
            self.raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        address = (target, key[4])
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            # Towards a local service (loopback, the usual -T/gateway case)
            # the kernel has done the whole handshake by the time connect
            # returns: asking again says so (0), and the SYN|ACK goes to the
            # guest now instead of a loop pass later, without the writable
            # event and the epoll change it would take.  Still going:
            # EALREADY; refused meanwhile: its error.
            err = sock.connect_ex(address)
            if err == errno.EALREADY:
                err = errno.EINPROGRESS
        if err not in (0, errno.EISCONN, errno.EINPROGRESS):
            sock.close()
            self.raw_reset(key, 0, (hdr.seq + 1) & 0xFFFFFFFF, wtcp.RST | wtcp.ACK)
            return
        conn = SocketConn(self, self.ctx.flows.canonical(key), sock)
        conn.guest_syn(hdr, opts)
        ctx.flows.add(conn)
        self.conns[conn.fd] = conn
        if err != errno.EINPROGRESS:
            self.loop.add(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE,
                          conn.on_socket_event)
            conn.established()
            return
        self.loop.add(conn.fd, evloop.WRITE | evloop.HANGUP, conn._connected)
        # A peer that never answers (a blackholed address) would hold the flow
        # for the kernel's whole SYN retry time (~2 min); _send_syn re-arms.
        conn.timer = self.loop.call_later(CONNECT_TIMEOUT, conn._connect_timeout)

    # -- inbound (-t) ------------------------------------------------------

    def accepted(self, sock: socket.socket, guest_addr: bytes, guest_port: int,
                 remote_addr: bytes, remote_port: int) -> None:
        """A host peer connected to a forwarded port: open the connection to the guest."""
        key = (ipv4.PROTO_TCP, guest_addr, guest_port, remote_addr, remote_port)
        flows = self.ctx.flows
        if flows.get(key) is not None:
            sock.close()
            return
        try:
            flows.check_room()
        except TableFull as exc:
            limited(log, logging.WARNING, "refusing inbound TCP connection: %s", exc)
            reset_on_close(sock)
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        conn = SocketConn(self, self.ctx.flows.canonical(key), sock)
        flows.add(conn)
        self.conns[conn.fd] = conn
        self.loop.add(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE, conn.on_socket_event)
        conn.host_accepted()

    # -- migration -----------------------------------------------------------

    def dump(self) -> list[tuple[TcpFlowRecord, socket.socket]]:
        """Established connections: passt-style record and host socket for each.

        The socket's kernel state (sequence numbers, queues: with data the guest
        has not acknowledged still in the receive queue) is the other half of a
        flow; dumping it needs TCP_REPAIR, which is the migration code's job.
        """
        return [(c.record(c.host_side()), c.sock) for c in self.conns.values()
                if c.events & ESTABLISHED]

    def forget(self) -> list[socket.socket]:
        """Drop every connection without closing its socket: the caller owns them now."""
        sockets = []
        for conn in list(self.conns.values()):
            self.loop.remove(conn.fd)
            conn.stop_timers()  # a delayed ACK too: the socket is the caller's now
            conn.closed = True  # and nothing else may touch it
            self.conns.pop(conn.fd, None)
            conn.flow_ack_due = False
            self.ctx.flows.detach(conn)
            sockets.append(conn.sock)
        self.ctx.forget_waiting()
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
        remote, guest = inany.unmapped(oaddr), inany.unmapped(eaddr)
        if len(remote) != len(guest):
            raise ValueError("guest side mixes IPv4 and IPv6")
        key = (ipv4.PROTO_TCP, guest, eport, remote, oport)
        flows = self.ctx.flows
        if flows.get(key) is not None:
            raise ValueError(f"a flow for {key!r} exists already")
        flows.check_room()
        sock.setblocking(False)
        in_flight = seq_diff(record.seq_to_tap, record.seq_ack_from_tap)
        if in_flight < 0:
            raise ValueError("record acknowledges more than was sent")
        # Data sent to the guest but not acknowledged is still in the receive queue:
        # peeking resumes right after it.  A FIN already sent takes no queue byte.
        fin_sent = bool(record.events & TAP_FIN_SENT)
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, max(in_flight - fin_sent, 0))
        conn = SocketConn(self, self.ctx.flows.canonical(key), sock)
        conn.outq_clear = False  # the restored send queue may hold data
        conn.sndbuf_age = 0
        flows.add(conn)
        self.conns[conn.fd] = conn
        self.loop.add(conn.fd, evloop.READ | evloop.HANGUP | evloop.EDGE, conn.on_socket_event)
        conn.load(record)
        self.loop.call_soon(conn.resume)
        return conn
