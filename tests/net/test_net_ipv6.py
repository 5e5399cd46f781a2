"""IPv6: router advertisements (SLAAC), neighbour discovery, DHCPv6, TCP and UDP."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from scapy.layers.dhcp6 import (
    DUID_LL,
    DHCP6_Advertise,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSServers,
    DHCP6OptIA_NA,
    DHCP6OptIAAddress,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, IPv6
from scapy.layers.l2 import Ether

from tests.net.conftest import GUEST6, ROUTER6, Recorder, Tether
from tests.net.hostside import TcpPeer, pattern
from tests.support import wait_for
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack

MiB = 1 << 20
GUEST_MAC = "02:00:00:00:00:02"


@pytest.mark.root
def test_slaac_from_router_advertisement(start_tether: Callable[..., Tether]) -> None:
    t = start_tether(configure=False)

    def slaac_done() -> bool:
        out = t.ns.run("ip", "-6", "addr", "show", "dev", "tap0").stdout
        return "fd00:77:" in out and "dynamic" in out

    wait_for(slaac_done, 20, "a SLAAC address from tether's router advertisement")
    routes = t.ns.run("ip", "-6", "route", "show", "default").stdout
    assert f"via {ROUTER6}" in routes


@pytest.mark.root
def test_tcp_over_ipv6_to_host_loopback(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    wait_for(lambda: _link_local_ready(t), 10, "the guest's link-local address (DAD)")
    peer = TcpPeer("transfer", send=4 * MiB, family=socket.AF_INET6)
    out = t.ns.guest_tool("tcp-client", f"{ROUTER6}%tap0", str(peer.port), str(4 * MiB),
                          str(4 * MiB))
    assert out.startswith("ok")
    assert peer.done.wait(30) and peer.received == [pattern(4 * MiB)]


def _link_local_ready(t: Tether) -> bool:
    out = t.ns.run("ip", "-6", "addr", "show", "dev", "tap0", "scope", "link").stdout
    return "inet6 fe80" in out and "tentative" not in out


def _stack() -> tuple[Stack, Recorder]:
    params = NetParams(addr4=socket.inet_aton("10.77.0.2"), prefix4=24,
                       gateway4=socket.inet_aton("10.77.0.1"),
                       addr6=socket.inet_pton(socket.AF_INET6, GUEST6),
                       dns6=(socket.inet_pton(socket.AF_INET6, "fd00:77::53"),))
    stack = Stack(Loop(), params)
    sink = Recorder()
    stack.attach(sink)
    return stack, sink


def test_dhcpv6_solicit_gets_address_and_dns() -> None:
    stack, sink = _stack()
    solicit = (Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") /
               IPv6(src="fe80::2", dst="ff02::1:2") / UDP(sport=546, dport=547) /
               DHCP6_Solicit(trid=0x123456) /
               DHCP6OptClientId(duid=DUID_LL(lladdr=GUEST_MAC)) / DHCP6OptIA_NA(iaid=7))
    stack.frames_from_guest([memoryview(bytes(solicit))])
    assert len(sink.frames) == 1
    reply = Ether(sink.frames[0])
    assert reply[IPv6].dst == "fe80::2" and reply[UDP].dport == 546
    adv = reply[DHCP6_Advertise]
    assert adv.trid == 0x123456
    assert adv[DHCP6OptIA_NA].iaid == 7
    assert adv[DHCP6OptIAAddress].addr == GUEST6
    assert adv[DHCP6OptDNSServers].dnsservers == ["fd00:77::53"]
    del reply[UDP].chksum
    assert Ether(bytes(reply))[UDP].chksum == Ether(sink.frames[0])[UDP].chksum
    stack.close()


def test_neighbour_solicitation_answered_except_for_own_address() -> None:
    stack, sink = _stack()

    def ns(target: str) -> bytes:
        return bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:01") /
                     IPv6(src="fe80::2", dst="ff02::1:ff00:1", hlim=255) /
                     ICMPv6ND_NS(tgt=target))

    stack.frames_from_guest([memoryview(ns(ROUTER6)), memoryview(ns("fe80::2")),
                             memoryview(ns("2001:db8::99"))])
    answers = [Ether(f) for f in sink.frames]
    assert [a[ICMPv6ND_NA].tgt for a in answers] == [ROUTER6, "2001:db8::99"]
    for a in answers:
        assert a[IPv6].hlim == 255 and a[ICMPv6ND_NA].S == 1
        csum = a[ICMPv6ND_NA].cksum
        del a[ICMPv6ND_NA].cksum
        assert Ether(bytes(a))[ICMPv6ND_NA].cksum == csum
    stack.close()
