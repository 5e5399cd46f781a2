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
from typing import TYPE_CHECKING

from tether import loop as evloop
from tether.net.flows import FlowKey, TableFull, expire_when_idle
from tether.net.output import L2L3, l4_offset
from tether.ratelimit import limited
from tether.wire import ethernet, icmp, ipv4, ipv6

if TYPE_CHECKING:
    from tether.net.stack import Stack

log = logging.getLogger(__name__)

MAX_MESSAGE = 65535 - ipv4.HLEN


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
    __slots__ = ("key", "last_used", "sock", "timer", "translator")

    def __init__(self, translator: IcmpTranslator, key: FlowKey, sock: socket.socket) -> None:
        self.translator = translator
        self.key = key
        self.sock = sock
        self.last_used = translator.stack.loop.now()
        self.timer: evloop.Timer | None = None

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.translator.stack.loop.remove(self.sock.fileno())
        self.sock.close()


class IcmpTranslator:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def from_guest(self, src: bytes, dst: bytes, message: memoryview) -> None:
        echo = icmp.parse_echo(message)
        request = icmp.V4_ECHO_REQUEST if len(src) == 4 else icmp.V6_ECHO_REQUEST
        if echo.type != request or echo.code != 0:
            return  # only echo is translated; other ICMP from the guest has no host meaning
        proto = ipv4.PROTO_ICMP if len(src) == 4 else ipv6.PROTO_ICMPV6
        key = (proto, src, echo.ident, dst, 0)
        flow = self.stack.flows.get(key)
        if flow is None:
            flow = self._open(key)
            if flow is None:
                return
        assert isinstance(flow, EchoFlow)
        flow.last_used = self.stack.loop.now()
        target = self.stack.host_target(dst, 0)
        try:
            flow.sock.sendto(message, (target or "", 0))
        except OSError as exc:
            log.debug("ping send: %s", exc)

    def _open(self, key: FlowKey) -> EchoFlow | None:
        if self.stack.host_target(key[3], 0) is None:
            return None
        try:
            self.stack.flows.check_room()
            if len(key[1]) == 4:
                sock = self.stack.outbound_socket(socket.AF_INET, socket.SOCK_DGRAM,
                                                  socket.IPPROTO_ICMP)
            else:
                sock = self.stack.outbound_socket(socket.AF_INET6, socket.SOCK_DGRAM,
                                                  socket.IPPROTO_ICMPV6)
        except TableFull as exc:
            limited(log, logging.WARNING, "dropping ping: %s", exc)
            return None
        except OSError as exc:
            limited(log, logging.WARNING,
                    "cannot open a ping socket (%s): guest pings go unanswered", exc)
            return None
        sock.setblocking(False)
        flow = EchoFlow(self, key, sock)
        self.stack.flows.add(flow)
        self.stack.loop.add(sock.fileno(), evloop.READ, lambda ev: self._readable(flow))
        expire_when_idle(self.stack.loop, self.stack.flows, flow, self.stack.params.icmp_timeout)
        return flow

    def _readable(self, flow: EchoFlow) -> None:
        _, guest_addr, ident, remote, _ = flow.key
        off = l4_offset(guest_addr)
        for _ in range(64):
            frame = bytearray(off + MAX_MESSAGE)
            try:
                n = flow.sock.recv_into(memoryview(frame)[off:], MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError:
                continue
            if n < icmp.HLEN or n > self.stack.params.mtu - (off - ethernet.HLEN) \
                    or not self.stack.has_room():
                continue  # dropped, but read: see UdpTranslator._readable
            # The kernel put the socket's own identifier in; the guest expects its own.
            struct.pack_into("!H", frame, off + 4, ident)
            struct.pack_into("!H", frame, off + 2, 0)
            flow.last_used = self.stack.loop.now()
            out = self.stack.output
            self.stack.send(out.icmp(frame, n, remote, guest_addr) if off == L2L3 else
                            out.icmp6(frame, n, remote, guest_addr))
