"""What passt's options change on the wire: host name and FQDN in DHCP and DHCPv6,
-m 0, and the protocol switches (--no-dhcp, --no-ra, --no-ndp, --no-tcp, ...).

Sans-IO: frames into a real Stack, what it answers read back with scapy.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from typing import Any

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import (
    DUID_LL,
    DHCP6_Advertise,
    DHCP6_Solicit,
    DHCP6OptClientFQDN,
    DHCP6OptClientId,
    DHCP6OptIA_NA,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_RS, ICMPv6NDOptMTU, IPv6
from scapy.layers.l2 import ARP, Ether

from tests.net.conftest import Recorder, delete_netns, make_netns
from tests.net.hostside import free_port
from tether.loop import Loop
from tether.net.params import NetParams, PortRange
from tether.net.stack import Stack

GUEST_MAC = "02:00:00:00:00:02"
BASE = NetParams(addr4=socket.inet_aton("10.0.2.15"), prefix4=24,
                 gateway4=socket.inet_aton("10.0.2.2"),
                 addr6=socket.inet_pton(socket.AF_INET6, "fd00::15"))


def _answers(frame: bytes, **changes: object) -> list[Ether]:
    stack = Stack(Loop(), dataclasses.replace(BASE, **changes))  # type: ignore[arg-type]
    sink = Recorder()
    stack.attach(sink)
    try:
        stack.frames_from_guest([memoryview(frame)])
    finally:
        stack.close()
    return [Ether(f) for f in sink.frames]


DISCOVER = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                 IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) /
                 BOOTP(chaddr=bytes.fromhex("020000000002"), xid=7) /
                 DHCP(options=[("message-type", "discover"), "end"]))
SOLICIT = bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") /
                IPv6(src="fe80::2", dst="ff02::1:2") / UDP(sport=546, dport=547) /
                DHCP6_Solicit(trid=9) / DHCP6OptClientId(duid=DUID_LL(lladdr=GUEST_MAC)) /
                DHCP6OptIA_NA(iaid=1))
RS = bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") /
           IPv6(src="fe80::2", dst="ff02::2", hlim=255) / ICMPv6ND_RS())
NS = bytes(Ether(src=GUEST_MAC, dst="33:33:ff:00:00:01") /
           IPv6(src="fe80::2", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt="fe80::1"))
ARP_REQ = bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                ARP(hwsrc=GUEST_MAC, psrc="10.0.2.15", pdst="10.0.2.2"))


def _dhcp_options(reply: Ether) -> dict[str, object]:
    return dict(o for o in reply[DHCP].options if isinstance(o, tuple))


def test_hostname_and_fqdn_in_dhcp() -> None:
    (reply,) = _answers(DISCOVER, hostname="hostname1", fqdn="hostname1.test.local")
    opts = _dhcp_options(reply)
    assert opts["hostname"] == b"hostname1"
    # RFC 4702: flags (E: the name is in DNS wire format), two RCODEs, the name.
    assert opts["client_FQDN"] == (b"\x04\xff\xff" + b"\x09hostname1\x04test\x05local\x00")


def test_fqdn_in_dhcpv6() -> None:
    (reply,) = _answers(SOLICIT, fqdn="hostname1.test.local")
    fqdn = reply[DHCP6_Advertise][DHCP6OptClientFQDN]
    assert fqdn.flags == 0 and fqdn.fqdn == b"hostname1.test.local."


def test_no_names_unless_given() -> None:
    (reply,) = _answers(DISCOVER)
    assert "hostname" not in _dhcp_options(reply) and "client_FQDN" not in _dhcp_options(reply)
    (reply6,) = _answers(SOLICIT)
    assert DHCP6OptClientFQDN not in reply6


def test_mtu_0_announces_no_mtu() -> None:
    (reply,) = _answers(DISCOVER, announce_mtu=False)
    assert "interface-mtu" not in _dhcp_options(reply)
    (ra,) = _answers(RS, announce_mtu=False)
    assert ICMPv6ND_RA in ra and ICMPv6NDOptMTU not in ra
    (ra,) = _answers(RS)
    assert ra[ICMPv6NDOptMTU].mtu == 65520


@pytest.mark.parametrize("frame,switch", [
    (DISCOVER, "dhcp"), (SOLICIT, "dhcpv6"), (RS, "ra"), (NS, "ndp"), (ARP_REQ, "ipv4"),
    (RS, "ipv6"),
])
def test_a_disabled_handler_answers_nothing(frame: bytes, switch: str) -> None:
    assert len(_answers(frame)) == 1
    assert _answers(frame, **{switch: False}) == []


def test_no_tcp_drops_a_syn_without_a_reset() -> None:
    syn = bytes(Ether(src=GUEST_MAC, dst="9a:55:9a:55:9a:55") /
                IP(src="10.0.2.15", dst="192.0.2.1") / TCP(sport=40000, dport=9, flags="S"))
    assert _answers(syn, tcp=False) == []


def _listening_stack(*ranges: PortRange, **changes: Any) -> Stack:
    params = dataclasses.replace(BASE, addr6=None, tcp_forward=ranges, **changes)
    stack = Stack(Loop(), params)
    stack.start()
    return stack


def test_a_forward_with_an_address_and_an_interface_listens_only_there() -> None:
    port = free_port()
    stack = _listening_stack(PortRange(port, port, port, address="127.0.0.1", ifname="lo"))
    try:
        (sock,) = stack.listening_sockets()
        assert sock.getsockname() == ("127.0.0.1", port)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16).rstrip(b"\0") \
            == b"lo"
    finally:
        stack.close()


def test_an_ipv6_forward_address_listens_in_ipv6_only() -> None:
    port = free_port()
    stack = _listening_stack(PortRange(port, port, port, address="::1"))
    try:
        (sock,) = stack.listening_sockets()
        assert sock.family == socket.AF_INET6 and sock.getsockname()[:2] == ("::1", port)
    finally:
        stack.close()


def _taken_port_beside_a_free_one() -> socket.socket:
    """A listening socket on a port whose next port nothing holds right now
    (another socket may sit on any port next to an ephemeral one)."""
    for _ in range(50):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Stack binds
            try:
                probe.bind(("127.0.0.1", taken.getsockname()[1] + 1))
            except OSError:
                taken.close()
                continue
        return taken
    raise AssertionError("no free port next to a bound one in 50 tries")


def test_all_skips_ports_it_cannot_bind_but_a_named_port_is_fatal() -> None:
    with _taken_port_beside_a_free_one() as taken:
        port = taken.getsockname()[1]
        stack = _listening_stack(PortRange(port, port + 1, port, address="127.0.0.1",
                                           best_effort=True))
        try:
            bound = [s.getsockname()[1] for s in stack.listening_sockets()]
            assert port not in bound and port + 1 in bound
        finally:
            stack.close()
        with pytest.raises(OSError):
            _listening_stack(PortRange(port, port, port, address="127.0.0.1"))


FREEBIND = """
import socket, sys
from tether.loop import Loop
from tether.net.params import NetParams, PortRange
from tether.net.stack import Stack
r = PortRange(5555, 5555, 5555, address="192.0.2.123")  # TEST-NET-1: on no interface
p = NetParams(addr4=bytes([10, 0, 2, 15]), prefix4=24, gateway4=bytes([10, 0, 2, 2]),
              tcp_forward=(r,), freebind=sys.argv[1] == "1")
try:
    Stack(Loop(), p).start()
    print("listening")
except OSError as e:
    print("refused", e.errno)
"""


@pytest.mark.parametrize("freebind", [False, True])
@pytest.mark.root
def test_freebind_listens_on_an_address_the_host_does_not_have(freebind: bool) -> None:
    ns = make_netns("tfree")  # the address is nobody's: try it in a namespace of our own
    try:
        out = ns.run(sys.executable, "-c", FREEBIND, "1" if freebind else "0").stdout
    finally:
        delete_netns(ns)
    assert out.split()[0] == ("listening" if freebind else "refused"), out
