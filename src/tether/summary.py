"""The start-up summary: what the guest will be told and what maps where, as passt
prints it, so an operator sees in the log what a libvirt-started tether decided."""

from __future__ import annotations

import ipaddress

from tether.net.params import NetParams, PortRange


def _a(raw: bytes) -> str:
    return str(ipaddress.ip_address(raw))


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ranges(ranges: tuple[PortRange, ...]) -> str:
    items = []
    for r in ranges:
        where = (r.address or "") + (f"%{r.ifname}" if r.ifname else "")
        ports = f"{r.first}" if r.first == r.last else f"{r.first}-{r.last}"
        if r.guest_first != r.first:
            last = r.guest_port(r.last)
            ports += f":{r.guest_first}" if r.first == r.last else f":{r.guest_first}-{last}"
        items.append(f"{where}/{ports}" if where else ports)
    return ",".join(items)


def lines(p: NetParams) -> list[str]:
    out = [f"MAC: host {_mac(p.our_mac)}"]
    if p.ipv4:
        dhcp = "DHCP" if p.dhcp else "IPv4 (no DHCP)"
        out.append(f"{dhcp}: assign {_a(p.addr4)}/{p.prefix4}, router {_a(p.gateway4)}"
                   + (f", MTU {p.mtu}" if p.announce_mtu else ", no MTU"))
        if p.hostname or p.fqdn:
            out.append(f"    hostname {p.hostname or '-'}, fqdn {p.fqdn or '-'}")
        if p.dns4:
            out.append("DNS: " + ", ".join(_a(d) for d in p.dns4))
    if p.ipv6 and p.addr6 is not None:
        out.append(f"NDP/DHCPv6: assign {_a(p.addr6)}/{p.prefix6}, router {_a(p.router6)}"
                   + (f", gateway {_a(p.gateway6)}" if p.gateway6 else ""))
        if p.dns6:
            out.append("DNS6: " + ", ".join(_a(d) for d in p.dns6))
    if p.search:
        out.append("DNS search: " + " ".join(p.search))
    if p.map_host_loopback4 is not None:
        out.append(f"NAT to host 127.0.0.1: {_a(p.map_host_loopback4)}")
    if p.map_host_loopback6 is not None and p.ipv6 and p.addr6 is not None:
        linklocal = f" (and {_a(p.router6)})" if p.map_host_loopback6 != p.router6 else ""
        out.append(f"NAT to host ::1: {_a(p.map_host_loopback6)}{linklocal}")
    if p.map_guest_addr4 is not None:
        out.append(f"NAT to host {_a(p.addr4)}: {_a(p.map_guest_addr4)}")
    if p.map_guest_addr6 is not None and p.addr6 is not None:
        out.append(f"NAT to host {_a(p.addr6)}: {_a(p.map_guest_addr6)}")
    if p.dns_match4 is not None and p.dns_host4 is not None:
        out.append(f"DNS forward: {_a(p.dns_match4)} -> {_a(p.dns_host4)}")
    if p.tcp_forward and p.tcp:
        out.append("TCP forwards: " + _ranges(p.tcp_forward))
    if p.udp_forward and p.udp:
        out.append("UDP forwards: " + _ranges(p.udp_forward))
    off = [name for name, on in (("TCP", p.tcp), ("UDP", p.udp), ("ICMP", p.icmp),
                                 ("DHCP", p.dhcp), ("DHCPv6", p.dhcpv6), ("NDP", p.ndp),
                                 ("RA", p.ra)) if not on]
    if off:
        out.append("disabled: " + ", ".join(off))
    return out
