"""UDP flows in the stack itself: replies find their way back, idle flows expire.

Runs inside a namespace of the test's own (only loopback), so the flow's host
socket can reach nothing but the test's echo server.
"""

from __future__ import annotations

import socket

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from tests.net.conftest import GATEWAY, GUEST, Recorder, delete_netns, make_netns
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.transport.tap_setup import inside


@pytest.mark.root
def test_udp_flow_answers_then_expires() -> None:
    ns = make_netns("tudp")
    try:
        with inside(f"/run/netns/{ns.name}"):
            echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            echo.bind(("127.0.0.1", 0))
            loop = Loop()
            gw = socket.inet_aton(GATEWAY)
            stack = Stack(loop, NetParams(addr4=socket.inet_aton(GUEST), prefix4=24,
                                          gateway4=gw, map_host_loopback4=gw,
                                          udp_timeout=0.3))
            sink = Recorder()
            stack.attach(sink)
            frame = bytes(Ether(src="02:00:00:00:00:02", dst="9a:55:9a:55:9a:55") /
                          IP(src=GUEST, dst=GATEWAY) /
                          UDP(sport=4444, dport=echo.getsockname()[1]) / b"hello")
            stack.frames_from_guest([memoryview(frame)])
            assert len(stack.flows) == 1
            data, peer = echo.recvfrom(100)
            assert data == b"hello"
            echo.sendto(b"olleh", peer)
            assert loop.run(until=lambda: bool(sink.frames), timeout=5)
            reply = Ether(sink.frames[0])
            assert (reply[IP].src, reply[IP].dst) == (GATEWAY, GUEST)
            assert (reply[UDP].sport, reply[UDP].dport) == (echo.getsockname()[1], 4444)
            assert bytes(reply[UDP].payload) == b"olleh"
            assert loop.run(until=lambda: len(stack.flows) == 0, timeout=5), "no expiry"
            stack.close()
            loop.close()
            echo.close()
    finally:
        delete_netns(ns)
