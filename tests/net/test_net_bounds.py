"""What a guest can make the stack hold or build stays bounded.

Replies fit the MTU and their wire fields whatever the request carried; a
connect that gets no answer gives its flow-table slot back; a full flow
table is logged once per interval, not once per frame.  The stack runs in
process, inside a namespace of its own (loopback, plus a dummy link whose
neighbour swallows every packet: a blackhole).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DUID_LL, DHCP6_Solicit, DHCP6OptClientId, DHCP6OptIA_NA
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from tests.net.conftest import GATEWAY, Netns, Recorder, Tether, delete_netns, make_netns
from tests.support import wait_for
from tether import ratelimit
from tether.loop import Loop
from tether.net import tcp as tcp_module
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.transport.stream import StreamTransport
from tether.transport.tap_setup import inside
from tether.wire import ndp

GUEST_MAC = "02:00:00:00:00:02"
OUR_MAC = "9a:55:9a:55:9a:55"
GUEST4 = "10.77.0.2"
BLACKHOLE = "10.99.0.5"  # behind bh0: SYNs vanish, nothing ever answers


@pytest.fixture(scope="module")
def blackhole_netns() -> Iterator[Netns]:
    ns = make_netns("tbnd")
    # A tap nobody reads, with a permanent neighbour entry: no ARP, no error,
    # the SYNs just vanish, as towards an address that is blackholed upstream.
    for argv in (["tuntap", "add", "dev", "bh0", "mode", "tap"], ["link", "set", "bh0", "up"],
                 ["addr", "add", "10.99.0.1/24", "dev", "bh0"],
                 ["neigh", "add", BLACKHOLE, "lladdr", "02:00:00:00:99:05", "dev", "bh0",
                  "nud", "permanent"]):
        subprocess.run(["ip", "-n", ns.name, *argv], check=True)
    yield ns
    delete_netns(ns)


class Rig:
    def __init__(self, ns: Netns, **params: object) -> None:
        self._inside = inside(f"/run/netns/{ns.name}")
        self._inside.__enter__()
        self.loop = Loop()
        defaults: dict[str, object] = dict(
            addr4=socket.inet_aton(GUEST4), prefix4=24, gateway4=socket.inet_aton(GATEWAY),
            addr6=socket.inet_pton(socket.AF_INET6, "fd00:77::2"), max_flows=8)
        defaults.update(params)
        self.params = NetParams(**defaults)  # type: ignore[arg-type]
        self.stack = Stack(self.loop, self.params)
        self.out = Recorder()
        self.stack.attach(self.out)

    def send(self, *frames: bytes) -> None:
        self.stack.frames_from_guest([memoryview(f) for f in frames])
        self.loop.run_once(0)

    def close(self) -> None:
        self.stack.close()
        self.loop.close()
        self._inside.__exit__(None, None, None)


@pytest.fixture
def rig(blackhole_netns: Netns) -> Iterator[Rig]:
    r = Rig(blackhole_netns)
    yield r
    r.close()


def syn(dport: int, sport: int = 40000, dst: str = BLACKHOLE) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=GUEST4, dst=dst) /
                 TCP(sport=sport, dport=dport, flags="S", seq=1000,
                     options=[("MSS", 1460)]))


@pytest.mark.root
def test_a_connect_nobody_answers_gives_its_flow_back(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp_module, "CONNECT_TIMEOUT", 0.2)
    rig.send(syn(80))
    assert len(rig.stack.flows) == 1
    assert rig.loop.run(until=lambda: len(rig.stack.flows) == 0, timeout=5)
    resets = [Ether(f) for f in rig.out.frames]
    assert any(TCP in f and f[TCP].flags.R and f[TCP].ack == 1001 for f in resets)


@pytest.mark.root
def test_a_syn_flood_to_a_blackhole_frees_the_table_and_logs_once(
        rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tcp_module, "CONNECT_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="tether")
    rig.send(*(syn(1000 + i) for i in range(200)))
    assert len(rig.stack.flows) == rig.params.max_flows
    full = [r for r in caplog.records if "refusing TCP connection" in r.getMessage()]
    assert len(full) == ratelimit.BURST  # of 192 refusals
    assert rig.loop.run(until=lambda: len(rig.stack.flows) == 0, timeout=5)
    rig.send(syn(5000))
    assert len(rig.stack.flows) == 1  # room again


def dhcpv6_solicit(client_id: bytes) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") /
                 IPv6(src="fe80::2", dst="ff02::1:2") / UDP(sport=546, dport=547) /
                 DHCP6_Solicit(trid=7) / DHCP6OptClientId(duid=client_id) /
                 DHCP6OptIA_NA(iaid=1))


def replies(rig: Rig) -> list[Ether]:
    return [Ether(f) for f in rig.out.frames]


@pytest.mark.root
def test_dhcpv6_with_a_huge_client_id_gets_no_reply_and_no_exception(
        blackhole_netns: Netns) -> None:
    rig = Rig(blackhole_netns, mtu=65520,
              dns6=(socket.inet_pton(socket.AF_INET6, "fd00:77::53"),))
    try:
        # As large as a 65520-byte link carries: the reply would not fit a UDP length.
        frame = dhcpv6_solicit(b"\x00\x03\x00\x01" + bytes(65440))
        assert len(frame) <= 14 + 65520
        rig.send(frame)
        assert rig.stack.internal_errors == 0  # refused on purpose, not by an exception
        assert rig.out.frames == []
        rig.send(dhcpv6_solicit(bytes(DUID_LL(lladdr=GUEST_MAC))))
        assert len(rig.out.frames) == 1  # an honest client is answered
    finally:
        rig.close()


@pytest.mark.parametrize("mtu", [1280, 1500, 65520])
@pytest.mark.root
def test_every_reply_fits_the_mtu(blackhole_netns: Netns, mtu: int) -> None:
    dns6 = tuple(socket.inet_pton(socket.AF_INET6, f"fd00:53::{i:x}") for i in range(1, 300))
    dns4 = tuple(socket.inet_aton(f"10.53.{i // 250}.{i % 250 + 1}") for i in range(600))
    rig = Rig(blackhole_netns, mtu=mtu, dns6=dns6, dns4=dns4)
    try:
        rig.send(
            dhcpv6_solicit(bytes(DUID_LL(lladdr=GUEST_MAC))),
            bytes(Ether(src=GUEST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                  IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67) /
                  BOOTP(chaddr=bytes.fromhex("020000000002"), xid=5) /
                  DHCP(options=[("message-type", "discover"), "end"])),
            bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02") /
                  IPv6(src="fe80::2", dst="ff02::2", hlim=255) /
                  bytes([ndp.ROUTER_SOLICITATION, 0, 0, 0, 0, 0, 0, 0])),
        )
        assert rig.out.frames
        for frame in rig.out.frames:
            assert len(frame) - 14 <= mtu, Ether(frame).summary()
    finally:
        rig.close()


class _NoPort:
    def frames_from_guest(self, frames: object) -> None:
        pass

    def guest_room_available(self) -> None:
        pass


def test_stream_accept_out_of_fds_backs_off_and_serves_later(tmp_path: Path) -> None:
    """QEMU's -netdev stream socket: EMFILE on accept used to end the daemon."""
    loop = Loop()
    transport = StreamTransport(loop, str(tmp_path / "s"), _NoPort())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        client.connect(str(tmp_path / "s"))
        lowest_free = os.dup(0)  # the kernel hands out the lowest free number
        os.close(lowest_free)
        # Every new fd number would be at or above the limit: accept() gets EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        loop.run_once(0)  # accept fails with EMFILE: backs off, does not raise
        assert transport.conn is None
        assert transport.listener is not None
        assert not loop.watching(transport.listener.fileno())
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert loop.run(until=lambda: transport.conn is not None, timeout=5)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.close()
        transport.close()
        loop.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.root
def test_forward_accept_out_of_fds_rests_instead_of_spinning(
        start_tether: Callable[..., Tether]) -> None:
    """A -t listener whose accept() fails (EMFILE) used to stay ready in epoll: the
    daemon spun a core until an fd came free."""
    host = make_netns("tfdh")
    try:
        port = 5555
        t = start_tether("-t", str(port), host_ns=host)
        pid = t.proc.pid
        used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
        lowest_free = min(set(range(len(used) + 1)) - used)
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free, hard))
        with inside(f"/run/netns/{host.name}"):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
        wait_for(lambda: "accept: [Errno 24]" in t.log_text(), 10, "EMFILE on accept")
        before = _cpu_seconds(pid)
        time.sleep(1.0)  # a measurement window, not a synchronisation
        assert _cpu_seconds(pid) - before < 0.5, "the daemon spins on a ready listener"
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # fds again: the connection is accepted and, no guest listening, closed.
        with contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""
        client.close()
        assert t.alive()
    finally:
        delete_netns(host)
