"""Bring-up: DHCP with a real client, ARP, ping, UDP, inbound forwarding, pcap, CLI."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.layers.inet import TCP
from scapy.layers.l2 import ARP
from scapy.utils import rdpcap

from tests.net.conftest import (
    GATEWAY,
    GUEST,
    GUEST6,
    ROUTER6,
    TETHER_ARGS,
    Tether,
    configure_guest,
    delete_netns,
    make_netns,
)
from tests.net.hostside import TcpPeer, UdpEchoPeer, free_port, pattern
from tests.support import require, wait_for

UDHCPC_SCRIPT = """#!/bin/sh
# Called by busybox udhcpc: record what the server said, then configure like a distro.
[ "$1" = bound ] || exit 0
env | grep -E '^(ip|subnet|router|dns|mtu|lease|search|domain)=' | sort > "$OUT"
ip addr add "$ip/$mask" dev "$interface"
[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
ip route add default via "$router"
"""


@pytest.mark.root
def test_busybox_udhcpc_gets_the_configuration(start_tether: Callable[..., Tether],
                                               tmp_path: Path) -> None:
    require(shutil.which("busybox") is not None, "needs busybox (apt install busybox)")
    t = start_tether("-S", "example.org", configure=False)
    script = tmp_path / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT)
    script.chmod(0o755)
    out = tmp_path / "lease"
    env = dict(os.environ, OUT=str(out))
    subprocess.run(t.ns.cmd("busybox", "udhcpc", "-q", "-f", "-n", "-t", "5", "-T", "1",
                            "-i", "tap0", "-s", str(script), "-O", "mtu", "-O", "search"),
                   env=env, check=True, capture_output=True, timeout=30)
    lease = dict(line.split("=", 1) for line in out.read_text().splitlines())
    assert lease["ip"] == GUEST
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == GATEWAY
    assert lease["dns"].split() == [GATEWAY]
    assert lease["mtu"] == "65520"
    assert lease["search"] == "example.org"
    # The lease works: the gateway (the host's loopback) answers TCP.
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(1)
    t.ns.run("python3", "-c", f"import socket; socket.create_connection(('{GATEWAY}', "
                              f"{peer.getsockname()[1]}), timeout=10)")
    peer.close()


@pytest.mark.root
def test_arp_resolves_every_address_but_the_guests_own(
        start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    for addr in (GATEWAY, "10.77.0.99"):
        # Any datagram makes the guest's kernel resolve the next hop.
        t.ns.run("python3", "-c", "import socket; socket.socket(socket.AF_INET, "
                 f"socket.SOCK_DGRAM).sendto(b'x', ('{addr}', 9))")
        wait_for(lambda a=addr: "9a:55:9a:55:9a:55 REACHABLE" in  # type: ignore[misc]
                 t.ns.run("ip", "neigh", "show", a).stdout, 10, f"ARP reply for {addr}")


@pytest.mark.root
def test_ping_gateway_through_ping_sockets(tmp_path: Path) -> None:
    # Ping sockets need net.ipv4.ping_group_range to admit tether's group.  Rather than
    # change the machine's setting, tether runs in a namespace of the test's own.
    host = make_netns("thost")
    guest = make_netns()
    t: Tether | None = None
    try:
        host.run("sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 2147483647")
        t = Tether(guest, ["-a", GUEST, "-n", "24", "-g", GATEWAY, "-a", GUEST6], tmp_path,
                   host_ns=host)
        guest.run("ip", "addr", "add", f"{GUEST}/24", "dev", "tap0")
        guest.run("ip", "route", "add", "default", "via", GATEWAY)
        out = guest.run("busybox", "ping", "-c", "3", "-i", "0.2", "-W", "2", GATEWAY).stdout
        assert "3 packets received" in out, out
        # ICMPv6 echo to tether's link-local address: ping sockets on the host's ::1.
        wait_for(lambda: "tentative" not in guest.run("ip", "-6", "addr", "show", "dev",
                                                      "tap0").stdout, 10, "IPv6 DAD")
        out = guest.run("busybox", "ping", "-6", "-c", "3", "-W", "2", "-I", "tap0",
                        ROUTER6).stdout
        assert "3 packets received" in out, out
    finally:
        if t is not None:
            t.stop()
        delete_netns(guest)
        delete_netns(host)


@pytest.mark.root
def test_ping_group_range_warning_at_start(start_tether: Callable[..., Tether]) -> None:
    with open("/proc/sys/net/ipv4/ping_group_range") as f:
        low, high = (int(x) for x in f.read().split())
    t = start_tether()
    if not low <= os.getegid() <= high:
        assert "ping_group_range" in t.log_text()


@pytest.mark.root
def test_udp_echo_to_host(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    peer = UdpEchoPeer()
    assert t.ns.guest_tool("udp-echo", GATEWAY, str(peer.port)).startswith("ok")
    peer.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.root
def test_inbound_tcp_forwarding(start_tether: Callable[..., Tether], host: str) -> None:
    port = free_port()
    t = start_tether("-t", str(port))
    if ":" in host:
        wait_for(lambda: "tentative" not in t.ns.run("ip", "-6", "addr").stdout, 10, "IPv6 DAD")
    server = t.ns.popen(sys.executable, str(Path(__file__).parent / "guest_tool.py"),
                        "tcp-server", str(port), str(3 << 20))
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    sent = bytes(range(256)) * 8192
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(sent)
        sock.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
    out, err = server.communicate(timeout=30)
    assert bytes(got) == pattern(3 << 20)
    assert f"received {len(sent)} sha {hashlib.sha256(sent).hexdigest()}" in out, err
    # The host's loopback appears as the gateway (IPv6: tether's link-local address).
    assert f"peer {GATEWAY if host == '127.0.0.1' else ROUTER6}" in out


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.root
def test_inbound_udp_forwarding(start_tether: Callable[..., Tether], host: str) -> None:
    port = free_port(socket.SOCK_DGRAM)
    t = start_tether("-u", str(port))
    if ":" in host:
        wait_for(lambda: "tentative" not in t.ns.run("ip", "-6", "addr").stdout, 10, "IPv6 DAD")
    server = t.ns.popen(sys.executable, str(Path(__file__).parent / "guest_tool.py"),
                        "udp-server", str(port))
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(b"inbound datagram", (host, port))
        data, peer = sock.recvfrom(1000)
    assert data == b"inbound datagram"[::-1]
    assert (peer[0], peer[1]) == (host, port)
    server.communicate(timeout=10)


@pytest.mark.root
def test_pcap_is_readable_by_scapy(start_tether: Callable[..., Tether],
                                   tmp_path: Path) -> None:
    capture = tmp_path / "cap.pcap"
    t = start_tether("--pcap", str(capture))
    peer = UdpEchoPeer()
    t.ns.guest_tool("udp-echo", GATEWAY, str(peer.port))
    t.stop()
    packets = rdpcap(str(capture))
    assert any(ARP in p for p in packets)
    assert sum(1 for p in packets if p.haslayer("UDP")) >= 6
    assert not any(TCP in p for p in packets)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether.cli", *args], capture_output=True,
                          text=True, timeout=30, check=False)


def test_bad_options_one_line_exit_1() -> None:
    for args in (["--mtu", "10", "--netns", "x"], ["-a", "999.1.1.1", "--netns", "x"],
                 ["--bogus"], ["-t", "70000", "--netns", "x"]):
        done = run_cli(*args)
        assert done.returncode == 1, args
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith("tether: ")


def test_help_explains_options() -> None:
    out = run_cli("--help").stdout
    for opt in ("--netns", "--socket", "--map-host-loopback", "--dns-forward", "--pcap",
                "-t", "-u", "-P", "-l"):
        assert opt in out


def test_missing_namespace_is_one_clear_line() -> None:
    done = run_cli("-f", "-a", GUEST, "--netns", f"no-such-ns-{os.getpid()}")
    assert done.returncode == 1
    assert "no-such-ns" in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.root
def test_pid_file_and_clean_exit(start_tether: Callable[..., Tether], tmp_path: Path) -> None:
    pid_file = tmp_path / "tether.pid"
    t = start_tether("-P", str(pid_file))
    wait_for(pid_file.exists, 10, "pid file")
    assert int(pid_file.read_text()) == t.proc.pid
    t.stop()
    assert t.proc.returncode == 0
    deadline = time.monotonic() + 5
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_file.exists()


@pytest.mark.root
def test_config_net_sets_address_and_route(start_tether: Callable[..., Tether]) -> None:
    t = start_tether("--config-net", configure=False)
    addrs = t.ns.run("ip", "-4", "addr", "show", "tap0").stdout
    assert f"inet {GUEST}/24" in addrs
    assert f"default via {GATEWAY}" in t.ns.run("ip", "route").stdout
    peer = UdpEchoPeer()
    assert t.ns.guest_tool("udp-echo", GATEWAY, str(peer.port)).startswith("ok")


def test_command_runs_in_a_new_namespace_on_tether(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root to create network namespaces")

    peer = TcpPeer("transfer", send=1 << 20)
    tool = str(Path(__file__).parent / "guest_tool.py")
    done = subprocess.run(
        [sys.executable, "-m", "tether.cli", "-l", str(tmp_path / "log"), *TETHER_ARGS, "--",
         sys.executable, tool, "tcp-client", GATEWAY, str(peer.port), str(1 << 20),
         str(1 << 20)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr + (tmp_path / "log").read_text()
    assert done.stdout.startswith("ok")
    assert peer.done.wait(10) and peer.received == [pattern(1 << 20)]
    status = subprocess.run([sys.executable, "-m", "tether.cli", "-l", str(tmp_path / "log2"),
                             *TETHER_ARGS, "--", "sh", "-c", "exit 3"], timeout=60,
                            check=False)
    assert status.returncode == 3
    lo = subprocess.run([sys.executable, "-m", "tether.cli", "-l", str(tmp_path / "log3"),
                         *TETHER_ARGS, "--", "ip", "-o", "link", "show", "lo"],
                        capture_output=True, text=True, timeout=60, check=False)
    assert "LOOPBACK,UP" in lo.stdout


@pytest.mark.root
def test_dns_forward_reaches_the_hosts_resolver(tmp_path: Path) -> None:
    # The "host" is a namespace of the test's own whose resolv.conf (ip netns exec
    # bind-mounts /etc/netns/NAME/resolv.conf) names a resolver on its loopback.
    host = make_netns("tdns")
    guest = make_netns()
    etc = Path("/etc/netns") / host.name
    t: Tether | None = None
    resolver = None
    try:
        etc.mkdir(parents=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        resolver = host.popen(sys.executable, "-c", """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
data, peer = s.recvfrom(512)
s.sendto(b"answer:" + data, peer)
""")
        assert resolver.stdout is not None and resolver.stdout.readline().strip() == "ready"
        t = Tether(guest, ["-a", GUEST, "-n", "24", "-g", GATEWAY, "--dns-forward",
                           "10.77.0.53"], tmp_path, host_ns=host)
        configure_guest(guest)
        out = guest.run("python3", "-c", """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"query", ("10.77.0.53", 53))
data, peer = s.recvfrom(512)
print(data.decode(), peer[0])
""").stdout
        assert out.split() == ["answer:query", "10.77.0.53"]
    finally:
        if t is not None:
            t.stop()
        if resolver is not None:
            resolver.kill()
            resolver.wait()
        shutil.rmtree(etc, ignore_errors=True)
        delete_netns(guest)
        delete_netns(host)
