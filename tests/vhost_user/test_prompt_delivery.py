"""Every frame the stack queues for the guest is in the used ring, and the
guest was notified, before the loop sleeps again.

In vhost-user mode a frame becomes visible to the guest only when the used
index is published and the call eventfd written.  A path that queued a frame
and left the publishing to "the next flush" made the guest wait for whatever
came next: for a connect completing, that was the guest's own SYN
retransmission a second later.  These tests drive the real stack on the real
vhost-user device through a scripted front-end, one loop pass at a time, and
after every pass check the invariant, for each path that emits frames outside
`frames_from_guest`: connect completion, accept, socket data, the SYN,
retransmission and delayed-ACK timers, the reset after too many retries, UDP
and ICMP replies, and the thaw after a migration.  Host peers are real
sockets on the loopback of a namespace each test creates.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from tests.net.conftest import Netns, delete_netns, make_netns
from tests.support import readable
from tether.loop import Loop
from tether.net import tcp_core as tcp_module
from tether.net.params import NetParams, PortRange
from tether.net.stack import Stack
from tether.transport.tap_setup import inside
from tether.transport.vhost_user import protocol as p
from tether.transport.vhost_user.device import VhostUserNetDevice

from .frontend import Frontend, Guest

pytestmark = pytest.mark.root

RX, TX = 0, 1
HDR = bytes(12)
QSIZE = 16
RX_BUF = 0x11000  # holds any frame: has_room() is true while buffers are posted
RX_BASE = 0x100000
TX_BUF = 0x1000
TX_BASE = 0x80000
MEM = 4 << 20
GUEST = "10.77.0.2"
GATEWAY = "10.77.0.1"
GUEST_MAC = "02:00:00:00:00:02"
FORWARDED = 5601  # -t and -u: host port -> the same guest port


class Rig:
    """The stack on the vhost-user device, a scripted guest, and the invariant."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.loop = Loop()
        gw = socket.inet_aton(GATEWAY)
        fwd = (PortRange(FORWARDED, FORWARDED, FORWARDED),)
        self.stack = Stack(self.loop, NetParams(addr4=socket.inet_aton(GUEST), prefix4=24,
                                                gateway4=gw, map_host_loopback4=gw,
                                                tcp_forward=fwd, udp_forward=fwd))
        self.device = VhostUserNetDevice(self.loop, self.stack)
        self.stack.attach(self.device)
        self.guest = Guest(QSIZE, MEM)
        self.fe = Frontend(self.loop, self.device)
        self.fe.start(self.guest)
        for head in range(QSIZE):
            self.guest.set_desc(RX, head, RX_BASE + head * RX_BUF, RX_BUF, 2)  # WRITE
            self.guest.offer(RX, head)
        self.fe.kick_queue(RX)
        self.stack.start()
        self.received: list[Packet] = []
        self._tx_next = 0
        self._used_rx = self.guest.used_idx(RX)
        self.passes = 0

    # -- the invariant ------------------------------------------------------

    def one_pass(self, timeout: float = 0.05) -> None:
        """One loop pass, then: everything the device took is published and signalled."""
        self.loop.run_once(timeout)
        self.passes += 1
        used = self.guest.used_idx(RX)
        assert used == self.device.rx_frames & 0xFFFF, (
            f"pass {self.passes}: the device holds {self.device.rx_frames - used} "
            "frame(s) the guest cannot see")
        if used != self._used_rx:
            assert self.fe.called(RX), f"pass {self.passes}: frames published, guest not called"
            self._used_rx = used
            self._collect()

    def _collect(self) -> None:
        for head, written in self.guest.used(RX):
            data = self.guest.read(RX_BASE + head * RX_BUF, written)
            assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
            self.received.append(Ether(data[12:]))
            self.guest.offer(RX, head)  # the driver posts the buffer again

    def until(self, what: str, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Bounded: passes until condition holds (each pass checks the invariant)."""
        deadline = self.loop.now() + timeout
        while not condition():
            assert self.loop.now() < deadline, f"timed out waiting for {what}"
            self.one_pass()

    def next_frame(self, what: str, match: Callable[[Packet], bool],
                   timeout: float = 5.0) -> Packet:
        def found() -> bool:
            return any(match(f) for f in self.received)
        self.until(what, found, timeout)
        frame = next(f for f in self.received if match(f))
        self.received.remove(frame)
        return frame

    # -- the guest's side ---------------------------------------------------

    def send(self, pkt: Packet) -> None:
        """The guest transmits one frame (TX ring, then a kick)."""
        frame = bytes(Ether(src=GUEST_MAC, dst="9a:55:9a:55:9a:55") / pkt)
        head = self._tx_next % QSIZE
        self._tx_next += 1
        gpa = TX_BASE + head * TX_BUF
        self.guest.write(gpa, HDR + frame)
        self.guest.set_desc(TX, head, gpa, len(HDR) + len(frame), 0)
        self.guest.offer(TX, head)
        os.eventfd_write(self.fe.kick[TX], 1)

    def tcp(self, dport: int, flags: str, seq: int, ack: int = 0, payload: bytes = b"", *,
            sport: int = 40000, **kw: object) -> None:
        self.send(IP(src=GUEST, dst=GATEWAY) / TCP(sport=sport, dport=dport, flags=flags,
                                                   seq=seq, ack=ack, window=65535,
                                                   **kw) / payload)  # type: ignore[arg-type]

    def close(self) -> None:
        self.stack.close()
        self.fe.close()
        self.device.disconnect("test over")
        self.guest.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    ns = make_netns("tprm")
    try:
        # Ping sockets for the ICMP path, as the tether lab's host namespace allows.
        ns.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        with inside(f"/run/netns/{ns.name}"):
            r = Rig(ns)
            try:
                yield r
            finally:
                r.close()
    finally:
        delete_netns(ns)


def _tcp_flags(flags: str) -> Callable[[Packet], bool]:
    return lambda f: TCP in f and str(f[TCP].flags) == flags


def _readable(sock: socket.socket) -> bool:
    return readable(sock, 0)


def _listener() -> socket.socket:
    s = socket.create_server(("127.0.0.1", 0))
    s.settimeout(5)
    return s


def _outbound(rig: Rig, listener: socket.socket) -> tuple[socket.socket, int]:
    """An established guest -> host connection: (the host peer, our next seq)."""
    port = listener.getsockname()[1]
    rig.tcp(port, "S", 1000, options=[("MSS", 1460), ("WScale", 7)])
    syn_ack = rig.next_frame("SYN|ACK", _tcp_flags("SA"))
    ours = syn_ack[TCP].seq + 1
    rig.tcp(port, "A", 1001, ours)
    rig.until("the guest's ACK to be handled", lambda: bool(
        rig.stack.tcp.conns and all(c.events & tcp_module.ESTABLISHED
                                    for c in rig.stack.tcp.conns.values())))
    peer, _ = listener.accept()
    return peer, ours


def test_connect_completion_sends_the_syn_ack_at_once(rig: Rig) -> None:
    with _listener() as listener:
        rig.tcp(listener.getsockname()[1], "S", 1000, options=[("MSS", 1460)])
        syn_ack = rig.next_frame("SYN|ACK", _tcp_flags("SA"))
        assert syn_ack[TCP].ack == 1001


def test_accept_sends_the_syn_at_once(rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", FORWARDED), timeout=5):
        syn = rig.next_frame("SYN", _tcp_flags("S"))
        assert syn[TCP].dport == FORWARDED


def test_host_data_reaches_the_guest_at_once_even_before_the_handshake_ends(
        rig: Rig) -> None:
    with socket.create_connection(("127.0.0.1", FORWARDED), timeout=5) as client:
        client.sendall(b"early")  # before the guest has answered our SYN
        syn = rig.next_frame("SYN", _tcp_flags("S"))
        rig.tcp(syn[TCP].sport, "SA", 5000, syn[TCP].seq + 1, sport=FORWARDED,
                options=[("MSS", 1460), ("WScale", 7)])
        # a SYN window stays unscaled (RFC 7323 2.2): 65535, not 65535 << 7
        data = rig.next_frame("data", lambda f: TCP in f and bytes(f[TCP].payload) != b"")
        assert bytes(data[TCP].payload) == b"early"
        assert rig.stack.tcp.conns and all(
            c.wnd_from_tap << c.ws_from_tap <= 65535 for c in rig.stack.tcp.conns.values())
        client.sendall(b"later")
        data = rig.next_frame("more data", lambda f: TCP in f and bytes(f[TCP].payload) != b"")
        assert bytes(data[TCP].payload) == b"later"


def test_syn_timer_sends_the_syn_again_at_once(rig: Rig, monkeypatch: pytest.MonkeyPatch,
                                               ) -> None:
    monkeypatch.setattr(tcp_module, "SYN_TIMEOUT", 0.05)
    with socket.create_connection(("127.0.0.1", FORWARDED), timeout=5):
        first = rig.next_frame("SYN", _tcp_flags("S"))
        again = rig.next_frame("the SYN again", _tcp_flags("S"))  # the guest said nothing
        assert again[TCP].seq == first[TCP].seq


def test_retransmission_timer_sends_data_again_at_once(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_module, "ACK_TIMEOUT", 0.05)
    with _listener() as listener:
        peer, _ = _outbound(rig, listener)
        with peer:
            peer.sendall(b"please ack")
            first = rig.next_frame("data", lambda f: TCP in f and bytes(f[TCP].payload) != b"")
            again = rig.next_frame("data again",
                                   lambda f: TCP in f and bytes(f[TCP].payload) != b"")
            assert again[TCP].seq == first[TCP].seq
            assert bytes(again[TCP].payload) == b"please ack"


def test_delayed_ack_timer_sends_the_ack_at_once(rig: Rig) -> None:
    with _listener() as listener:
        peer, ours = _outbound(rig, listener)
        with peer:
            rig.tcp(listener.getsockname()[1], "PA", 1001, ours, b"x" * 100)
            ack = rig.next_frame("delayed ACK", lambda f: TCP in f and f[TCP].ack == 1101)
            assert str(ack[TCP].flags) == "A"
            assert peer.recv(100) == b"x" * 100


def test_reset_after_too_many_retries_reaches_the_guest_at_once(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_module, "SYN_TIMEOUT", 0.02)
    monkeypatch.setattr(tcp_module, "MAX_RETRIES", 1)
    with socket.create_connection(("127.0.0.1", FORWARDED), timeout=5):
        rig.next_frame("RST", lambda f: TCP in f and "R" in str(f[TCP].flags))


def test_udp_reply_reaches_the_guest_at_once(rig: Rig) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        rig.send(IP(src=GUEST, dst=GATEWAY) / UDP(sport=40001, dport=port) / b"ping")
        rig.until("the datagram at the host", lambda: _readable(server))
        data, peer = server.recvfrom(100)
        assert data == b"ping"
        server.sendto(b"pong", peer)
        reply = rig.next_frame("UDP reply", lambda f: UDP in f)
        assert bytes(reply[UDP].payload) == b"pong"


def test_udp_to_a_forwarded_port_reaches_the_guest_at_once(rig: Rig) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"inbound", ("127.0.0.1", FORWARDED))
        got = rig.next_frame("forwarded datagram", lambda f: UDP in f)
        assert got[UDP].dport == FORWARDED and bytes(got[UDP].payload) == b"inbound"


def test_icmp_echo_reply_reaches_the_guest_at_once(rig: Rig) -> None:
    rig.send(IP(src=GUEST, dst=GATEWAY) / ICMP(type=8, id=77, seq=1) / b"hello")
    reply = rig.next_frame("echo reply", lambda f: ICMP in f and f[ICMP].type == 0)
    assert reply[ICMP].id == 77 and bytes(reply[ICMP].payload) == b"hello"


def test_arp_reply_is_published_with_the_batch(rig: Rig) -> None:
    rig.send(ARP(op=1, hwsrc=GUEST_MAC, psrc=GUEST, pdst=GATEWAY))
    reply = rig.next_frame("ARP reply", lambda f: ARP in f)
    assert reply[ARP].op == 2 and reply[ARP].psrc == GATEWAY


def test_thaw_after_a_migration_tells_the_guest_at_once(rig: Rig) -> None:
    with _listener() as listener:
        peer, ours = _outbound(rig, listener)
        with peer:
            peer.sendall(b"queued while frozen")
            flows = rig.stack.dump_tcp_flows()
            assert len(flows) == 1
            (record, sock), = flows
            rig.stack.forget_tcp_flows()
            rig.stack.restore_tcp_flow(record, sock)
            # What the socket held goes out: the socket was looked at again ...
            data = rig.next_frame("data", lambda f: TCP in f and bytes(f[TCP].payload) != b"")
            assert data[TCP].seq == ours and bytes(data[TCP].payload) == b"queued while frozen"
            # ... and the thaw's duplicate ACK tells the guest where to resume.
            rig.next_frame("the thaw's ACK", lambda f: TCP in f and str(f[TCP].flags) == "A"
                           and not bytes(f[TCP].payload))


def test_send_rarp_sends_the_guest_nothing(rig: Rig) -> None:
    """QEMU's SEND_RARP asks a back-end to announce the guest to the network's
    switches; tether's network is host sockets, so nothing goes to the guest."""
    rig.fe.send(p.Request.SEND_RARP, p.U64.pack(0x020000000002))
    rig.one_pass(0)
    assert rig.received == []
