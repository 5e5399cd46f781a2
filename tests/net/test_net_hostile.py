"""Hostile guest frames: truncated headers, bad lengths, odd options, fragments.

The stack must drop what it cannot parse, keep serving, and not leak flows or
file descriptors.  The in-process test runs inside a namespace with nothing
but loopback, so whatever a random frame asks for can reach no real address.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import DHCP6_Solicit
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6ND_RS, IPv6
from scapy.layers.l2 import ARP, Ether

from tests.net.conftest import GATEWAY, Netns, Recorder, Tether, delete_netns, make_netns
from tests.net.hostside import UdpEchoPeer
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.transport.tap_setup import inside

GUEST_MAC = "02:00:00:00:00:02"
OUR_MAC = "9a:55:9a:55:9a:55"


def _base(proto_layer: object) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src="10.77.0.2", dst=GATEWAY) /
                 proto_layer)


SEEDS = [
    _base(TCP(sport=1000, dport=9, flags="S", options=[("MSS", 1460), ("WScale", 14)])),
    _base(TCP(sport=1000, dport=9, flags="A")),
    _base(UDP(sport=1000, dport=9) / b"payload"),
    _base(UDP(sport=68, dport=67) / (b"\x01" * 300)),
    _base(ICMP() / b"ping"),
    bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
          ARP(hwsrc=GUEST_MAC, psrc="10.77.0.2", pdst=GATEWAY)),
    bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fe80::2", dst="ff02::2", hlim=255) /
          ICMPv6ND_RS()),
    bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fe80::2", dst="ff02::1:ff00:1",
                                                   hlim=255) / ICMPv6ND_NS(tgt="fe80::1")),
    bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fe80::2", dst="ff02::1:2") /
          UDP(sport=546, dport=547) / DHCP6_Solicit()),
    bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fd00:77::2", dst="fd00:77::1") /
          TCP(sport=1000, dport=9, flags="S")),
]


def mangle(data: st.DataObject) -> bytes:
    frame = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    return bytes(frame[:cut]) + data.draw(st.binary(max_size=40))


def _open_sockets() -> int:
    """Sockets and epoll instances this process holds: what a leaked flow would keep."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(("socket:", "anon_inode:[eventpoll]"))
    return count


@pytest.fixture(scope="module")
def empty_netns() -> Iterator[Netns]:
    ns = make_netns("tfuz")
    yield ns
    delete_netns(ns)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.data())
@pytest.mark.root
def test_mangled_frames_never_escape_the_stack(empty_netns: Netns, data: st.DataObject) -> None:
    fds_before = _open_sockets()
    with inside(f"/run/netns/{empty_netns.name}"):
        loop = Loop()
        params = NetParams(addr4=socket.inet_aton("10.77.0.2"), prefix4=24,
                           gateway4=socket.inet_aton(GATEWAY),
                           map_host_loopback4=socket.inet_aton(GATEWAY), max_flows=8,
                           addr6=socket.inet_pton(socket.AF_INET6, "fd00:77::2"))
        stack = Stack(loop, params)
        stack.attach(Recorder())
        frames = [mangle(data) for _ in range(data.draw(st.integers(1, 8)))]
        stack.frames_from_guest([memoryview(f) for f in frames])
        loop.run(timeout=0)
        assert len(stack.flows) <= params.max_flows
        stack.close()
        assert len(stack.flows) == 0
        loop.close()
    assert _open_sockets() <= fds_before


@pytest.mark.root
def test_garbage_on_the_wire_leaves_the_daemon_serving(
        start_tether: Callable[..., Tether]) -> None:
    """Raw frames written to the guest's tap: random bytes and broken headers."""
    t = start_tether()
    rng = random.Random(4)
    frames = [rng.randbytes(rng.randrange(0, 200)) for _ in range(500)]
    frames += [s[:rng.randrange(14, len(s))] for s in SEEDS for _ in range(20)]
    # Well-formed IPv4 headers with lengths that lie, fragments, TCP offsets past the end.
    frames += [bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) /
                     IP(src="10.77.0.2", dst=GATEWAY, len=1000) / UDP(sport=1, dport=9)),
               bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) /
                     IP(src="10.77.0.2", dst=GATEWAY, flags="MF") / UDP(sport=1, dport=9)),
               bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) /
                     IP(src="10.77.0.2", dst=GATEWAY) / TCP(sport=1, dport=9, dataofs=15)),
               bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src="10.77.0.2", dst=GATEWAY) /
                     TCP(sport=1, dport=9, flags="S", options=[(2, b"\x05")]))]
    code = ("import socket,sys,struct\n"
            "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
            "s.bind(('tap0',0))\n"
            "data=sys.stdin.buffer.read()\n"
            "i=0\n"
            "while i<len(data):\n"
            "    (n,)=struct.unpack_from('!H',data,i); i+=2\n"
            "    f=data[i:i+n]; i+=n\n"
            "    try: s.send(f)\n"
            "    except OSError: pass\n")
    blob = b"".join(struct.pack("!H", len(f)) + f for f in frames)
    subprocess.run(t.ns.cmd("python3", "-c", code), input=blob, check=True, timeout=60)
    assert t.alive()
    peer = UdpEchoPeer()
    assert t.ns.guest_tool("udp-echo", GATEWAY, str(peer.port)).startswith("ok")
