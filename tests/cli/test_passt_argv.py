"""Every command line libvirt builds for passt, parsed by tether with passt's meaning.

The argv shapes are what libvirt's qemuPasstStart/qemuPasstBuildCommand makes of
the interfaces in its own test data (tests/qemuxmlconfdata/net-user-passt.xml and
net-vhostuser-passt.xml): the first interface with everything (source dev, one
IPv4 and one IPv6 address, four portForward elements, log file, hostname, fqdn),
the second with nothing, the third with only a source dev; older libvirt
(before --pid) also passed the guest's MAC as --mac-addr.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.cli.conftest import Host

RUN = "/run/libvirt/qemu/passt"
S0, P0 = f"{RUN}/-1-QEMUGuest1-net0.socket", f"{RUN}/-1-QEMUGuest1-net0-passt.pid"
EVERYTHING = [
    "--one-off", "--socket", S0, "--pid", P0, "--interface", "eth42",
    "--log-file", "/var/log/loglaw.blog", "--hostname", "hostname1",
    "--fqdn", "hostname1.test.local",
    "--address", "172.17.2.0", "--netmask", "24", "--address", "2001:db8:ac10:fd01::feed",
    "--tcp-ports", "2001:db8:ac10:fd01::1:10/22:2022,1000-1050,~1020,~1030-1040",
    "--udp-ports", "1.2.3.4%eth0/5000-5020:6000-6020,~5010-5015",
    "--tcp-ports", "80", "--tcp-ports", "443:344",
]
TO_LIBVIRT_ROUTER = "fe80::9855:9aff:fe55:9a55"  # tether's link-local address


def _ranges(config: dict[str, Any], proto: str) -> list[tuple[Any, ...]]:
    return [(r["first"], r["last"], r["guest_first"], r["address"], r["ifname"])
            for r in config["net"][f"{proto}_forward"]]


@pytest.mark.parametrize("vhost_user", [True, False], ids=["vhostuser", "user"])
@pytest.mark.root
def test_the_interface_with_everything(host: Host, vhost_user: bool) -> None:
    c = host.config(*(["--vhost-user"] if vhost_user else []), *EVERYTHING)
    assert "error" not in c, c
    assert c["vhost_user"] is vhost_user and c["one_off"] is True
    assert c["socket_path"] == S0 and c["pid_file"] == P0
    assert c["repair_path"] == (f"{S0}.repair" if vhost_user else None)
    assert c["log_file"] == "/var/log/loglaw.blog" and not c["foreground"]
    n = c["net"]
    assert (n["addr4"], n["prefix4"]) == ("172.17.2.0", 24)
    # eth42's gateway 192.0.2.1 is not on 172.17.2.0/24: the network's first address.
    assert n["gateway4"] == "172.17.2.1" and n["map_host_loopback4"] == "172.17.2.1"
    assert n["addr6"] == "2001:db8:ac10:fd01::feed"
    assert n["map_host_loopback6"] == TO_LIBVIRT_ROUTER
    assert (n["hostname"], n["fqdn"]) == ("hostname1", "hostname1.test.local")
    assert n["dns4"] == ["192.0.2.53"] and n["search"] == ["example.test"]
    v6 = "2001:db8:ac10:fd01::1:10"
    assert _ranges(c, "tcp") == [(22, 22, 2022, v6, None), (1000, 1019, 1000, v6, None),
                                 (1021, 1029, 1021, v6, None), (1041, 1050, 1041, v6, None),
                                 (80, 80, 80, None, None), (443, 443, 344, None, None)]
    assert _ranges(c, "udp") == [(5000, 5009, 6000, "1.2.3.4", "eth0"),
                                 (5016, 5020, 6016, "1.2.3.4", "eth0")]
    assert n["mtu"] == 65520 and n["announce_mtu"] is True


@pytest.mark.root
def test_the_interface_with_nothing_copies_the_host(host: Host) -> None:
    s1 = f"{RUN}/-1-QEMUGuest1-net1.socket"
    c = host.config("--vhost-user", "--one-off", "--socket", s1,
                    "--pid", f"{RUN}/-1-QEMUGuest1-net1-passt.pid")
    n = c["net"]
    assert (n["addr4"], n["prefix4"], n["gateway4"]) == ("192.0.2.10", 24, "192.0.2.1")
    assert (n["addr6"], n["gateway6"]) == ("2001:db8:42::10", "2001:db8:42::1")
    # The host's IPv6 gateway is the guest's way to the host's ::1, as 192.0.2.1 to
    # its 127.0.0.1.
    assert n["map_host_loopback4"] == "192.0.2.1"
    assert n["map_host_loopback6"] == "2001:db8:42::1"
    assert n["tcp_forward"] == [] and n["udp_forward"] == []


@pytest.mark.root
def test_a_source_dev_chooses_the_host_interface(host: Host) -> None:
    c = host.config("--vhost-user", "--one-off", "--socket", f"{RUN}/-1-QEMUGuest1-net2.socket",
                    "--pid", f"{RUN}/-1-QEMUGuest1-net2-passt.pid", "--interface", "eth43")
    n = c["net"]
    assert (n["addr4"], n["prefix4"]) == ("198.51.100.7", 24)
    assert n["gateway4"] == "198.51.100.1"  # eth43 has no default route
    assert n["addr6"] is None  # and no global IPv6 address


@pytest.mark.root
def test_a_missing_source_dev_is_one_clear_error(host: Host) -> None:
    c = host.config("--one-off", "--socket", S0, "--interface", "eth99")
    assert c == {"error": "--interface: no host interface 'eth99'"}


@pytest.mark.root
def test_older_libvirt_mac_addr_and_mtu(host: Host) -> None:
    c = host.config("--one-off", "--socket", S0, "--mac-addr", "00:11:22:33:44:55",
                    "--mtu", "1500", "--address", "172.17.2.0", "--netmask", "24")
    assert c["net"]["our_mac"] == "00:11:22:33:44:55"  # passt's meaning: its own MAC
    assert c["net"]["mtu"] == 1500


@pytest.mark.parametrize("spec,expected", [
    ("0.0.0.0%eth0/5001", [(5001, 5001, 5001, "0.0.0.0", "eth0")]),
    ("%eth42/22", [(22, 22, 22, None, "eth42")]),
    ("2022:22", [(2022, 2022, 22, None, None)]),
    ("2000-2002:3000-3002", [(2000, 2002, 3000, None, None)]),
])
@pytest.mark.root
def test_port_specs_libvirt_writes(host: Host, spec: str,
                                   expected: list[tuple[Any, ...]]) -> None:
    c = host.config("--socket", S0, "-t", spec)
    assert _ranges(c, "tcp") == expected


@pytest.mark.root
def test_all_and_exclusions_are_best_effort(host: Host) -> None:
    c = host.config("--socket", S0, "-t", "all", "-u", "~22")
    tcp = c["net"]["tcp_forward"]
    assert tcp[0]["first"] == 1 and all(r["best_effort"] for r in tcp)
    assert not any(r["first"] <= 22 <= r["last"] for r in c["net"]["udp_forward"])


@pytest.mark.root
def test_passt_switches(host: Host) -> None:
    c = host.config("--socket", S0, "-4", "--no-dhcp", "--no-tcp", "--no-icmp", "--no-ra",
                    "--no-dhcpv6", "-o", "192.0.2.10", "--map-guest-addr", "192.0.2.99",
                    "-D", "none", "-S", "none", "-m", "0", "--dns-forward", "192.0.2.2",
                    "--dns-host", "192.0.2.54", "-q", "--runas", "nobody")
    n = c["net"]
    assert n["ipv6"] is False and n["addr6"] is None
    assert [n[k] for k in ("dhcp", "tcp", "icmp", "ndp", "ra", "dhcpv6", "udp")] == [
        False, False, False, False, False, False, True]
    assert n["outbound4"] == "192.0.2.10" and n["map_guest_addr4"] == "192.0.2.99"
    assert n["dns4"] == [] and n["search"] == [] and n["announce_mtu"] is False
    assert (n["dns_match4"], n["dns_host4"]) == ("192.0.2.2", "192.0.2.54")
    assert c["quiet"] is True and c["runas"] == "nobody"


@pytest.mark.parametrize("argv,message", [
    (["-a", "10.0.0.2/24", "-n", "16"], "--address ADDR/PREFIX and --netmask"),
    (["-t", "22:192.0.2.5/6000"], "another guest address"),
    (["-t", "auto"], "'auto' is pasta's"),
    (["--dns-forward", "fd00::53"], "IPv6 address is not supported"),
    (["-4", "-6"], "exclude each other"),
])
@pytest.mark.root
def test_what_tether_refuses_is_said(host: Host, argv: list[str], message: str) -> None:
    c = host.config("--socket", S0, *argv)
    assert message in c.get("error", ""), c


@pytest.mark.root
def test_no_ipv4_route_falls_back_to_passts_link_local_addresses(host: Host) -> None:
    c = host.config("--socket", S0, "--interface", "eth44")
    n = c["net"]
    assert (n["addr4"], n["prefix4"], n["gateway4"]) == ("169.254.2.1", 16, "169.254.2.2")
    assert n["map_host_loopback4"] == "169.254.2.2"
