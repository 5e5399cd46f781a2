"""What the stack tells the guest and how it maps guest addresses to host ones."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

OUR_MAC: Final = bytes.fromhex("9a559a559a55")  # the same locally administered MAC passt uses
DEFAULT_MTU: Final = 65520
DEFAULT_MAX_FLOWS: Final = (1 << 17) - 1


@dataclass(frozen=True)
class PortRange:
    """Inbound forwarding: host ports first..last go to guest ports from guest_first."""

    first: int
    last: int
    guest_first: int
    # passt's "ADDR%IFNAME/" prefix: listen on this address only (and then only in
    # its family), bound to this interface.
    address: str | None = None
    ifname: str | None = None
    # 'all' and exclusion-only specs: ports that cannot be bound are skipped, as
    # passt does, instead of failing the start.
    best_effort: bool = False

    def guest_port(self, host_port: int) -> int:
        return self.guest_first + (host_port - self.first)


@dataclass(frozen=True)
class NetParams:
    """Everything the stack needs, already validated (tether.config builds it)."""

    addr4: bytes  # the guest's IPv4 address (what DHCP hands out)
    prefix4: int
    gateway4: bytes
    dns4: tuple[bytes, ...] = ()  # DNS servers announced to the guest
    search: tuple[str, ...] = ()
    mtu: int = DEFAULT_MTU
    our_mac: bytes = OUR_MAC
    # Guest connections to this address go to the host's loopback (--map-host-loopback).
    map_host_loopback4: bytes | None = None
    # Guest DNS traffic to dns_match4 goes to dns_host4 (--dns-forward).
    dns_match4: bytes | None = None
    dns_host4: bytes | None = None
    # IPv6: the guest's address (DHCPv6; SLAAC gives it one from the same /64 too),
    # the router (tether's own link-local address unless set) and DNS (RDNSS, DHCPv6).
    addr6: bytes | None = None
    prefix6: int = 64
    gateway6: bytes | None = None
    dns6: tuple[bytes, ...] = ()
    map_host_loopback6: bytes | None = None
    # --map-guest-addr: guest traffic to this address goes to the host's own
    # address, the one the guest was given (and so shadows).
    map_guest_addr4: bytes | None = None
    map_guest_addr6: bytes | None = None
    # -o / --outbound, --outbound-if4/6: where outbound host sockets are bound.
    outbound4: str | None = None
    outbound6: str | None = None
    outbound_if4: str | None = None
    outbound_if6: str | None = None
    hostname: str | None = None  # DHCP option 12
    fqdn: str | None = None  # DHCP option 81, DHCPv6 option 39
    announce_mtu: bool = True  # -m 0: no DHCP option 26, no RA MTU option
    freebind: bool = False
    # Protocol handlers (passt's --no-tcp, --no-udp, ...): off means guest
    # frames of that kind are dropped and nothing is offered.
    ipv4: bool = True
    ipv6: bool = True
    tcp: bool = True
    udp: bool = True
    icmp: bool = True
    dhcp: bool = True
    dhcpv6: bool = True
    ndp: bool = True
    ra: bool = True
    tcp_forward: tuple[PortRange, ...] = ()
    udp_forward: tuple[PortRange, ...] = ()
    # passt's table size (FLOW_MAX): the table is a dict, so the bound costs
    # nothing until flows fill it (bench/bench_flow_memory.py: per-flow memory).
    max_flows: int = DEFAULT_MAX_FLOWS
    udp_timeout: float = 180.0
    icmp_timeout: float = 60.0
    lease_time: int = 0xFFFFFFFF  # infinite, like passt: the address never changes
    forward_bind4: str = "0.0.0.0"

    @property
    def router6(self) -> bytes:
        """The address router advertisements come from: always link-local (RFC 4861 4.2)."""
        eui = bytes([self.our_mac[0] ^ 0x02, *self.our_mac[1:3], 0xFF, 0xFE, *self.our_mac[3:]])
        return bytes.fromhex("fe80000000000000") + eui

    @property
    def netmask4(self) -> bytes:
        return int(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix4}").netmask).to_bytes(4, "big")
