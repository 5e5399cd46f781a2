"""UDP flows: each guest (address, port) -> remote (address, port) pair gets a host socket.

Outbound flows use a connected socket, so only the remote's answers come back.
Inbound flows (-u) share the forwarded port's bound socket and answer with
sendto(), so the peer sees replies from the port it sent to.  Every flow
expires after params.udp_timeout seconds without traffic either way.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Final

from tether import loop as evloop
from tether.net.context import NetContext
from tether.net.flows import FlowKey, TableFull, expire_when_idle
from tether.net.output import L2L3_V6, UDP_PAYLOAD, l4_offset
from tether.ratelimit import limited
from tether.wire import ipv4, udp

log = logging.getLogger(__name__)

MAX_PAYLOAD: Final = 65535 - ipv4.HLEN - udp.HLEN
READ_BATCH: Final = 64  # datagrams per wake-up of a busy socket, at most


@dataclass(frozen=True)
class UdpFlowRecord:
    """One UDP flow, enough to re-create it with the same ports elsewhere."""

    inbound: bool
    """A host peer started it through a -u port (its socket is that port's)."""
    guest_addr: bytes  # 4 or 16 bytes, as on the wire
    guest_port: int
    remote_addr: bytes  # as the guest sees it
    remote_port: int
    local: tuple[str, int]
    """The host socket's own address and port."""
    peer: tuple[str, int]
    """The host-side remote: where datagrams from the guest go."""


class UdpFlow:
    """One guest (address, port) <-> remote (address, port) pair and its host socket:
    its own connected socket (outbound) or a -u port's shared one (inbound)."""

    __slots__ = ("key", "last_used", "loop", "owns_socket", "peer", "sock", "timer")

    def __init__(self, loop: evloop.Loop, key: FlowKey, sock: socket.socket,
                 peer: tuple[str, int] | tuple[str, int, int, int] | None) -> None:
        self.loop = loop
        self.key = key
        self.sock = sock
        self.peer = peer  # None: sock is connected to the remote
        self.owns_socket = peer is None
        self.last_used = loop.now()
        self.timer: evloop.Timer | None = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.owns_socket:
            self.loop.remove(self.sock.fileno())
            self.sock.close()


class UdpTranslator:
    """The stack's UDP: guest datagrams to host sockets and back, one flow per pair.

    Datagrams from the host are read straight into one frame buffer shared by
    all flows, behind the room for the headers: the sink copies each frame
    before `send` returns (frames.FrameSink), so no datagram costs 64 KiB.
    """

    def __init__(self, ctx: NetContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self._frame_buf = bytearray(L2L3_V6 + udp.HLEN + MAX_PAYLOAD)
        self._frame_view = memoryview(self._frame_buf)

    def from_guest(self, src: bytes, dst: bytes, datagram: memoryview) -> None:
        sport, dport, length = udp.parse(datagram)
        payload = datagram[udp.HLEN:length]
        key = (ipv4.PROTO_UDP, src, sport, dst, dport)
        flow = self.ctx.flows.get(key)
        if flow is None:
            flow = self._open(key)
            if flow is None:
                return
        assert isinstance(flow, UdpFlow)
        flow.last_used = self.loop.now()
        try:
            if flow.peer is None:
                flow.sock.send(payload)
            else:
                flow.sock.sendto(payload, flow.peer)
        except OSError as exc:
            # Datagrams may be lost; a full buffer or an ICMP error is not a reason to stop.
            log.debug("udp send to port %d: %s", dport, exc)

    def _open(self, key: FlowKey) -> UdpFlow | None:
        ctx = self.ctx
        target = ctx.host_target(key[3], key[4])
        if target is None:
            return None
        try:
            ctx.flows.check_room()
        except TableFull as full:
            limited(log, logging.WARNING, "dropping UDP datagram: %s", full)
            return None
        family = socket.AF_INET if len(key[3]) == 4 else socket.AF_INET6
        try:
            sock = ctx.outbound_socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            log.debug("udp socket: %s", exc)
            return None
        sock.setblocking(False)
        try:
            sock.connect((target, key[4]))
        except OSError as exc:
            log.debug("udp connect to %s:%d: %s", target, key[4], exc)
            sock.close()
            return None
        flow = UdpFlow(self.loop, key, sock, None)
        ctx.flows.add(flow)
        self._watch(flow)
        self._schedule_expiry(flow)
        return flow

    def _watch(self, flow: UdpFlow) -> None:
        """Read the flow's own socket when it is readable."""
        pace = evloop.ReadPace(self.loop, READ_BATCH)
        self.loop.add(flow.sock.fileno(), evloop.READ, lambda ev: self._readable(flow, pace))

    def _readable(self, flow: UdpFlow, pace: evloop.ReadPace) -> None:
        into = self._frame_view[l4_offset(flow.key[1]) + udp.HLEN:]
        got = 0
        for _ in range(pace.wake()):  # bounded per wake-up: other flows are served too
            try:
                n = flow.sock.recv_into(into, MAX_PAYLOAD)
            except BlockingIOError:
                break
            except OSError as exc:
                log.debug("udp recv: %s", exc)  # e.g. ECONNREFUSED from an ICMP error
                continue
            got += 1
            # No room towards the guest: the datagram is dropped (UDP may lose it), but it
            # is read, or the level-triggered socket would wake the loop without end.
            if self.ctx.has_room():
                self._to_guest(flow, n)
        pace.done(got)

    def _to_guest(self, flow: UdpFlow, n: int) -> None:
        """The datagram of n bytes in the frame buffer to the guest (copied by send)."""
        _, guest_addr, guest_port, remote_addr, remote_port = flow.key
        flow.last_used = self.loop.now()
        ctx = self.ctx
        ctx.send(ctx.output.udp(self._frame_buf, n, remote_addr, remote_port, guest_addr,
                                guest_port))

    def _schedule_expiry(self, flow: UdpFlow) -> None:
        expire_when_idle(self.loop, self.ctx.flows, flow, self.ctx.params.udp_timeout)

    # -- inbound (-u) ------------------------------------------------------

    def inbound(self, sock: socket.socket, guest_port: int, pace: evloop.ReadPace) -> None:
        """A forwarded port's socket is readable: datagrams from host peers to the guest."""
        ctx = self.ctx
        off = UDP_PAYLOAD if sock.family == socket.AF_INET else L2L3_V6 + udp.HLEN
        into = self._frame_view[off:]
        got = 0
        for _ in range(pace.wake()):
            try:
                n, peer = sock.recvfrom_into(into, MAX_PAYLOAD)
            except BlockingIOError:
                break
            except OSError:
                continue
            got += 1
            remote = ctx.guest_view_of(peer[0])
            guest_addr = ctx.guest_addr_for(sock.family, remote)
            if guest_addr is None or not ctx.has_room():
                continue  # nobody to deliver to yet: datagrams may be dropped
            key = (ipv4.PROTO_UDP, guest_addr, guest_port, remote, peer[1])
            flow = ctx.flows.get(key)
            if flow is None:
                try:
                    ctx.flows.check_room()
                except TableFull:
                    continue
                flow = UdpFlow(self.loop, key, sock, peer)
                ctx.flows.add(flow)
                self._schedule_expiry(flow)
            assert isinstance(flow, UdpFlow)
            self._to_guest(flow, n)
        pace.done(got)

    # -- migration -----------------------------------------------------------

    def dump(self) -> list[UdpFlowRecord]:
        out = []
        for flow in self.ctx.flows:
            if not isinstance(flow, UdpFlow):
                continue
            _, guest, gport, remote, rport = flow.key
            try:
                local = flow.sock.getsockname()[:2]
                peer = flow.peer or flow.sock.getpeername()[:2]
            except OSError:
                continue  # the socket lost its remote: nothing to carry
            out.append(UdpFlowRecord(flow.peer is not None, guest, gport, remote, rport,
                                     (local[0], local[1]), (peer[0], peer[1])))
        return out

    def forget_outbound(self) -> int:
        """Close every flow that owns its socket, so another instance can take its port."""
        flows = [f for f in self.ctx.flows if isinstance(f, UdpFlow) and f.owns_socket]
        for flow in flows:
            self.ctx.flows.remove(flow)
        return len(flows)

    def restore(self, record: UdpFlowRecord, forwarded: dict[int, socket.socket]) -> None:
        """Re-create a flow with the same host ports; OSError/ValueError/TableFull leave
        nothing behind.  `forwarded` maps the -u ports to their sockets."""
        key = (ipv4.PROTO_UDP, record.guest_addr, record.guest_port, record.remote_addr,
               record.remote_port)
        if self.ctx.flows.get(key) is not None:
            raise ValueError("the flow exists already")
        self.ctx.flows.check_room()
        if record.inbound:
            sock = forwarded.get(record.local[1])
            if sock is None:
                raise ValueError(f"no -u socket for port {record.local[1]} here")
            flow = UdpFlow(self.loop, key, sock, record.peer)
            self.ctx.flows.add(flow)
            self._schedule_expiry(flow)
            return
        family = socket.AF_INET6 if ":" in record.local[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(record.local)
            sock.connect(record.peer)
        except OSError:
            sock.close()
            raise
        flow = UdpFlow(self.loop, key, sock, None)
        self.ctx.flows.add(flow)
        self._watch(flow)
        self._schedule_expiry(flow)
