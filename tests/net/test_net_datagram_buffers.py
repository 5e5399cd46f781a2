"""UDP and ICMP read every datagram into one reused buffer: each frame must still
leave whole, with its own bytes, however the datagrams before it were sized.

No root: a socketpair stands for the flow's host socket; scapy reads the frames.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from tests.net.conftest import GATEWAY, GUEST, Recorder
from tether.loop import Loop, ReadPace
from tether.net.icmp import EchoFlow
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.net.udp import READ_BATCH, UdpFlow
from tether.wire import ipv4

REMOTE = "192.0.2.7"
SIZES = (1400, 5, 900, 0, 1472, 64)


@pytest.fixture
def rig() -> Iterator[tuple[Stack, Recorder]]:
    loop = Loop()
    stack = Stack(loop, NetParams(addr4=socket.inet_aton(GUEST), prefix4=24,
                                  gateway4=socket.inet_aton(GATEWAY)))
    sink = Recorder()
    stack.attach(sink)
    yield stack, sink
    stack.close()
    loop.close()


def payload(i: int, size: int) -> bytes:
    return bytes((i * 31 + k) & 0xFF for k in range(size))


def test_udp_datagrams_of_mixed_sizes_each_arrive_intact(rig: tuple[Stack, Recorder]) -> None:
    stack, sink = rig
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    key = (ipv4.PROTO_UDP, socket.inet_aton(GUEST), 4444, socket.inet_aton(REMOTE), 53)
    flow = UdpFlow(stack.loop, key, ours, None)
    stack.flows.add(flow)
    for i, size in enumerate(SIZES):
        peer.send(payload(i, size))
    pace = ReadPace(stack.loop, READ_BATCH)
    pace.budget = READ_BATCH  # a burst (loop.ReadPace): it drains the socket
    stack.udp._readable(flow, pace)  # one wake-up reads them all into the same buffer
    assert len(sink.frames) == len(SIZES)
    for i, (frame, size) in enumerate(zip(sink.frames, SIZES, strict=True)):
        pkt = Ether(frame)
        assert pkt[IP].src == REMOTE and pkt[IP].dst == GUEST
        assert (pkt[UDP].sport, pkt[UDP].dport) == (53, 4444)
        assert bytes(pkt[UDP].payload) == payload(i, size)
        fresh = pkt[IP].copy()
        fresh[UDP].chksum = None
        assert IP(bytes(fresh))[UDP].chksum == pkt[UDP].chksum
    peer.close()


def test_icmp_replies_of_mixed_sizes_each_arrive_intact(rig: tuple[Stack, Recorder]) -> None:
    stack, sink = rig
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    ident = 0x4242
    key = (ipv4.PROTO_ICMP, socket.inet_aton(GUEST), ident, socket.inet_aton(REMOTE), 0)
    flow = EchoFlow(stack.loop, key, ours)
    stack.flows.add(flow)
    for i, size in enumerate(SIZES):
        # An echo reply as a ping socket gives it: the kernel's identifier (7) in it.
        peer.send(struct.pack("!BBHHH", 0, 0, 0, 7, i) + payload(i, size))
    stack.icmp._readable(flow)
    assert len(sink.frames) == len(SIZES)
    for i, (frame, size) in enumerate(zip(sink.frames, SIZES, strict=True)):
        icmp = Ether(frame)[ICMP]
        assert (icmp.type, icmp.id, icmp.seq) == (0, ident, i)  # the guest's identifier
        assert bytes(icmp.payload) == payload(i, size)
        fresh = icmp.copy()
        fresh.chksum = None
        assert ICMP(bytes(fresh)).chksum == icmp.chksum
    peer.close()
