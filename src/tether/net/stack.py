"""The stack: dispatches guest frames, answers ARP and DHCP, owns the flow table.

Construct one per guest, give it a FrameSink, hand it to the transport as its
GuestPort:

    stack = Stack(loop, params)
    transport = SomeTransport(loop, ..., port=stack)
    stack.attach(transport)         # transport implements frames.FrameSink
    stack.start()                   # opens inbound forwarding sockets
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import socket
from collections.abc import Sequence
from typing import Final

from tether import loop as evloop
from tether.frames import FrameSink, InPlaceSink, in_place_of
from tether.net import dhcp as dhcp_server
from tether.net import dhcpv6 as dhcpv6_server
from tether.net.addresses import GuestAddresses
from tether.net.context import RoomWaiter
from tether.net.flows import FlowTable
from tether.net.icmp import IcmpTranslator
from tether.net.output import L2L3_V6, UDP_PAYLOAD, Output
from tether.net.params import NetParams, PortRange
from tether.net.tcp import TcpTranslator
from tether.net.tcp_record import TcpFlowRecord
from tether.net.udp import READ_BATCH as UDP_READ_BATCH
from tether.net.udp import UdpFlowRecord, UdpTranslator
from tether.ratelimit import limited
from tether.wire import ParseError, arp, dhcp, dhcpv6, ethernet, inany, ipv4, ipv6, ndp, udp

log = logging.getLogger(__name__)

ACCEPT_BACKOFF: Final = 0.5  # s a -t listener rests after accept() failed (EMFILE...)

_IP_FREEBIND: Final = 15  # linux/in.h
_IPV6_FREEBIND: Final = 78  # linux/in6.h


class Stack:
    """One guest's network: implements frames.GuestPort, provides context.NetContext.

    Frames from the guest are parsed here and answered (ARP, DHCP, DHCPv6, NDP)
    or handed to the translators (TCP, UDP, ICMP echo), which reach the stack
    only through the NetContext interface; frames to the guest leave through
    `send`, flushed once per loop pass.
    """

    def __init__(self, loop: evloop.Loop, params: NetParams) -> None:
        self.loop = loop
        self.params = params
        self.addrs = GuestAddresses()
        self.flows = FlowTable(params.max_flows)
        self.output = Output(params.our_mac)
        self.tcp = TcpTranslator(self)
        self.udp = UdpTranslator(self)
        self.icmp = IcmpTranslator(self)
        self.bad_frames = 0
        self.internal_errors = 0
        self._sink: FrameSink | None = None
        self._in_place: InPlaceSink | None = None  # the sink, when it offers claim()
        self._flush_due = False
        # Insertion-ordered set: each waiter once, in the order they stopped.
        self._waiting: dict[RoomWaiter, None] = {}
        self._listeners: list[socket.socket] = []

    # -- wiring ------------------------------------------------------------

    def attach(self, sink: FrameSink) -> None:
        self._sink = sink
        self._in_place = in_place_of(sink)
        self.output.in_place = self._in_place is not None

    def start(self) -> None:
        """Open the inbound forwarding sockets (-t, -u); OSError if a port is taken
        (ports of an 'all' spec that cannot be bound are skipped, as in passt)."""
        p = self.params
        # 'all' could take every descriptor: half of them stay for the flows.
        budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2
        skipped = 0
        work: tuple[tuple[int, tuple[PortRange, ...], bool], ...] = (
            (socket.SOCK_STREAM, p.tcp_forward, p.tcp), (socket.SOCK_DGRAM, p.udp_forward, p.udp))
        for kind, ranges, enabled in work:
            if not enabled:
                continue
            for rng in ranges:
                for family in self._forward_families(rng):
                    for port in range(rng.first, rng.last + 1):
                        if rng.best_effort and len(self._listeners) >= budget:
                            skipped += 1
                            continue
                        try:
                            s = self._listen(family, kind, port, rng)
                        except OSError:
                            if rng.best_effort:
                                continue
                            raise
                        gport = rng.guest_port(port)
                        if kind == socket.SOCK_STREAM:
                            s.listen(128)
                            self.loop.add(s.fileno(), evloop.READ, self._acceptor(s, gport))
                        else:
                            self.loop.add(s.fileno(), evloop.READ, self._receiver(s, gport))
        if skipped:
            log.warning("'all' forwarding: %d ports not bound, to keep file descriptors "
                        "for connections (RLIMIT_NOFILE %d)", skipped, budget * 2)

    def _forward_families(self, rng: PortRange) -> list[int]:
        # Like passt: both families when the guest has IPv6, each socket v6-only so
        # an IPv4 peer stays IPv4 all the way to the guest; one listening address
        # means that address's family only.
        if rng.address is not None:
            return [socket.AF_INET6 if ":" in rng.address else socket.AF_INET]
        p = self.params
        families: list[int] = [socket.AF_INET] if p.ipv4 else []
        if p.addr6 and p.ipv6:
            families.append(socket.AF_INET6)
        return families

    def _acceptor(self, s: socket.socket, guest_port: int) -> evloop.FdHandler:
        return lambda _events: self._accept(s, guest_port)

    def _receiver(self, s: socket.socket, guest_port: int) -> evloop.FdHandler:
        pace = evloop.ReadPace(self.loop, UDP_READ_BATCH)
        return lambda _events: self.udp.inbound(s, guest_port, pace)

    def _listen(self, family: int, kind: int, port: int, rng: PortRange) -> socket.socket:
        s = socket.socket(family, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setblocking(False)
        try:
            if rng.ifname is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, rng.ifname.encode())
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if self.params.freebind:
                    s.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
                s.bind((rng.address or "::", port))
            else:
                if self.params.freebind:
                    s.setsockopt(socket.IPPROTO_IP, _IP_FREEBIND, 1)
                s.bind((rng.address or self.params.forward_bind4, port))
        except OSError:
            s.close()
            raise
        self._listeners.append(s)
        return s

    def outbound_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A host socket for a guest-initiated flow, bound as -o / --outbound-if* say."""
        p = self.params
        v6 = family == socket.AF_INET6
        s = socket.socket(family, kind, proto)
        try:
            ifname = p.outbound_if6 if v6 else p.outbound_if4
            if ifname is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            address = p.outbound6 if v6 else p.outbound4
            if address is not None:
                s.bind((address, 0))
        except OSError:
            s.close()
            raise
        return s

    def close(self) -> None:
        self.flows.close_all()
        for s in self._listeners:
            self.loop.remove(s.fileno())
            s.close()
        self._listeners.clear()

    # -- frames.GuestPort --------------------------------------------------

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        for frame in frames:
            try:
                self._frame(frame)
            except ParseError as exc:
                self.bad_frames += 1
                log.debug("dropped guest frame: %s", exc)
            except Exception:
                # A bug, not bad input: say so loudly, but one frame must not take
                # every other connection down with the daemon.
                self.internal_errors += 1
                limited(log, logging.ERROR, "internal error handling a guest frame",
                        exc_info=True)
        self.tcp.end_of_batch()

    def guest_room_available(self) -> None:
        waiting, self._waiting = self._waiting, {}
        for waiter in waiting:
            waiter.room_available()

    # -- used by the translators -------------------------------------------

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Queue a frame for the guest; it is flushed before the loop sleeps again.

        Why here and not at each caller: a vhost-user or stream transport makes
        queued frames visible (and notifies the guest) only at flush(), and every
        path that forgot to flush (a connect completing, a timer) left its frame
        waiting for the next unrelated event, often the guest's own retransmission
        a second later.  Flushing once per loop pass in which anything was queued
        keeps a burst in one notification and leaves nothing to remember.
        """
        if self._sink is None:
            return False
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)
        return self._sink.send_frame(frame)

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        """frames.InPlaceSink.claim, where the sink offers it; else 0."""
        sink = self._in_place
        # The payload is never seen here, so only a guest that completes
        # the checksums can take it (Output.partial_l4_checksums).
        if sink is None or not self.output.partial_l4_checksums:
            return 0
        return sink.claim(headroom, payload_max, total, views)

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        """frames.InPlaceSink.commit, flushed as send() is."""
        sink = self._in_place
        if sink is None:
            return False
        if not self._flush_due:
            self._flush_due = True
            self.loop.call_soon(self._flush)
        return sink.commit(headers, payload_len)

    def _flush(self) -> None:
        self._flush_due = False
        if self._sink is not None:
            self._sink.flush()

    def has_room(self) -> bool:
        return self._sink is not None and self._sink.has_room()

    def wait_for_room(self, waiter: RoomWaiter) -> None:
        self._waiting[waiter] = None

    def guest_addr4(self) -> bytes:
        """Where inbound traffic goes: what the guest uses, else what DHCP gives it."""
        return self.addrs.addr4 or self.params.addr4

    def host_target(self, dst: bytes, port: int) -> str | None:
        """The host address a guest destination maps to, None for nowhere."""
        p = self.params
        if len(dst) == 16:
            if inany.is_v4_mapped(dst):
                # An IPv6 socket reaches ::ffff:a.b.c.d as IPv4's a.b.c.d: the same
                # rules, or the mapped form would reach what they keep from the guest.
                target4 = self._host_target4(dst[12:], port)
                return None if target4 is None else f"::ffff:{target4}"
            if p.map_host_loopback6 is not None and dst in (p.map_host_loopback6, p.router6):
                return "::1"
            if p.map_guest_addr6 is not None and dst == p.map_guest_addr6 and \
                    p.addr6 is not None:
                return str(ipaddress.IPv6Address(p.addr6))
            addr6 = ipaddress.IPv6Address(dst)
            if addr6.is_multicast or addr6.is_unspecified or addr6.is_loopback or \
                    addr6.is_link_local:
                return None
            return str(addr6)
        return self._host_target4(dst, port)

    def _host_target4(self, dst: bytes, port: int) -> str | None:
        p = self.params
        if p.map_host_loopback4 is not None and dst == p.map_host_loopback4:
            return "127.0.0.1"
        if p.map_guest_addr4 is not None and dst == p.map_guest_addr4:
            return socket.inet_ntoa(p.addr4)
        if p.dns_match4 is not None and p.dns_host4 is not None and dst == p.dns_match4 \
                and port == 53:
            return socket.inet_ntoa(p.dns_host4)
        addr = ipaddress.IPv4Address(dst)
        if addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address(
                "255.255.255.255") or addr.is_loopback:
            return None
        return str(addr)

    def guest_addr_for(self, family: int, remote: bytes = b"") -> bytes | None:
        """Where inbound traffic from remote (as the guest sees it) goes.

        A link-local remote (tether's own address standing for the host's ::1) is
        paired with the guest's link-local address, so the guest's replies, whose
        source it picks by scope, come back on the same flow.
        """
        if family == socket.AF_INET:
            return self.guest_addr4()
        if remote[:2] == b"\xfe\x80" and self.addrs.addr6_ll is not None:
            return self.addrs.addr6_ll
        return self.addrs.addr6 or self.params.addr6

    def guest_view_of(self, host_addr: str) -> bytes:
        """How a host peer's address looks to the guest (loopback becomes the gateway)."""
        if ":" in host_addr:
            raw6 = socket.inet_pton(socket.AF_INET6, host_addr)
            if raw6 == ipaddress.IPv6Address("::1").packed or raw6 == self.guest_addr_for(
                    socket.AF_INET6):
                return self.params.map_host_loopback6 or self.params.router6
            return raw6
        raw = socket.inet_aton(host_addr)
        mapped = self.params.map_host_loopback4 or self.params.gateway4
        if raw == self.guest_addr4() and self.params.map_guest_addr4 is not None:
            return self.params.map_guest_addr4
        if raw[0] == 127 or raw == self.guest_addr4():
            return mapped
        return raw

    # -- dispatch ----------------------------------------------------------

    def _frame(self, frame: memoryview) -> None:
        __dst_mac, src_mac, ethertype = ethernet.parse(frame)
        if not src_mac[0] & 1 and src_mac != self.addrs.mac:
            self.addrs.mac = src_mac
            self.output.guest_mac = src_mac
        payload = frame[ethernet.HLEN:]
        if ethertype == ethernet.TYPE_ARP and self.params.ipv4:
            self._arp(payload)
        elif ethertype == ethernet.TYPE_IPV4 and self.params.ipv4:
            self._ipv4(payload)
        elif ethertype == ethernet.TYPE_IPV6 and self.params.ipv6:
            self._ipv6(payload)

    def _arp(self, payload: memoryview) -> None:
        req = arp.parse(payload)
        if req.op != arp.OP_REQUEST:
            return
        if req.spa != bytes(4) and req.spa != self.addrs.addr4:
            self.addrs.addr4 = req.spa
        if req.tpa == req.spa or req.tpa == self.guest_addr4():
            return  # gratuitous ARP or duplicate address detection: the guest's own
        frame = bytearray(ethernet.HLEN + arp.LEN)
        ethernet.pack_into(frame, 0, req.sha, self.params.our_mac, ethernet.TYPE_ARP)
        arp.pack_into(frame, ethernet.HLEN,
                      arp.Arp(arp.OP_REPLY, self.params.our_mac, req.tpa, req.sha, req.spa))
        self.send(frame)

    def _ipv4(self, packet: memoryview) -> None:
        hdr = ipv4.parse(packet)
        body = packet[hdr.header_len:hdr.total_len]
        if hdr.src != bytes(4) and hdr.src != self.addrs.addr4 and hdr.src[0] != 127 \
                and hdr.src[0] < 224:
            self.addrs.addr4 = hdr.src
        p = self.params
        if hdr.proto == ipv4.PROTO_UDP:
            __sport, dport, length = udp.parse(body)
            if dport == dhcp.SERVER_PORT:
                if p.dhcp:
                    self._dhcp(body[udp.HLEN:length])
                return
            if hdr.src == bytes(4) or not p.udp:
                return
            self.udp.from_guest(hdr.src, hdr.dst, body)
        elif hdr.src == bytes(4):
            return
        elif hdr.proto == ipv4.PROTO_TCP and p.tcp:
            self.tcp.from_guest(hdr.src, hdr.dst, body)
        elif hdr.proto == ipv4.PROTO_ICMP and p.icmp:
            self.icmp.from_guest(hdr.src, hdr.dst, body)

    def _ipv6(self, packet: memoryview) -> None:
        hdr = ipv6.parse(packet)
        body = packet[ipv6.HLEN:ipv6.HLEN + hdr.payload_len]
        src = hdr.src
        if src[0] == 0xFE and src[1] & 0xC0 == 0x80:
            self.addrs.addr6_ll = src
        elif src != ipv6.UNSPECIFIED and src[0] != 0xFF:
            self.addrs.addr6 = src
        nxt = hdr.next_header
        p = self.params
        if nxt == ipv6.PROTO_ICMPV6:
            if len(body) >= 1 and body[0] in (ndp.ROUTER_SOLICITATION,
                                              ndp.NEIGHBOR_SOLICITATION):
                wanted = p.ra if body[0] == ndp.ROUTER_SOLICITATION else p.ndp
                if hdr.hop_limit == ndp.HOP_LIMIT and wanted:
                    self._ndp(src, body)
            elif src != ipv6.UNSPECIFIED and p.icmp:
                self.icmp.from_guest(src, hdr.dst, body)
        elif src == ipv6.UNSPECIFIED or src[0] == 0xFF:
            return
        elif nxt == ipv4.PROTO_UDP:
            _sport, dport, length = udp.parse(body)
            if dport == dhcpv6.SERVER_PORT:
                if p.dhcpv6:
                    self._dhcpv6(src, body[udp.HLEN:length])
            elif p.udp:
                self.udp.from_guest(src, hdr.dst, body)
        elif nxt == ipv4.PROTO_TCP and p.tcp:
            self.tcp.from_guest(src, hdr.dst, body)
        # Extension headers and other protocols: dropped.

    def _ndp(self, src: bytes, message: memoryview) -> None:
        p = self.params
        sol = ndp.parse(message)
        if sol.type == ndp.ROUTER_SOLICITATION:
            if p.addr6 is None:
                return
            prefix = (int.from_bytes(p.addr6, "big") >> (128 - p.prefix6) <<
                      (128 - p.prefix6)).to_bytes(16, "big")
            answer = ndp.build_ra(p.our_mac, prefix, p.prefix6, p.mtu if p.announce_mtu else 0,
                                  p.dns6)
            dst = src if src != ipv6.UNSPECIFIED else ipv6.ALL_NODES
        else:
            own = (self.addrs.addr6, self.addrs.addr6_ll)
            if sol.target in own or sol.target[0] == 0xFF or src == ipv6.UNSPECIFIED:
                return  # the guest's own (or duplicate address detection): no answer
            answer = ndp.build_na(sol.target, p.our_mac, router=True)
            dst = src
        frame = bytearray(L2L3_V6 + len(answer))
        frame[L2L3_V6:] = answer
        dst_mac = self.output.guest_mac if dst != ipv6.ALL_NODES else ipv6.multicast_mac(dst)
        self.send(self.output.icmp6(frame, len(answer), p.router6 if sol.type ==
                                    ndp.ROUTER_SOLICITATION else sol.target, dst, dst_mac,
                                    ndp.HOP_LIMIT))

    def _dhcpv6(self, src: bytes, payload: memoryview) -> None:
        answer = dhcpv6_server.reply(self.params, dhcpv6.parse(payload))
        if answer is None:
            return
        off = L2L3_V6 + udp.HLEN
        frame = bytearray(off + len(answer))
        frame[off:] = answer
        self.send(self.output.udp(frame, len(answer), self.params.router6, dhcpv6.SERVER_PORT,
                                  src, dhcpv6.CLIENT_PORT))

    def _dhcp(self, payload: memoryview) -> None:
        answer = dhcp_server.reply(self.params, dhcp.parse(payload))
        if answer is None:
            return
        frame = bytearray(UDP_PAYLOAD + len(answer))
        frame[UDP_PAYLOAD:] = answer
        # Broadcast, as RFC 2131 section 4.1 allows: the client has no address yet.
        self.send(self.output.udp(frame, len(answer), self.params.gateway4, dhcp.SERVER_PORT,
                                  b"\xff\xff\xff\xff", dhcp.CLIENT_PORT,
                                  dst_mac=ethernet.BROADCAST))

    # -- inbound TCP -------------------------------------------------------

    def _accept(self, listener: socket.socket, guest_port: int) -> None:
        for _ in range(64):
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                limited(log, logging.WARNING, "accept: %s", exc)
                # Out of fds, say: a ready listener would spin the loop until
                # one is free, so it rests for ACCEPT_BACKOFF instead.
                self._rest(listener, guest_port)
                return
            remote = self.guest_view_of(peer[0])
            guest = self.guest_addr_for(listener.family, remote)
            if guest is None:
                sock.close()
                continue
            self.tcp.accepted(sock, guest, guest_port, remote, peer[1])

    def _rest(self, listener: socket.socket, guest_port: int) -> None:
        fd = listener.fileno()
        self.loop.remove(fd)

        def again() -> None:
            if listener.fileno() == fd and not self.loop.watching(fd):
                self.loop.add(fd, evloop.READ, self._acceptor(listener, guest_port))

        self.loop.call_later(ACCEPT_BACKOFF, again)

    # -- state for migration ----------------------------------------------

    def dump_addresses(self) -> bytes:
        return self.addrs.dump()

    def load_addresses(self, record: bytes) -> None:
        self.addrs.load(record)
        if self.addrs.mac is not None:
            self.output.guest_mac = self.addrs.mac

    def listening_sockets(self) -> list[socket.socket]:
        """The host sockets of inbound -t/-u forwarding."""
        return list(self._listeners)

    def dump_udp_flows(self) -> list[UdpFlowRecord]:
        return self.udp.dump()

    def forget_udp_flows(self) -> int:
        """Close the UDP flows that own a socket; returns how many."""
        return self.udp.forget_outbound()

    def restore_udp_flow(self, record: UdpFlowRecord) -> None:
        """Re-create a UDP flow with its host ports; OSError/ValueError/TableFull
        leave nothing behind."""
        forwarded = {s.getsockname()[1]: s for s in self._listeners
                     if s.type == socket.SOCK_DGRAM}
        self.udp.restore(record, forwarded)

    def dump_tcp_flows(self) -> list[tuple[TcpFlowRecord, socket.socket]]:
        """Established TCP connections: (record, host socket) for each."""
        return self.tcp.dump()

    def forget_tcp_flows(self) -> list[socket.socket]:
        """Let go of every TCP connection without closing its socket."""
        return self.tcp.forget()

    def restore_tcp_flow(self, record: TcpFlowRecord, sock: socket.socket) -> None:
        """Serve a connection dumped elsewhere; ValueError/TableFull leave nothing behind."""
        self.tcp.restore(record, sock)

    def forget_waiting(self) -> None:
        self._waiting.clear()
