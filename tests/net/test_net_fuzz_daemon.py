"""Hypothesis: hostile guest frames written to a running tether's tap (netns mode).

tether's host side is a namespace of its own with nothing but loopback, so a
mangled frame can reach no real address.  Each example's frames go through
the guest's tap; after all of them the daemon is alive, answers an honest
guest (UDP echo through it), and neither its memory nor its log grew with
what the guest sent.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import DHCP6_Solicit, DHCP6OptClientId, DHCP6OptIA_NA
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.net.conftest import (
    GATEWAY,
    GUEST,
    Tether,
    delete_netns,
    make_netns,
)
from tests.net.hostside import UdpEchoPeer
from tests.net.test_net_hostile import GUEST_MAC, OUR_MAC, mangle
from tether.transport.tap_setup import inside


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


class Lab:
    def __init__(self, start_tether: Callable[..., Tether]) -> None:
        self.host = make_netns("tfzh")
        self.tether = start_tether(host_ns=self.host)
        with inside(f"/run/netns/{self.tether.ns.name}"):
            self.tap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self.tap.bind(("tap0", 0))
        self.tap.setblocking(False)
        self.rss_before = _status(self.tether.proc.pid, "VmRSS")
        self.frames = 0

    def send(self, frame: bytes) -> None:
        try:
            self.tap.send(frame)
            self.frames += 1
        except OSError:
            pass  # too short or too long for the link: the kernel refuses it

    def honest_guest_is_served(self) -> None:
        with inside(f"/run/netns/{self.host.name}"):
            peer = UdpEchoPeer()  # on the host side's loopback, which the gateway maps to
        try:
            out = self.tether.ns.guest_tool("udp-echo", GATEWAY, str(peer.port))
            assert out.startswith("ok"), out
        finally:
            peer.close()

    def close(self) -> None:
        self.tap.close()
        delete_netns(self.host)


def huge_dhcpv6() -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") /
                 IPv6(src="fe80::2", dst="ff02::1:2") / UDP(sport=546, dport=547) /
                 DHCP6_Solicit(trid=7) / DHCP6OptClientId(duid=b"\0\3\0\1" + bytes(65000)) /
                 DHCP6OptIA_NA(iaid=1))


def syn(dst: str, dport: int) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST, dst=dst) /
                 TCP(sport=30000 + dport % 20000, dport=dport, flags="S"))


SPECIAL = [huge_dhcpv6(), *(syn("10.250.0.9", 1000 + i) for i in range(40)),
           *(syn(GATEWAY, 2000 + i) for i in range(40))]
EXAMPLES = 300


@pytest.mark.root
def test_hostile_frames_on_the_tap(start_tether: Callable[..., Tether]) -> None:
    lab = Lab(start_tether)
    try:
        run_examples(lab)
        assert lab.tether.alive(), lab.tether.log_text()[-3000:]
        lab.honest_guest_is_served()
        rss_after = _status(lab.tether.proc.pid, "VmRSS")
        assert rss_after < lab.rss_before + (48 << 20), (lab.rss_before, rss_after)
        log_size = Path(lab.tether.log).stat().st_size
        assert log_size < 256 << 10, f"{log_size} bytes of log for {lab.frames} frames"
        print(f"guest-frame fuzz: {EXAMPLES} examples, {lab.frames} frames, "
              f"RSS {lab.rss_before >> 20} -> {rss_after >> 20} MiB, log {log_size} B")
    finally:
        lab.close()


def run_examples(lab: Lab) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def example(data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 12))):
            if data.draw(st.integers(0, 9)) == 0:
                lab.send(data.draw(st.sampled_from(SPECIAL)))
            else:
                lab.send(mangle(data))
        assert lab.tether.alive(), lab.tether.log_text()[-3000:]

    example()
