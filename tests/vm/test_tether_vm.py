"""A real guest on real tether, end to end.

QEMU 10 runs the busybox guest of guest.py; tether runs in a network
namespace set up like a host (tetherlab.host_namespace) and serves the
guest over vhost-user (and once over `-netdev stream`).  The guest
configures itself by DHCP from tether; host-side peers listen on the
namespace's loopback, where tether maps the gateway address.

Most checks share one booted guest (module fixture `lab`): each check
starts its own flows on its own ports, so one failing leaves the others
meaningful.  The disconnect/reconnect and `-netdev stream` checks get their
own tether.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .guest import DHCP_ARG, GuestImage, build_tstream
from .harness import Vm
from .pattern import parse_result
from .tetherlab import (
    GATEWAY,
    HOST_ADDR,
    Peer,
    Process,
    Tether,
    host_namespace,
    in_ns,
    namespace_nameservers4,
)

pytestmark = pytest.mark.vm

FWD_IN = 5101  # -t: host 127.0.0.1:5101 -> guest :5101 (guest receives)
FWD_OUT = 5102  # -t: the guest serves `send`
FWD_ECHO = 5103  # -t: the guest serves `echo` (time to first byte inbound)
UDP_PORT = 5301
ROUTER6 = "fd00:200::1"  # --map-host-loopback: the guest's [fd00:200::1] is the host's ::1
MIB = 1024 * 1024


@dataclass
class Lab:
    workdir: Path
    ns: str
    tether: Tether
    vm: Vm
    tstream: Path

    def diag(self) -> str:
        return (f"\n--- guest console ---\n{self.vm.console.tail(1500)}"
                f"\n--- tether log ---\n{self.tether.text()[-2500:]}")


def boot(lab_dir: Path, name: str, tether: Tether, guest: GuestImage,
         netdev: str = "vhost-user") -> Vm:
    vm = Vm(lab_dir, name, tether.socket, guest, kernel_args=[DHCP_ARG], netdev=netdev)
    try:
        vm.wait_booted()
    except BaseException:
        vm.close()
        raise
    return vm


def lease(vm: Vm) -> re.Match[str]:
    """The lease udhcpc reported at boot (our udhcpc script prints it)."""
    m = re.search(r"udhcpc: eth0 (\S+) router (\S+) mtu (\S+) dns (.*)", vm.console.text)
    assert m, f"no DHCP lease line on the console:\n{vm.console.tail()}"
    return m


def guest_run(lab: Lab, command: str, timeout: float = 60.0) -> str:
    status, out = lab.vm.console.run(command, timeout)
    assert status == 0, f"guest: `{command}` exited {status}:\n{out}{lab.diag()}"
    return out


def guest_serve(lab: Lab, tag: str, args: str, opts: str = "") -> None:
    """Start `tstream [opts] serve args` in the guest's background; return once it listens."""
    guest_run(lab, f"tstream {opts} serve {args} > /tmp/{tag}.out 2>&1 & echo $! > /tmp/{tag}.pid")
    # Bounded wait on the real condition: tstream says it listens.
    guest_run(lab, f"i=0; until grep -q listening /tmp/{tag}.out; do i=$((i+1)); "
                   f"[ $i -gt 100 ] && break; sleep 0.1; done; "
                   f"cat /tmp/{tag}.out; grep -q listening /tmp/{tag}.out", 30)


def guest_result(lab: Lab, tag: str, timeout: float) -> str:
    """Wait for that background tstream (only it: another test's leftover must
    not hold this one up) and return its result line."""
    out = guest_run(lab, f"wait $(cat /tmp/{tag}.pid); cat /tmp/{tag}.out", timeout)
    lines = [m.group(0) for m in re.finditer(r"^TSTREAM (?!listening).*", out, re.M)]
    assert lines, f"guest tstream {tag}: no result:\n{out}{lab.diag()}"
    return lines[-1]


def host_peer(lab: Lab, name: str, *args: str) -> Peer:
    peer = Peer(lab.workdir, name, lab.ns, lab.tstream, *args)
    if "serve" in args:  # after any options (-t 30 serve ...): listening before a guest connects
        peer.wait_log(r"TSTREAM listening", 30)
    return peer


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tvm", numbered=True)


@pytest.fixture(scope="module")
def tstream_host(lab_dir: Path) -> Path:
    return build_tstream(lab_dir / "ts")


@pytest.fixture(scope="module")
def lab(lab_dir: Path, guest: GuestImage, tstream_host: Path) -> Iterator[Lab]:
    with host_namespace() as ns:
        tether = Tether(lab_dir, "t1", ns, "-t", f"{FWD_IN},{FWD_OUT},{FWD_ECHO}",
                        "--map-host-loopback", ROUTER6)
        try:
            vm = boot(lab_dir, "vm1", tether, guest)
            try:
                yield Lab(lab_dir, ns, tether, vm, tstream_host)
            finally:
                vm.close()
        finally:
            log = tether.stop()
        assert "Traceback" not in log, f"tether logged a traceback:\n{log[-4000:]}"


def test_dhcp_configuration_and_ping_gateway(lab: Lab) -> None:
    m = lease(lab.vm)
    addr, router, mtu, dns = m.group(1), m.group(2), m.group(3), m.group(4).strip()
    assert (addr, router, mtu) == (f"{HOST_ADDR}/24", GATEWAY, "65520"), m.group(0)
    # tether was not given --dns: it announces the resolvers it copied.
    expected = namespace_nameservers4(lab.ns)
    assert dns.split() == (expected or ["none"]), f"DNS {dns!r}, host has {expected}"
    out = guest_run(lab, "ip -4 addr show eth0; ip -4 route; ip link show eth0; "
                         "cat /etc/resolv.conf")
    assert f"inet {HOST_ADDR}/24" in out, out
    assert f"default via {GATEWAY} dev eth0" in out, out
    assert "mtu 65520" in out, out
    for server in expected:
        assert f"nameserver {server}" in out, out
    # Echo through tether's ping sockets in the namespace.
    out = guest_run(lab, f"ping -c 3 -W 5 {GATEWAY}", 60)
    assert "3 packets received" in out, out


@pytest.mark.parametrize("direction", ["upload", "download"])
def test_100mib_byte_exact_to_host_service(lab: Lab, direction: str) -> None:
    port, seed = (6001, 11) if direction == "upload" else (6002, 12)
    if direction == "upload":  # guest -> host, checked by the host
        peer = host_peer(lab, f"up{port}", "-t", "30", "serve", str(port), "recv", str(seed))
        out = guest_run(lab, f"tstream -t 30 send {GATEWAY} {port} 100M {seed}", 300)
        assert f"TSTREAM sent={100 * MIB}" in out, out + lab.diag()
        result = peer.result(60)
    else:  # host -> guest, checked by the guest
        peer = host_peer(lab, f"down{port}", "-t", "30", "serve", str(port), "send", "100M",
                         str(seed))
        out = guest_run(lab, f"tstream -t 30 recv {GATEWAY} {port} {seed}", 300)
        assert f"TSTREAM ok bytes={100 * MIB}" in out, out + lab.diag()
        result = peer.result(60)
    want = {"result": "ok", "bytes": str(100 * MIB)} if direction == "upload" else \
        {"result": "sent", "bytes": str(100 * MIB)}
    assert {k: result.get(k) for k in want} == want, \
        f"host side: {result}\n{peer.text()}" + lab.diag()


def test_inbound_forwarded_port_both_directions(lab: Lab) -> None:
    # Host connects to tether's -t listener; the guest receives and checks.
    guest_serve(lab, "in", f"{FWD_IN} recv 21")
    sender = Peer(lab.workdir, "fwd-send", lab.ns, lab.tstream, "-t", "30", "send",
                  "127.0.0.1", str(FWD_IN), "20M", "21")
    assert sender.result(180).get("result") == "sent", sender.text() + lab.diag()
    assert guest_result(lab, "in", 60) == f"TSTREAM ok bytes={20 * MIB}", lab.diag()
    # The guest serves `send`; the host receives and checks.
    guest_serve(lab, "out", f"{FWD_OUT} send 20M 22")
    receiver = Peer(lab.workdir, "fwd-recv", lab.ns, lab.tstream, "-t", "30", "recv",
                    "127.0.0.1", str(FWD_OUT), "22")
    result = receiver.result(180)
    assert result.get("result") == "ok" and result.get("bytes") == str(20 * MIB), \
        f"{result}\n{receiver.text()}" + lab.diag()
    assert guest_result(lab, "out", 60) == f"TSTREAM sent={20 * MIB}", lab.diag()


# A new connection must not wait for the guest's SYN retransmission (1 s): a
# frame tether queued but did not make visible shows up as exactly that.  The
# bound leaves a slow TCG vCPU room and still tells the two apart.
FIRST_BYTE_BOUND_US = 300_000
RR_CONNS = 5


def assert_first_bytes_prompt(result: dict[str, str], what: str, diag: str) -> None:
    assert result.get("result") == "rr" and result.get("conns") == str(RR_CONNS), \
        f"{what}: {result}{diag}"
    worst = int(result["first_max_us"])
    assert worst < FIRST_BYTE_BOUND_US, \
        f"{what}: a new connection took {worst} us to its first byte: {result}{diag}"


def rr_guest_to_host(lab: Lab, port: int) -> dict[str, str]:
    """The guest connects to a host echo service through the gateway, RR_CONNS times."""
    server = host_peer(lab, f"echo{port}", "serve", str(port), "echo", str(RR_CONNS))
    out = guest_run(lab, f"tstream rr {GATEWAY} {port} {RR_CONNS} 3", 60)
    assert server.result(30).get("result") == "echoed", server.text() + lab.diag()
    return parse_result(out)


def rr_host_to_guest(lab: Lab, port: int) -> dict[str, str]:
    """A host client connects through tether's -t port to an echo service in the guest."""
    guest_serve(lab, f"echo{port}", f"{port} echo {RR_CONNS}")
    client = Peer(lab.workdir, f"rr{port}", lab.ns, lab.tstream, "rr", "127.0.0.1", str(port),
                  str(RR_CONNS), "3")
    result = client.result(60)
    assert guest_result(lab, f"echo{port}", 30).startswith("TSTREAM echoed"), lab.diag()
    return result


def test_new_connection_guest_to_host_gets_its_first_byte_at_once(lab: Lab) -> None:
    assert_first_bytes_prompt(rr_guest_to_host(lab, 6030), "guest -> host", lab.diag())


def test_new_connection_host_to_guest_gets_its_first_byte_at_once(lab: Lab) -> None:
    assert_first_bytes_prompt(rr_host_to_guest(lab, FWD_ECHO), "host -> guest", lab.diag())


def assert_no_stall(result: dict[str, str], what: str, diag: str) -> None:
    assert result.get("result") == "ok" and result.get("bytes") == str(4 * MIB), \
        f"{what}: {result}{diag}"
    gap = int(result["gap_max_us"])
    assert gap < FIRST_BYTE_BOUND_US, f"{what}: the stream stalled for {gap} us: {result}{diag}"


def test_stream_into_the_guest_starts_at_once_and_never_stalls(lab: Lab) -> None:
    # The host writes 4 MiB the moment it connects, long before the guest's
    # handshake is done: the first window tether fills is the guest's SYN|ACK's.
    guest_serve(lab, "gap-in", f"{FWD_IN} recv 61", opts="-g")
    sender = Peer(lab.workdir, "gap-send", lab.ns, lab.tstream, "-t", "30", "send",
                  "127.0.0.1", str(FWD_IN), "4M", "61")
    assert sender.result(60).get("result") == "sent", sender.text() + lab.diag()
    assert_no_stall(parse_result(guest_result(lab, "gap-in", 30)), "host -> guest", lab.diag())


def test_stream_from_the_guest_starts_at_once_and_never_stalls(lab: Lab) -> None:
    peer = host_peer(lab, "gap-out", "-g", "-t", "30", "serve", "6031", "recv", "62")
    guest_run(lab, f"tstream -t 30 send {GATEWAY} 6031 4M 62", 60)
    assert_no_stall(peer.result(30), "guest -> host", lab.diag())


def test_ipv6_slaac_and_stream_to_host_loopback(lab: Lab) -> None:
    # SLAAC from tether's RA: the host's prefix fd00:200::/64.
    # Wait (bounded) until duplicate address detection is over: a tentative
    # address cannot be used yet.
    out = guest_run(lab, "i=0; until ip -6 addr show dev eth0 | grep 'inet6 fd00:200::' | "
                         "grep -qv tentative; do i=$((i+1)); [ $i -gt 100 ] && break; "
                         "sleep 0.1; done; ip -6 addr show dev eth0; ip -6 route", 30)
    assert re.search(r"inet6 fd00:200::[0-9a-f:]+/64 scope global (?!tentative)", out), \
        out + lab.diag()
    router = re.search(r"default via (fe80::\S+) dev eth0", out)
    assert router, f"no IPv6 default route from tether's RA:\n{out}"
    # The router's link-local address answers echo (the documented default
    # mapping of ::1), as does the mapped global address.
    out = guest_run(lab, f"ping -c 2 -W 5 -I eth0 {router.group(1)} && "
                         f"ping -c 2 -W 5 {ROUTER6}", 60)
    assert out.count("2 packets received") == 2, out
    peer = host_peer(lab, "v6", "-t", "30", "serve", "6006", "recv", "31")
    out = guest_run(lab, f"tstream -t 30 send {ROUTER6} 6006 4M 31", 120)
    assert f"TSTREAM sent={4 * MIB}" in out, out + lab.diag()
    result = peer.result(60)
    assert result.get("result") == "ok" and result.get("bytes") == str(4 * MIB), \
        f"{result}\n{peer.text()}" + lab.diag()


@pytest.mark.parametrize("reverse", [False, True], ids=["guest-to-host", "host-to-guest"])
def test_udp_exchange_with_host(lab: Lab, reverse: bool) -> None:
    # busybox nc has no -u; iperf3 -u is a real UDP exchange: the client's
    # first datagram opens tether's flow, the server answers on it, then the
    # data flows (from the guest, or with -R to it) at a modest rate.
    port = UDP_PORT + int(reverse)
    server = Process(in_ns(lab.ns, "iperf3", "-s", "-1", "--forceflush", "-p", str(port)),
                     lab.workdir / f"udp{port}.log")
    try:
        server.wait_log(r"Server listening", 30)
        out = guest_run(lab, f"iperf3 -c {GATEWAY} -p {port} -u -b 5M -l 1400 -t 2"
                             f"{' -R' if reverse else ''}", 90)
        lost = re.findall(r"(\d+)/(\d+) \(\S+%\)\s+receiver", out)
        assert lost, f"no UDP receiver summary:\n{out}" + lab.diag()
        lost_n, total = map(int, lost[-1])
        assert total > 0 and lost_n <= total // 10, \
            f"UDP {'host->guest' if reverse else 'guest->host'}: {lost_n}/{total} lost\n{out}"
    finally:
        server.stop()


def test_qemu_disconnect_and_reconnect(lab_dir: Path, guest: GuestImage,
                                      tstream_host: Path) -> None:
    with host_namespace() as ns:
        tether = Tether(lab_dir, "t-rc", ns, "-t", str(FWD_IN))
        try:
            vm = boot(lab_dir, "vm-rc1", tether, guest)
            first = Lab(lab_dir, ns, tether, vm, tstream_host)
            try:
                assert lease(vm).group(1) == f"{HOST_ADDR}/24"
                guest_run(first, f"ping -c 1 -W 5 {GATEWAY}")
                # A host peer streams into the guest (paced, so it is mid-flow
                # when QEMU dies) ...
                guest_serve(first, "rc", f"{FWD_IN} recv 51", opts="-p /tmp/rc.prog")
                stale = Peer(lab_dir, "rc-stale", ns, tstream_host, "-r", "1000000", "-d",
                             "120", "send", "127.0.0.1", str(FWD_IN), "0", "51")
                guest_run(first, "i=0; until grep -q 'bytes=[1-9]' /tmp/rc.prog 2>/dev/null; "
                                 "do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.1; done; "
                                 "cat /tmp/rc.prog; grep -q 'bytes=[1-9]' /tmp/rc.prog")
                assert stale.alive(), stale.text()
            finally:
                vm.kill()  # QEMU goes away without a goodbye
                vm.close()
            tether.wait_log(r"front-end disconnected", 30)
            assert tether.alive(), tether.text()[-3000:]
            vm2 = boot(lab_dir, "vm-rc2", tether, guest)
            second = Lab(lab_dir, ns, tether, vm2, tstream_host)
            try:
                # A clean device: the second front-end's rings start from zero.
                tether.wait_log(r"front-end connected", 10, count=2)
                tether.wait_log(r"queue 1 started at avail 0, used 0", 10, count=2)
                assert lease(vm2).group(1) == f"{HOST_ADDR}/24", vm2.console.tail()
                out = guest_run(second, f"ping -c 2 -W 5 {GATEWAY}")
                assert "2 packets received" in out, out
                # ... and the old guest's connection ends for the host peer (the
                # new guest knows nothing of it) instead of hanging.
                result = stale.result(60)
                assert result.get("result") == "error", \
                    f"stale flow: {result}\n{stale.text()}" + second.diag()
                # The new guest's own traffic flows.
                peer = host_peer(second, "rc-up", "-t", "30", "serve", "6020", "recv", "52")
                guest_run(second, f"tstream -t 30 send {GATEWAY} 6020 8M 52", 120)
                result = peer.result(60)
                assert result.get("result") == "ok" and result.get("bytes") == str(8 * MIB), \
                    f"{result}\n{peer.text()}" + second.diag()
            finally:
                vm2.close()
            assert tether.alive(), tether.text()[-3000:]
        finally:
            log = tether.stop()
        assert "Traceback" not in log, log[-4000:]


def test_netdev_stream_dhcp_and_transfer(lab_dir: Path, guest: GuestImage,
                                         tstream_host: Path) -> None:
    with host_namespace() as ns:
        tether = Tether(lab_dir, "t-st", ns, "-t", f"{FWD_IN},{FWD_ECHO}", vhost_user=False)
        try:
            vm = boot(lab_dir, "vm-st", tether, guest, netdev="stream")
            try:
                m = lease(vm)
                assert (m.group(1), m.group(2), m.group(3)) == \
                    (f"{HOST_ADDR}/24", GATEWAY, "65520"), m.group(0)
                peer = Peer(lab_dir, "st-peer", ns, tstream_host, "-t", "30", "serve",
                            "6010", "recv", "41")
                peer.wait_log(r"TSTREAM listening", 30)
                status, out = vm.console.run(f"tstream -t 30 send {GATEWAY} 6010 20M 41", 180)
                assert status == 0, out + tether.text()[-2500:]
                result = peer.result(60)
                assert result.get("result") == "ok" and \
                    result.get("bytes") == str(20 * MIB), f"{result}\n{peer.text()}"
                # New connections are as prompt over the stream as over vhost-user.
                lab = Lab(lab_dir, ns, tether, vm, tstream_host)
                assert_first_bytes_prompt(rr_guest_to_host(lab, 6011), "stream: guest -> host",
                                          lab.diag())
                assert_first_bytes_prompt(rr_host_to_guest(lab, FWD_ECHO),
                                          "stream: host -> guest", lab.diag())
            finally:
                vm.close()
        finally:
            log = tether.stop()
        assert "Traceback" not in log, log[-4000:]
