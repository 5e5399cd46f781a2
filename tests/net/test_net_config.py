"""Options to configuration: passt's port specs, defaults, and refusals."""

from __future__ import annotations

import pytest

from tether.config import ConfigError, build_parser, from_args, parse_ports
from tether.net.params import PortRange


def test_port_specs() -> None:
    assert parse_ports("22", "-t") == (PortRange(22, 22, 22),)
    assert parse_ports("8000-8003,9000:80", "-t") == (PortRange(8000, 8003, 8000),
                                                      PortRange(9000, 9000, 80))
    assert parse_ports("5000-5009,~5003-5004", "-t") == (PortRange(5000, 5002, 5000),
                                                         PortRange(5005, 5009, 5005))
    assert parse_ports("none", "-t") == ()
    everything_but = parse_ports("~1-1023", "-u")
    assert everything_but[0] == PortRange(1024, everything_but[0].last, 1024,
                                          best_effort=True)
    assert everything_but[0].last < 32768  # the ephemeral ports are left alone
    assert parse_ports("8080-8081:80", "-t") == (PortRange(8080, 8081, 80),)


@pytest.mark.parametrize("spec", ["0", "70000", "10-5", "abc", "1,,2", "65535:65535-2",
                                  "65000-65535:65534"])
def test_bad_port_specs(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_ports(spec, "-t")


def test_explicit_addresses_and_defaults() -> None:
    args = build_parser().parse_args(["--netns", "x", "-a", "10.9.0.5", "-n", "255.255.0.0",
                                      "-a", "fd00::5", "-D", "10.9.0.53", "-D", "fd00::53",
                                      "-t", "8080", "-M", "02:11:22:33:44:55"])
    config = from_args(args)
    p = config.net
    assert p.addr4 == bytes([10, 9, 0, 5]) and p.prefix4 == 16
    assert p.gateway4 == bytes([10, 9, 0, 1])  # first host of the network
    assert p.map_host_loopback4 == p.gateway4
    assert p.addr6 == bytes.fromhex("fd00" + "00" * 13 + "05")
    assert p.dns4 == (bytes([10, 9, 0, 53]),) and len(p.dns6) == 1
    assert p.our_mac == bytes.fromhex("021122334455")
    assert p.map_host_loopback6 == p.router6
    assert p.tcp_forward == (PortRange(8080, 8080, 8080),)
    assert p.mtu == 65520


@pytest.mark.parametrize("argv", [
    ["--netns", "x", "--socket", "/tmp/s"],
    ["--vhost-user"],
    ["--netns", "x", "-a", "10.0.0.1", "-g", "10.0.0.1"],
    ["--netns", "x", "-a", "1.2.3.4", "-a", "5.6.7.8"],
    ["--netns", "x", "-a", "10.0.0.2", "-M", "zz:zz"],
    ["--netns", "x", "-a", "10.0.0.2", "--max-flows", "0"],
    ["--netns", "x", "-a", "10.0.0.2", "--", "sh"],
])
def test_conflicts_are_refused(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        from_args(build_parser().parse_args(argv))
