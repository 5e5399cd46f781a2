"""IPv6 as IPv4: the host's IPv6 gateway stands for its ::1 as the IPv4 gateway for
127.0.0.1, and ::ffff:a.b.c.d goes exactly where a.b.c.d is allowed to go.

tether runs in a namespace standing for the host (addresses and default routes
on a veth, servers on its loopback); the guest is a second namespace on tether's
tap.  Frames with a v4-mapped destination are written onto the tap with scapy:
a Linux guest's own sockets would keep ::ffff:127.0.0.1 on its own loopback, but
a guest may send anything.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.net.conftest import Netns, Tether, delete_netns, make_netns
from tests.net.hostside import free_port
from tests.support import wait_for
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack

REACH = str(Path(__file__).parent / "reach.py")
HOST4, GW4 = "10.200.0.2", "10.200.0.1"
HOST6, GW6 = "fd00:200::2", "fd00:200::1"
ROUTER6 = "fe80::9855:9aff:fe55:9a55"


class Server:
    """reach.py serve, in the host namespace; counts what reached it."""

    def __init__(self, host: Netns, kind: str, addr: str, port: int) -> None:
        self.proc = host.popen(sys.executable, REACH, "serve", kind, addr, str(port))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def accepted(self) -> bool:
        return "accepted" in self.lines

    def stop(self) -> int:
        """How many connections or datagrams arrived, queued ones included."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self._reader.join(10)
        served = [line for line in self.lines if line.startswith("served ")]
        assert served, self.lines
        return int(served[0].split()[1])


class Lab:
    def __init__(self, tmp: Path, *tether_args: str) -> None:
        self.host = make_netns("thost6")
        self.guest = make_netns("tgst6")
        self.tether: Tether | None = None
        self.servers: list[Server] = []
        try:
            self._setup(tmp, tether_args)
        except BaseException:
            self.close()
            raise

    def _setup(self, tmp: Path, tether_args: tuple[str, ...]) -> None:
        h = self.host
        for argv in (["link", "add", "up0", "type", "veth", "peer", "name", "up1"],
                     ["link", "set", "up0", "up"], ["link", "set", "up1", "up"],
                     ["addr", "add", f"{HOST4}/24", "dev", "up0"],
                     ["-6", "addr", "add", f"{HOST6}/64", "dev", "up0", "nodad"],
                     ["route", "add", "default", "via", GW4],
                     ["-6", "route", "add", "default", "via", GW6]):
            subprocess.run(["ip", "-n", h.name, *argv], check=True, capture_output=True)
        # No -a/-g: tether copies the host namespace's addresses and gateways.
        self.tether = Tether(self.guest, list(tether_args), tmp, host_ns=h)
        g = self.guest
        g.run("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0")
        g.run("ip", "route", "add", "default", "via", GW4)
        g.run("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "tap0", "nodad")
        g.run("ip", "-6", "route", "add", "default", "via", ROUTER6, "dev", "tap0")

    def server(self, kind: str, addr: str, port: int) -> Server:
        server = Server(self.host, kind, addr, port)
        self.servers.append(server)  # first: close() ends it whatever happens next
        wait_for(lambda: "listening" in server.lines, 10, f"a {kind} server on {addr}:{port}")
        return server

    def attempt(self, kind: str, addr: str, port: int) -> subprocess.CompletedProcess[str]:
        return self.guest.run(sys.executable, REACH, "try", kind, addr, str(port), check=False)

    def inject(self, kind: str, dst: str, port: int) -> None:
        """One TCP SYN or UDP datagram from the guest to dst, written onto the tap."""
        l4 = (f"TCP(sport=40000, dport={port}, flags='S', seq=1000)" if kind == "tcp" else
              f"UDP(sport=40000, dport={port})/Raw(b'x' * 32)")
        code = ("from scapy.all import Ether, IPv6, TCP, UDP, Raw, sendp\n"
                f"sendp(Ether(dst='9a:55:9a:55:9a:55')/IPv6(src='{HOST6}', dst='{dst}')/"
                f"{l4}, iface='tap0', verbose=0)\n")
        self.guest.run(sys.executable, "-c", code)

    def close(self) -> None:
        for server in self.servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)
        if self.tether is not None:
            self.tether.stop()
        delete_netns(self.guest)
        delete_netns(self.host)


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    labs: list[Lab] = []

    def make(*tether_args: str) -> Lab:
        lab = Lab(tmp_path, *tether_args)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.root
def test_the_ipv6_gateway_is_the_hosts_ipv6_loopback(lab_factory: Callable[..., Lab],
                                                      kind: str) -> None:
    lab = lab_factory()
    assert lab.tether is not None and f"NAT to host ::1: {GW6}" in lab.tether.log_text()
    port = free_port(socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    server = lab.server(kind, "::1", port)
    done = lab.attempt(kind, GW6, port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("echoed")  # byte-exact both ways
    assert server.stop() == 1


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.root
def test_v4_mapped_loopback_stays_closed_without_map_gw(lab_factory: Callable[..., Lab],
                                                        kind: str) -> None:
    lab = lab_factory("--no-map-gw")
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    port, control_port = free_port(stype), free_port(stype)
    loopback = lab.server(kind, "127.0.0.1", port)
    control = lab.server(kind, HOST4, control_port)
    lab.inject(kind, "::ffff:127.0.0.1", port)  # what 127.0.0.1 may not reach
    lab.inject(kind, f"::ffff:{HOST4}", control_port)  # the host's own address may
    # tether handles the guest's frames in order: once the second arrived, the first
    # had its chance.
    wait_for(control.accepted, 10, "the control frame to reach the host's address")
    assert control.stop() == 1
    assert loopback.stop() == 0


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.root
def test_v4_mapped_gateway_maps_like_the_ipv4_gateway(lab_factory: Callable[..., Lab],
                                                      kind: str) -> None:
    lab = lab_factory()
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    port = free_port(stype)
    loopback = lab.server(kind, "127.0.0.1", port)
    lab.inject(kind, f"::ffff:{GW4}", port)
    wait_for(loopback.accepted, 10, "::ffff:GATEWAY to reach the host's 127.0.0.1")
    assert loopback.stop() == 1


@pytest.mark.parametrize("kind", ["tcp", "udp"])
@pytest.mark.root
def test_outbound_binds_the_host_side_source_address(lab_factory: Callable[..., Lab],
                                                     kind: str) -> None:
    # -o: passt's --outbound; the host namespace has a second address to bind to.
    lab = lab_factory("-o", "10.200.0.3")
    subprocess.run(["ip", "-n", lab.host.name, "addr", "add", "10.200.0.3/24", "dev", "up0"],
                   check=True)
    port = free_port(socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    server = lab.server(kind, "127.0.0.1", port)
    done = lab.attempt(kind, GW4, port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "peer 10.200.0.3" in server.lines, server.lines
    server.stop()


def _stack(**changes: object) -> Stack:
    params = NetParams(addr4=socket.inet_aton(HOST4), prefix4=24,
                       gateway4=socket.inet_aton(GW4), map_host_loopback4=None,
                       dns_match4=socket.inet_aton("10.200.0.53"),
                       dns_host4=socket.inet_aton("192.0.2.53"),
                       addr6=socket.inet_pton(socket.AF_INET6, HOST6),
                       gateway6=socket.inet_pton(socket.AF_INET6, GW6))
    for key, value in changes.items():
        object.__setattr__(params, key, value)
    return Stack(Loop(), params)


V4_DESTINATIONS = [GW4, "127.0.0.1", "127.9.9.9", "0.0.0.0", "255.255.255.255",
                   "224.0.0.251", "10.200.0.53", "10.200.0.99", "192.0.2.7", HOST4]


@pytest.mark.parametrize("mapping", ["map-gw", "no-map-gw", "map-guest-addr"])
def test_every_v4_mapped_destination_follows_its_ipv4_rule(mapping: str) -> None:
    gw = socket.inet_aton(GW4)
    stack = _stack(map_host_loopback4=gw if mapping != "no-map-gw" else None,
                   map_guest_addr4=socket.inet_aton("10.200.0.99")
                   if mapping == "map-guest-addr" else None)
    for dst in V4_DESTINATIONS:
        raw = socket.inet_aton(dst)
        for port in (53, 80):
            want = stack.host_target(raw, port)
            got = stack.host_target(bytes(10) + b"\xff\xff" + raw, port)
            assert got == (None if want is None else f"::ffff:{want}"), (dst, port)


def test_ipv6_gateway_and_router_map_to_loopback_unless_no_map_gw() -> None:
    gw6 = socket.inet_pton(socket.AF_INET6, GW6)
    mapped = _stack(map_host_loopback6=gw6)
    assert mapped.host_target(gw6, 5000) == "::1"
    assert mapped.host_target(mapped.params.router6, 5000) == "::1"
    plain = _stack(map_host_loopback6=None)
    assert plain.host_target(gw6, 5000) == GW6  # a real address, then
    assert plain.host_target(plain.params.router6, 5000) is None
    assert plain.host_target(socket.inet_pton(socket.AF_INET6, "::1"), 5000) is None
