"""ICMP echo through unprivileged ping sockets (SOCK_DGRAM, IPPROTO_ICMP).

The kernel owns the echo identifier of a ping socket (it is the socket's
"port"), so each guest (identifier, destination) pair gets its own socket and
replies get the guest's identifier back before they are delivered.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import Final

from tether import loop as evloop
from tether.net.context import NetContext
from tether.net.flows import FlowKey, TableFull, expire_when_idle
from tether.net.output import L2L3, L2L3_V6, l4_offset
from tether.ratelimit import limited
from tether.wire import ethernet, icmp, ipv4, ipv6

log = logging.getLogger(__name__)

MAX_MESSAGE: Final = 65535 - ipv4.HLEN


def ping_sockets_allowed() -> tuple[bool, str]:
    """Whether this process may open ping sockets, and why not if it may not."""
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return True, ""
    groups = {os.getegid(), *os.getgroups()}
    if any(low <= g <= high for g in groups):
        return True, ""
    return False, (f"net.ipv4.ping_group_range is '{low} {high}', which excludes this "
                   f"process's groups: ICMP echo (ping) from the guest will not work")


class EchoFlow:
    """One guest (echo identifier, destination) pair and its ping socket."""

    __slots__ = ("key", "last_used", "loop", "sock", "timer")

    def __init__(self, loop: evloop.Loop, key: FlowKey, sock: socket.socket) -> None:
        self.loop = loop
        self.key = key
        self.sock = sock
        self.last_used = loop.now()
        self.timer: evloop.Timer | None = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.loop.remove(self.sock.fileno())
        self.sock.close()


class IcmpTranslator:
    """The stack's ICMP: guest echo requests to ping sockets, their replies back.

    Replies are read into one frame buffer shared by all flows (the sink copies
    each frame before `send` returns), so no reply costs 64 KiB.
    """

    def __init__(self, ctx: NetContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self._frame_buf = bytearray(L2L3_V6 + MAX_MESSAGE)
        self._frame_view = memoryview(self._frame_buf)

    def from_guest(self, src: bytes, dst: bytes, message: memoryview) -> None:
        echo = icmp.parse_echo(message)
        request = icmp.V4_ECHO_REQUEST if len(src) == 4 else icmp.V6_ECHO_REQUEST
        if echo.type != request or echo.code != 0:
            return  # only echo is translated; other ICMP from the guest has no host meaning
        proto = ipv4.PROTO_ICMP if len(src) == 4 else ipv6.PROTO_ICMPV6
        key = (proto, src, echo.ident, dst, 0)
        flow = self.ctx.flows.get(key)
        if flow is None:
            flow = self._open(key)
            if flow is None:
                return
        assert isinstance(flow, EchoFlow)
        flow.last_used = self.loop.now()
        target = self.ctx.host_target(dst, 0)
        try:
            flow.sock.sendto(message, (target or "", 0))
        except OSError as exc:
            log.debug("ping send: %s", exc)

    def _open(self, key: FlowKey) -> EchoFlow | None:
        ctx = self.ctx
        if ctx.host_target(key[3], 0) is None:
            return None
        try:
            ctx.flows.check_room()
            if len(key[1]) == 4:
                sock = ctx.outbound_socket(socket.AF_INET, socket.SOCK_DGRAM,
                                           socket.IPPROTO_ICMP)
            else:
                sock = ctx.outbound_socket(socket.AF_INET6, socket.SOCK_DGRAM,
                                           socket.IPPROTO_ICMPV6)
        except TableFull as full:
            limited(log, logging.WARNING, "dropping ping: %s", full)
            return None
        except OSError as exc:
            limited(log, logging.WARNING,
                    "cannot open a ping socket (%s): guest pings go unanswered", exc)
            return None
        sock.setblocking(False)
        flow = EchoFlow(self.loop, key, sock)
        ctx.flows.add(flow)
        self.loop.add(sock.fileno(), evloop.READ, lambda ev: self._readable(flow))
        expire_when_idle(self.loop, ctx.flows, flow, ctx.params.icmp_timeout)
        return flow

    def _readable(self, flow: EchoFlow) -> None:
        _, guest_addr, ident, remote, _ = flow.key
        ctx = self.ctx
        off = l4_offset(guest_addr)
        frame = self._frame_buf
        into = self._frame_view[off:]
        for _ in range(64):
            try:
                n = flow.sock.recv_into(into, MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError:
                continue
            if n < icmp.HLEN or n > ctx.params.mtu - (off - ethernet.HLEN) \
                    or not ctx.has_room():
                continue  # dropped, but read: see UdpTranslator._readable
            # The kernel put the socket's own identifier in; the guest expects its own.
            struct.pack_into("!H", frame, off + 4, ident)
            struct.pack_into("!H", frame, off + 2, 0)
            flow.last_used = self.loop.now()
            out = ctx.output
            # send() copies the frame: the buffer is free again for the next reply.
            ctx.send(out.icmp(frame, n, remote, guest_addr) if off == L2L3 else
                     out.icmp6(frame, n, remote, guest_addr))
