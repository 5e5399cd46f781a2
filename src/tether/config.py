"""Command-line options -> a validated configuration, with passt's defaults.

By default the guest gets what the host has on the interface that carries the
IPv4 default route (address, prefix, gateway) and the host's resolvers, as
passt does; options override each part.  Every problem is a ConfigError whose
message is one line fit for the user.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass, field

from tether.net.params import DEFAULT_MTU, OUR_MAC, NetParams, PortRange
from tether.wire.ethernet import parse_mac


class ConfigError(Exception):
    """A bad option or an environment that cannot give a default."""


@dataclass
class Config:
    net: NetParams
    netns: str | None = None
    ifname: str = "tap0"
    socket_path: str | None = None
    vhost_user: bool = False
    pcap: str | None = None
    foreground: bool = False
    debug: bool = False
    log_file: str | None = None
    pid_file: str | None = None
    command: list[str] = field(default_factory=list)
    config_net: bool = False
    repair_path: str | None = None
    """tether-repair's socket (vhost-user only); None: no helper, connections reset."""
    require_repair: bool = False
    linger: bool = True
    max_state: int = 2 << 30
    migrate_format: str = "tether"


def _ipv4(text: str, what: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 address: {text!r}") from None


def default_route6() -> tuple[bytes, int] | None:
    """(global address, prefix length) on the interface of the IPv6 default route."""
    try:
        with open("/proc/net/ipv6_route") as f:
            routes = [line.split() for line in f]
        with open("/proc/net/if_inet6") as f:
            addrs = [line.split() for line in f]
    except OSError:
        return None
    ifname = next((r[9] for r in routes if len(r) >= 10 and r[0] == "0" * 32 and r[1] == "00"
                   and r[9] != "lo"), None)
    for a in addrs:
        # scope 00 is global; flags 0x80 would be "permanent", any state will do
        if len(a) >= 6 and a[5] == ifname and a[3] == "00":
            return bytes.fromhex(a[0]), int(a[2], 16)
    return None


def _ipv6(text: str, what: str) -> bytes:
    try:
        return ipaddress.IPv6Address(text).packed
    except ValueError:
        raise ConfigError(f"{what}: not an IPv6 address: {text!r}") from None


def _prefix(text: str) -> int:
    try:
        if "." in text:
            return ipaddress.IPv4Network(f"0.0.0.0/{text}").prefixlen
        value = int(text)
    except ValueError:
        raise ConfigError(f"--netmask: not a prefix length or mask: {text!r}") from None
    if not 0 < value <= 32:
        raise ConfigError(f"--netmask: prefix length {value} outside 1..32")
    return value


def parse_ports(spec: str, what: str) -> tuple[PortRange, ...]:
    """passt's port specs: 'none', 'all', or a comma list of PORT, FIRST-LAST, each
    optionally ':GUEST' (start of the guest range), and '~PORT'/'~FIRST-LAST' to exclude.
    """
    if spec == "none":
        return ()
    wanted: dict[int, int] = {}
    excluded: set[int] = set()
    parts = ["1-65535"] if spec == "all" else spec.split(",")
    if all(p.startswith("~") for p in parts if p):
        parts = ["1-65535", *parts]  # only exclusions: everything else is forwarded
    for part in parts:
        if not part:
            raise ConfigError(f"{what}: empty item in {spec!r}")
        exclude = part.startswith("~")
        body = part[1:] if exclude else part
        host, _, guest = body.partition(":")
        try:
            first, _, last = host.partition("-")
            lo = int(first)
            hi = int(last) if last else lo
            glo = int(guest) if guest else lo
        except ValueError:
            raise ConfigError(f"{what}: bad port item {part!r}") from None
        if not (1 <= lo <= hi <= 65535) or not (1 <= glo <= 65535 - (hi - lo)):
            raise ConfigError(f"{what}: port range {part!r} outside 1..65535")
        if exclude:
            excluded.update(range(lo, hi + 1))
        else:
            for port in range(lo, hi + 1):
                wanted[port] = glo + (port - lo)
    ranges: list[PortRange] = []
    for port in sorted(wanted):
        if port in excluded:
            continue
        gport = wanted[port]
        prev = ranges[-1] if ranges else None
        if prev is not None and prev.last == port - 1 and prev.guest_port(port) == gport:
            ranges[-1] = PortRange(prev.first, port, prev.guest_first)
        else:
            ranges.append(PortRange(port, port, gport))
    return tuple(ranges)


# -- what the host has --------------------------------------------------------

def default_route4() -> tuple[str, bytes] | None:
    """(interface, gateway) of the IPv4 default route, from /proc/net/route."""
    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            return cols[0], struct.pack("<I", int(cols[2], 16))
    return None


def interface_address4(ifname: str) -> tuple[bytes, int] | None:
    """(address, prefix length) of ifname, by ioctl."""
    req = struct.pack("16s", ifname.encode()).ljust(40, b"\0")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            addr = fcntl.ioctl(s, 0x8915, req)[20:24]  # SIOCGIFADDR
            mask = fcntl.ioctl(s, 0x891B, req)[20:24]  # SIOCGIFNETMASK
    except OSError:
        return None
    return addr, bin(int.from_bytes(mask, "big")).count("1")


def resolv_conf(path: str = "/etc/resolv.conf") -> tuple[list[bytes], list[str]]:
    """IPv4 name servers and search domains the host uses."""
    servers: list[bytes] = []
    search: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 2 and cols[0] == "nameserver":
                    # IPv6 resolvers: not offered to an IPv4-only guest.
                    with contextlib.suppress(ValueError):
                        servers.append(ipaddress.IPv4Address(cols[1]).packed)
                elif cols and cols[0] == "search":
                    search = cols[1:]
    except OSError:
        pass
    return servers, search


# -- options -----------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether",
        description="User-mode networking for a VM or a network namespace: the guest's "
                    "Ethernet frames become ordinary host sockets, without privileges.",
        epilog="Transports (pick one): --netns (a tap device in a namespace, like pasta), "
               "--socket (QEMU -netdev stream), --vhost-user (QEMU vhost-user).")
    t = p.add_argument_group("transport")
    t.add_argument("--netns", metavar="PATH|NAME",
                   help="attach to this network namespace (a path, or a name under "
                        "/run/netns) and create the tap interface in it")
    t.add_argument("--config-net", action="store_true",
                   help="with --netns: also give the interface the guest's address and a "
                        "default route (always done for COMMAND)")
    t.add_argument("-I", "--ns-ifname", metavar="NAME", default="tap0",
                   help="name of the tap interface in the namespace (default tap0)")
    t.add_argument("-s", "--socket", metavar="PATH",
                   help="listen on this UNIX socket for QEMU's -netdev stream "
                        "(4-byte big-endian length before each frame)")
    t.add_argument("--vhost-user", action="store_true",
                   help="serve QEMU over vhost-user on --socket PATH")
    t.add_argument("--print-capabilities", action="store_true",
                   help="print the vhost-user back-end capabilities (JSON) and exit")
    m = p.add_argument_group("live migration (vhost-user)")
    m.add_argument("--repair-path", metavar="PATH",
                   help="where tether-repair connects to move TCP connections "
                        "(default: the --socket path followed by .repair; 'none': no helper, "
                        "connections are reset by a migration)")
    m.add_argument("--require-repair", action="store_true",
                   help="fail a migration, keeping the source running, rather than reset "
                        "connections when tether-repair is not connected")
    m.add_argument("--migrate-no-linger", action="store_true",
                   help="close migrated sockets as soon as they are saved, for a migration "
                        "between two tether instances on the same host (by default they "
                        "stay, frozen and silent, until QEMU disconnects)")
    m.add_argument("--max-state", metavar="BYTES", type=int, default=2 << 30,
                   help="refuse an incoming migration state larger than this "
                        "(default 2 GiB)")
    m.add_argument("--migrate-format", choices=("tether", "passt"), default="tether",
                   help="the stream a migration source writes: tether's own (default), or "
                        "passt's version 2, for a target that runs passt.  A target reads "
                        "either, whatever this says")
    a = p.add_argument_group("addresses (defaults copied from the host's default-route "
                             "interface)")
    a.add_argument("-a", "--address", metavar="ADDR", action="append",
                   help="the guest's address: IPv4, or IPv6 (given by DHCPv6; the RA "
                        "announces its /64 for SLAAC); repeat for both")
    a.add_argument("-n", "--netmask", metavar="PREFIX|MASK", help="the guest's prefix length")
    a.add_argument("-g", "--gateway", metavar="ADDR", help="the guest's default gateway")
    a.add_argument("-m", "--mtu", metavar="MTU", type=int, default=DEFAULT_MTU,
                   help=f"MTU given to the guest (default {DEFAULT_MTU})")
    a.add_argument("-M", "--mac-addr", metavar="MAC",
                   help="tether's own MAC address, as the guest sees it")
    a.add_argument("-D", "--dns", metavar="ADDR", action="append",
                   help="DNS server announced to the guest (repeatable; default: the host's)")
    a.add_argument("-S", "--search", metavar="DOMAIN", action="append",
                   help="DNS search domain announced to the guest (repeatable)")
    a.add_argument("--map-host-loopback", metavar="ADDR",
                   help="guest traffic to ADDR goes to the host's loopback "
                        "(default: the gateway address)")
    a.add_argument("--no-map-gw", action="store_true",
                   help="do not map any address to the host's loopback")
    a.add_argument("--dns-forward", metavar="ADDR",
                   help="guest DNS queries to ADDR go to the host's first resolver; "
                        "ADDR is then the DNS server announced to the guest")
    f = p.add_argument_group("forwarding")
    f.add_argument("-t", "--tcp-ports", metavar="SPEC", action="append",
                   help="forward host TCP ports to the guest: 'none', 'all', PORT, "
                        "FIRST-LAST, PORT:GUESTPORT, ~PORT to exclude; comma-separated")
    f.add_argument("-u", "--udp-ports", metavar="SPEC", action="append",
                   help="forward host UDP ports to the guest, same syntax as -t")
    f.add_argument("--max-flows", metavar="N", type=int, default=4096,
                   help="size of the flow table (default 4096)")
    o = p.add_argument_group("running")
    o.add_argument("--pcap", metavar="FILE", help="capture every frame to FILE (pcap format)")
    o.add_argument("-f", "--foreground", action="store_true", help="do not daemonise")
    o.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    o.add_argument("-l", "--log-file", metavar="FILE", help="log to FILE instead of stderr")
    o.add_argument("-P", "--pid", metavar="FILE", help="write the process id to FILE")
    o.add_argument("command", nargs="*",
                   help="with no --netns/--socket: run COMMAND in a new network namespace "
                        "attached to tether (default: $SHELL)")
    return p


def from_args(ns: argparse.Namespace) -> Config:
    modes = sum(1 for x in (ns.netns, ns.socket and not ns.vhost_user, ns.vhost_user) if x)
    if modes > 1:
        raise ConfigError("choose one transport: --netns, --socket or --vhost-user")
    if ns.vhost_user and not ns.socket:
        raise ConfigError("--vhost-user needs --socket PATH")
    migration_options = (ns.repair_path is not None, ns.require_repair, ns.migrate_no_linger)
    if any(migration_options) and not ns.vhost_user:
        raise ConfigError("--repair-path, --require-repair and --migrate-no-linger need "
                          "--vhost-user")
    if ns.require_repair and ns.repair_path == "none":
        raise ConfigError("--require-repair with --repair-path none cannot migrate anything")
    if ns.max_state < 64:
        raise ConfigError("--max-state: too small for any state")
    repair_path = None
    if ns.vhost_user:
        repair_path = ns.repair_path or f"{ns.socket}.repair"
        if repair_path == "none":
            repair_path = None
    if ns.command and modes:
        raise ConfigError("COMMAND runs in a new namespace: not with --netns/--socket")
    if not 68 <= ns.mtu <= 65520:
        raise ConfigError(f"--mtu: {ns.mtu} outside 68..65520")
    if ns.max_flows < 1:
        raise ConfigError("--max-flows: must be at least 1")
    given4 = [a for a in ns.address or () if ":" not in a]
    given6 = [a for a in ns.address or () if ":" in a]
    if len(given4) > 1 or len(given6) > 1:
        raise ConfigError("--address: at most one IPv4 and one IPv6 address")
    ns.address = given4[0] if given4 else None
    route = default_route4()
    host = interface_address4(route[0]) if route else None
    if given6:
        addr6: bytes | None = _ipv6(given6[0], "--address")
    else:
        host6 = default_route6() if not given4 else None
        addr6 = host6[0] if host6 else None
    if ns.address is not None:
        addr = _ipv4(ns.address, "--address")
    elif host is not None:
        addr = host[0]
    else:
        raise ConfigError("no IPv4 default route on the host to copy: give --address")
    prefix = _prefix(ns.netmask) if ns.netmask is not None else (host[1] if host and
                                                                 ns.address is None else 24)
    if ns.gateway is not None:
        gateway = _ipv4(ns.gateway, "--gateway")
    elif route is not None and ns.address is None:
        gateway = route[1]
    else:
        # An address on its own: the first host of its network is the gateway.
        net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(addr)}/{prefix}", strict=False)
        gateway = next(iter(net.hosts())).packed
    if gateway == addr:
        raise ConfigError("--gateway: must differ from the guest's address")
    host_dns, host_search = resolv_conf()
    if ns.dns_forward is not None:
        dns_match = _ipv4(ns.dns_forward, "--dns-forward")
        if not host_dns:
            raise ConfigError("--dns-forward: the host has no IPv4 resolver to forward to")
        dns: tuple[bytes, ...] = (dns_match,)
    else:
        dns_match = None
        dns = tuple(host_dns)
    dns6: tuple[bytes, ...] = ()
    if ns.dns:
        dns = tuple(_ipv4(d, "--dns") for d in ns.dns if ":" not in d)
        dns6 = tuple(_ipv6(d, "--dns") for d in ns.dns if ":" in d)
    map_lo6: bytes | None = None
    if ns.no_map_gw:
        map_lo = None
    elif ns.map_host_loopback is not None and ":" in ns.map_host_loopback:
        map_lo = gateway
        map_lo6 = _ipv6(ns.map_host_loopback, "--map-host-loopback")
    elif ns.map_host_loopback is not None:
        map_lo = _ipv4(ns.map_host_loopback, "--map-host-loopback")
    else:
        map_lo = gateway
    try:
        mac = parse_mac(ns.mac_addr) if ns.mac_addr else OUR_MAC
    except ValueError as exc:
        raise ConfigError(f"--mac-addr: {exc}") from None
    tcp_fwd: tuple[PortRange, ...] = ()
    for spec in ns.tcp_ports or ():
        tcp_fwd += parse_ports(spec, "-t")
    udp_fwd: tuple[PortRange, ...] = ()
    for spec in ns.udp_ports or ():
        udp_fwd += parse_ports(spec, "-u")
    params = NetParams(
        addr4=addr, prefix4=prefix, gateway4=gateway, dns4=dns,
        search=tuple(ns.search) if ns.search else tuple(host_search), mtu=ns.mtu,
        our_mac=mac, map_host_loopback4=map_lo, dns_match4=dns_match,
        dns_host4=host_dns[0] if dns_match is not None else None,
        tcp_forward=tcp_fwd, udp_forward=udp_fwd, max_flows=ns.max_flows, addr6=addr6,
        dns6=dns6)
    if not ns.no_map_gw:
        # IPv6: the router's link-local address (or the given one) is the host's ::1.
        params = dataclasses.replace(params, map_host_loopback6=map_lo6 or params.router6)
    return Config(net=params, netns=ns.netns, ifname=ns.ns_ifname, socket_path=ns.socket,
                  vhost_user=ns.vhost_user, pcap=ns.pcap, foreground=ns.foreground,
                  debug=ns.debug, log_file=ns.log_file, pid_file=ns.pid,
                  command=list(ns.command), config_net=ns.config_net,
                  repair_path=repair_path, require_repair=ns.require_repair,
                  linger=not ns.migrate_no_linger, max_state=ns.max_state,
                  migrate_format=ns.migrate_format)
