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
import os
import re
import socket
import struct
from dataclasses import dataclass, field

from tether.net.params import DEFAULT_MAX_FLOWS, DEFAULT_MTU, OUR_MAC, NetParams, PortRange
from tether.wire.ethernet import parse_mac

LINK_LOCAL_ADDR4 = bytes([169, 254, 2, 1])  # passt's, when the host has nothing to copy
LINK_LOCAL_GATEWAY4 = bytes([169, 254, 2, 2])


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
    one_off: bool = False
    """Exit when the front-end closes its connection (not after migrating out)."""
    fd: int | None = None
    """An inherited, connected front-end socket (-F) instead of a listening one."""
    quiet: bool = False
    runas: str | None = None
    migrate_exit: bool = False


def _ipv4(text: str, what: str) -> bytes:
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        raise ConfigError(f"{what}: not an IPv4 address: {text!r}") from None


def default_route6(ifname: str | None = None) -> tuple[bytes, int, bytes | None] | None:
    """(global address, prefix length, gateway) of the interface with the IPv6 default
    route (or of ifname, whose default route gives the gateway if it has one)."""
    try:
        with open("/proc/net/ipv6_route") as f:
            routes = [line.split() for line in f]
        with open("/proc/net/if_inet6") as f:
            addrs = [line.split() for line in f]
    except OSError:
        return None
    defaults = [r for r in routes if len(r) >= 10 and r[0] == "0" * 32 and r[1] == "00"
                and r[9] != "lo" and (ifname is None or r[9] == ifname)]
    dev = ifname if ifname is not None else (defaults[0][9] if defaults else None)
    gateway = next((bytes.fromhex(r[4]) for r in defaults if r[9] == dev and
                    r[4] != "0" * 32), None)
    for a in addrs:
        # scope 00 is global; flags 0x80 would be "permanent", any state will do
        if len(a) >= 6 and a[5] == dev and a[3] == "00":
            return bytes.fromhex(a[0]), int(a[2], 16), gateway
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


def _local_port_range() -> range:
    """The kernel's ephemeral ports, which 'all' leaves alone as passt does."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return range(lo, hi + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


_PORTS_TO = re.compile(r"(.*,)?(~?\d+(-\d+)?|all):")  # ports, then ':' and an address


def _bind_prefix(prefix: str, what: str) -> tuple[str | None, str | None]:
    """passt's '[ADDR][%IFNAME]' before the '/' of a port spec."""
    text, _, ifname = prefix.partition("%")
    if "%" in prefix and not ifname:
        raise ConfigError(f"{what}: empty interface name in {prefix!r}")
    if not text:
        return None, ifname or None
    try:
        address = str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(f"{what}: not an address to listen on: {text!r}") from None
    return address, ifname or None


def _port_item(part: str, what: str) -> tuple[int, int, int]:
    """'FIRST[-LAST][:TOFIRST[-TOLAST]]' -> (first, last, guest first)."""
    host, _, guest = part.partition(":")
    try:
        first, _, last = host.partition("-")
        lo = int(first)
        hi = int(last) if last else lo
        gfirst, _, glast = guest.partition("-")
        glo = int(gfirst) if guest else lo
        ghi = int(glast) if glast else glo + (hi - lo)
    except ValueError:
        raise ConfigError(f"{what}: bad port item {part!r}") from None
    if not (1 <= lo <= hi <= 65535) or not (1 <= glo <= 65535 - (hi - lo)):
        raise ConfigError(f"{what}: port range {part!r} outside 1..65535")
    if ghi - glo != hi - lo:
        raise ConfigError(f"{what}: {part!r}: the guest range must be as long as the host's")
    return lo, hi, glo


def parse_ports(spec: str, what: str) -> tuple[PortRange, ...]:
    """passt's port specs: 'none', or '[ADDR][%IFNAME]/' then 'all' or a comma list of
    FIRST[-LAST][:TOFIRST[-TOLAST]] to forward and ~FIRST[-LAST] to exclude.
    """
    if spec == "none":
        return ()
    refused = ConfigError(f"{what}: {spec!r}: forwarding to another guest address "
                          "(':ADDR/' or 'all:ADDR') is not supported by tether")
    address = ifname = None
    body = spec
    if "/" in spec:
        prefix, _, body = spec.partition("/")
        try:
            address, ifname = _bind_prefix(prefix, what)
        except ConfigError:
            if _PORTS_TO.match(prefix):
                raise refused from None  # 'PORT:ADDR/GUESTPORT' without a prefix
            raise
    if "/" in body or body.startswith("all:") or ",all:" in body:
        raise refused
    wanted: dict[int, int] = {}
    excluded: set[int] = set()
    parts = body.split(",")
    if "auto" in parts:
        raise ConfigError(f"{what}: 'auto' is pasta's (it watches a namespace's "
                          "listening sockets); tether does not support it")
    best_effort = "all" in parts or all(p.startswith("~") for p in parts if p)
    if best_effort:
        # Everything not excluded and not ephemeral: ports that cannot be bound are
        # skipped at start-up rather than fatal (PortRange.best_effort).
        ephemeral = _local_port_range()
        excluded.update(ephemeral)
        parts = ["1-65535", *(p for p in parts if p != "all")]
    for part in parts:
        if not part:
            raise ConfigError(f"{what}: empty item in {spec!r}")
        exclude = part.startswith("~")
        lo, hi, glo = _port_item(part[1:] if exclude else part, what)
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
            ranges[-1] = dataclasses.replace(prev, last=port)
        else:
            ranges.append(PortRange(port, port, gport, address, ifname, best_effort))
    return tuple(ranges)


# -- what the host has --------------------------------------------------------

def default_route4(ifname: str | None = None) -> tuple[str, bytes] | None:
    """(interface, gateway) of the IPv4 default route (through ifname, if given)."""
    try:
        with open("/proc/net/route") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000" and \
                (ifname is None or cols[0] == ifname):
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

class _Refused(argparse.Action):
    """A passt option tether does not implement: one line naming it, and exit 1."""

    def __init__(self, option_strings: list[str], dest: str, why: str = "",
                 nargs: int | str | None = 0, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=nargs, default=argparse.SUPPRESS,
                         help=f"not supported: {why}")
        self.why = why

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        parser.exit(1, f"tether: {option_string}: not supported by tether: {self.why}\n")


# passt(1) options tether refuses, with why; docs/passt-compatibility.md lists them too.
REFUSED: dict[tuple[str, ...], tuple[int, str]] = {
    ("--stats",): (1, "no event statistics; tether logs its counters on exit"),
    ("-c", "--conf-path"): (1, "no pesto(1) control socket"),
    ("--dhcp-dns",): (0, "pasta-only; tether always announces DNS"),
    ("--dhcp-search",): (0, "pasta-only; tether always announces the search list"),
    ("-T", "--tcp-ns"): (1, "pasta-only: no forwarding from the namespace to the host"),
    ("-U", "--udp-ns"): (1, "pasta-only: no forwarding from the namespace to the host"),
    ("--host-lo-to-ns-lo",): (0, "pasta-only: no loopback splicing"),
    ("--userns",): (1, "pasta-only: tether joins network namespaces only"),
    ("--netns-only",): (0, "pasta-only: tether never joins a user namespace anyway"),
    ("--no-netns-quit",): (0, "pasta-only: tether does not watch the namespace's reference"),
    ("--no-pidns",): (0, "pasta-only: COMMAND never gets a PID namespace"),
    ("--no-copy-routes",): (0, "pasta-only (deprecated): only the default route is set"),
    ("--no-copy-addrs",): (0, "pasta-only (deprecated): only one address is set"),
    ("--ns-mac-addr",): (1, "pasta-only: the tap keeps the kernel's MAC address"),
    ("--no-splice",): (0, "pasta-only: tether has no splice path to disable"),
    ("--splice-only",): (0, "pasta-only: tether has no splice path"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tether",
        description="User-mode networking for a VM or a network namespace: the guest's "
                    "Ethernet frames become ordinary host sockets, without privileges. "
                    "The command line is passt's (see docs/passt-compatibility.md).",
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
    t.add_argument("-s", "--socket", "--socket-path", dest="socket", metavar="PATH",
                   help="listen on this UNIX socket for QEMU's -netdev stream "
                        "(4-byte big-endian length before each frame)")
    t.add_argument("--vhost-user", action="store_true",
                   help="serve QEMU over vhost-user on --socket PATH")
    t.add_argument("-F", "--fd", metavar="FD", type=int,
                   help="serve this inherited, connected socket (stream or vhost-user) "
                        "instead of listening; exit when it closes")
    t.add_argument("-1", "--one-off", action="store_true",
                   help="exit once the client (QEMU) closes its connection, except after "
                        "a completed migration as source")
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
    m.add_argument("--migrate-exit", action="store_true",
                   help="exit after a completed migration as source")
    m.add_argument("--max-state", metavar="BYTES", type=int, default=2 << 30,
                   help="refuse an incoming migration state larger than this "
                        "(default 2 GiB)")
    m.add_argument("--migrate-format", choices=("tether", "passt"), default="tether",
                   help="the stream a migration source writes: tether's own (default), or "
                        "passt's version 2, for a target that runs passt.  A target reads "
                        "either, whatever this says")
    a = p.add_argument_group("addresses (defaults copied from the host's default-route "
                             "interface)")
    a.add_argument("-4", "--ipv4-only", action="store_true", help="IPv4 only")
    a.add_argument("-6", "--ipv6-only", action="store_true", help="IPv6 only")
    a.add_argument("-i", "--interface", metavar="NAME",
                   help="copy addresses and routes from host interface NAME")
    a.add_argument("-a", "--address", metavar="ADDR[/PREFIX]", action="append",
                   help="the guest's address: IPv4, or IPv6 (given by DHCPv6; the RA "
                        "announces its /64 for SLAAC); once per family")
    a.add_argument("-n", "--netmask", metavar="PREFIX|MASK", help="the guest's prefix length")
    a.add_argument("-g", "--gateway", metavar="ADDR", action="append",
                   help="the guest's default gateway (IPv4), or the IPv6 gateway address "
                        "(mapped to the host's ::1 like the IPv4 one); once per family")
    a.add_argument("-m", "--mtu", metavar="MTU", type=int, default=DEFAULT_MTU,
                   help=f"MTU given to the guest (default {DEFAULT_MTU}; 0: none is "
                        "announced and 1500 is assumed)")
    a.add_argument("-M", "--mac-addr", metavar="MAC",
                   help="tether's own MAC address, as the guest sees it")
    a.add_argument("-o", "--outbound", metavar="ADDR", action="append",
                   help="bind outbound sockets to ADDR; once per family")
    a.add_argument("--outbound-if4", metavar="NAME",
                   help="bind IPv4 outbound sockets to interface NAME")
    a.add_argument("--outbound-if6", metavar="NAME",
                   help="bind IPv6 outbound sockets to interface NAME")
    a.add_argument("-D", "--dns", metavar="ADDR", action="append",
                   help="DNS server announced to the guest (repeatable; default: the "
                        "host's; 'none': no DNS)")
    a.add_argument("-S", "--search", metavar="LIST", action="append",
                   help="DNS search domains announced to the guest (space-separated, "
                        "repeatable; 'none': no search list)")
    a.add_argument("--no-dhcp-dns", action="store_true",
                   help="announce no DNS server (DHCP, RA, DHCPv6)")
    a.add_argument("--no-dhcp-search", action="store_true",
                   help="announce no DNS search list")
    a.add_argument("--dns-forward", metavar="ADDR",
                   help="guest DNS queries to ADDR go to the host's first resolver (or "
                        "--dns-host); ADDR is then the DNS server announced to the guest")
    a.add_argument("--dns-host", metavar="ADDR",
                   help="the host resolver --dns-forward queries go to")
    a.add_argument("-H", "--hostname", metavar="NAME",
                   help="host name given to the guest (DHCP option 12)")
    a.add_argument("--fqdn", metavar="NAME",
                   help="FQDN given to the guest (DHCP option 81, DHCPv6 option 39)")
    a.add_argument("--map-host-loopback", metavar="ADDR", action="append",
                   help="guest traffic to ADDR goes to the host's loopback (default: the "
                        "gateway address; 'none': nothing); once per family")
    a.add_argument("--no-map-gw", action="store_true",
                   help="do not map any address to the host's loopback")
    a.add_argument("--map-guest-addr", metavar="ADDR", action="append",
                   help="guest traffic to ADDR goes to the host's own address, which the "
                        "guest was given ('none': nothing); once per family")
    h = p.add_argument_group("protocol handlers")
    for name, what in (("tcp", "TCP"), ("udp", "UDP"), ("icmp", "ICMP echo (implies --no-ndp)"),
                       ("dhcp", "the DHCP server"), ("ndp", "neighbour discovery"),
                       ("dhcpv6", "the DHCPv6 server"), ("ra", "router advertisements")):
        h.add_argument(f"--no-{name}", action="store_true", help=f"disable {what}")
    f = p.add_argument_group("forwarding")
    f.add_argument("-t", "--tcp-ports", metavar="SPEC", action="append",
                   help="forward host TCP ports to the guest: 'none', or [ADDR][%%IFNAME]/ "
                        "then 'all' or PORT, FIRST-LAST, PORT:GUESTPORT, "
                        "FIRST-LAST:GFIRST-GLAST, ~PORT to exclude; comma-separated")
    f.add_argument("-u", "--udp-ports", metavar="SPEC", action="append",
                   help="forward host UDP ports to the guest, same syntax as -t")
    f.add_argument("--freebind", action="store_true",
                   help="-t/-u may listen on addresses the host does not have (yet)")
    f.add_argument("--max-flows", metavar="N", type=int, default=DEFAULT_MAX_FLOWS,
                   help=f"size of the flow table (default {DEFAULT_MAX_FLOWS}, passt's)")
    o = p.add_argument_group("running")
    o.add_argument("-p", "--pcap", metavar="FILE",
                   help="capture every frame to FILE (pcap format)")
    o.add_argument("-f", "--foreground", action="store_true", help="do not daemonise")
    o.add_argument("-d", "--debug", action="store_true", help="log debug messages")
    o.add_argument("--trace", action="store_true", help="the same as --debug")
    o.add_argument("-q", "--quiet", action="store_true",
                   help="log warnings and errors only (no start-up summary)")
    o.add_argument("-e", "--stderr", action="store_true",
                   help="no effect (passt compatibility): without -l, tether logs to stderr")
    o.add_argument("-l", "--log-file", metavar="FILE", help="log to FILE instead of stderr")
    o.add_argument("--log-size", metavar="SIZE", type=int,
                   help="accepted for passt compatibility; the log file is not trimmed")
    o.add_argument("-P", "--pid", metavar="FILE",
                   help="write the process id to FILE (before the start-up command returns)")
    o.add_argument("--runas", metavar="UID|UID:GID|LOGIN|LOGIN:GROUP",
                   help="the user to run as when started as root (default: nobody)")
    o.add_argument("--chroot-fallback", action="store_true",
                   help="no effect (passt compatibility): tether does not change its root")
    o.add_argument("--version", action="store_true", help="print the version and exit")
    r = p.add_argument_group("passt options tether does not implement")
    for names, (nargs, why) in REFUSED.items():
        r.add_argument(*names, action=_Refused, nargs=nargs, why=why)
    o.add_argument("command", nargs="*",
                   help="with no --netns/--socket: run COMMAND in a new network namespace "
                        "attached to tether (default: $SHELL)")
    return p


@dataclass
class _Families:
    """What -a, -g, -o, --map-* said, split by address family."""

    v4: str | None = None
    v6: str | None = None


def _by_family(values: list[str] | None, what: str, allow_none: bool = False) -> _Families:
    out = _Families()
    for v in values or ():
        if allow_none and v == "none":
            out = _Families("none", "none")
            continue
        if ":" in v:
            if out.v6 not in (None, "none") and out.v6 != v:
                raise ConfigError(f"{what}: at most one IPv6 address")
            out.v6 = v
        else:
            if out.v4 not in (None, "none") and out.v4 != v:
                raise ConfigError(f"{what}: at most one IPv4 address")
            out.v4 = v
    return out


def _inside(gateway: bytes, addr: bytes, prefix: int) -> bool:
    """Whether the host's gateway is on the guest's network (so the guest reaches it)."""
    net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(addr)}/{prefix}", strict=False)
    return ipaddress.IPv4Address(gateway) in net


def _search(values: list[str] | None, host: list[str]) -> tuple[str, ...]:
    if not values:
        return tuple(host)
    domains = [d for v in values for d in v.split()]
    return () if domains == ["none"] else tuple(domains)


def _check_name(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    if not name or len(name) > 253 or any(c.isspace() for c in name):
        raise ConfigError(f"{what}: not a host name: {name!r}")
    return name


@dataclass
class _Names:
    """What the guest is told about DNS, and where --dns-forward goes."""

    dns4: tuple[bytes, ...]
    dns6: tuple[bytes, ...]
    search: tuple[str, ...]
    match4: bytes | None  # --dns-forward
    host4: bytes | None  # the resolver it goes to (--dns-host, else the host's first)


def _dns(ns: argparse.Namespace) -> _Names:
    host_dns, host_search = resolv_conf()
    if ns.dns_host is not None and ":" in ns.dns_host:
        raise ConfigError("--dns-host: IPv6 resolvers are not supported by tether's "
                          "--dns-forward")
    dns_host = _ipv4(ns.dns_host, "--dns-host") if ns.dns_host is not None else \
        (host_dns[0] if host_dns else None)
    dns_match = None
    dns: tuple[bytes, ...] = tuple(host_dns)
    if ns.dns_forward is not None:
        if ":" in ns.dns_forward:
            raise ConfigError("--dns-forward: an IPv6 address is not supported by tether")
        dns_match = _ipv4(ns.dns_forward, "--dns-forward")
        if dns_host is None:
            raise ConfigError("--dns-forward: the host has no IPv4 resolver to forward to")
        dns = (dns_match,)
    dns6: tuple[bytes, ...] = ()
    if ns.dns:
        given = [d for d in ns.dns if d != "none"]
        dns = tuple(_ipv4(d, "--dns") for d in given if ":" not in d)
        dns6 = tuple(_ipv6(d, "--dns") for d in given if ":" in d)
    search = _search(ns.search, host_search)
    if ns.no_dhcp_dns:
        dns, dns6 = (), ()
    if ns.no_dhcp_search:
        search = ()
    return _Names(dns, dns6, search, dns_match, dns_host if dns_match is not None else None)


def _loopback_maps(ns: argparse.Namespace, gateway4: bytes | None, gateway6: bytes | None,
                   ) -> tuple[bytes | None, bytes | None, bool]:
    """(IPv4 address for 127.0.0.1, IPv6 address for ::1, whether tether's link-local
    router address stands for ::1 instead: it is known only once NetParams exist)."""
    if ns.no_map_gw:
        return None, None, False
    loopback = _by_family(ns.map_host_loopback, "--map-host-loopback", allow_none=True)
    if loopback.v4 is None:
        map4 = gateway4
    else:
        map4 = None if loopback.v4 == "none" else _ipv4(loopback.v4, "--map-host-loopback")
    if loopback.v6 is None:
        # The IPv6 gateway address, or tether's link-local router address when the
        # host has no IPv6 gateway: either way the host's ::1.
        return map4, gateway6, gateway6 is None
    if loopback.v6 == "none":
        return map4, None, False
    return map4, _ipv6(loopback.v6, "--map-host-loopback"), False


def from_args(ns: argparse.Namespace) -> Config:
    socket_mode = (ns.socket or ns.fd is not None) and not ns.vhost_user
    modes = sum(1 for x in (ns.netns, socket_mode, ns.vhost_user) if x)
    if modes > 1:
        raise ConfigError("choose one transport: --netns, --socket or --vhost-user")
    if ns.socket and ns.fd is not None:
        raise ConfigError("--fd serves an inherited socket: not with --socket")
    if ns.vhost_user and not ns.socket and ns.fd is None:
        raise ConfigError("--vhost-user needs --socket PATH")
    if ns.fd is not None and ns.fd < 0:
        raise ConfigError(f"--fd: {ns.fd} is not a file descriptor")
    migration_options = (ns.repair_path is not None, ns.require_repair, ns.migrate_no_linger,
                         ns.migrate_exit)
    if any(migration_options) and not ns.vhost_user:
        raise ConfigError("--repair-path, --require-repair, --migrate-no-linger and "
                          "--migrate-exit need --vhost-user")
    if ns.require_repair and ns.repair_path == "none":
        raise ConfigError("--require-repair with --repair-path none cannot migrate anything")
    if ns.max_state < 64:
        raise ConfigError("--max-state: too small for any state")
    if ns.ipv4_only and ns.ipv6_only:
        raise ConfigError("-4 and -6 exclude each other")
    repair_path = None
    if ns.vhost_user:
        repair_path = ns.repair_path or (f"{ns.socket}.repair" if ns.socket else None)
        if repair_path == "none":
            repair_path = None
    if ns.command and modes:
        raise ConfigError("COMMAND runs in a new namespace: not with --netns/--socket")
    if ns.mtu != 0 and not 68 <= ns.mtu <= 65520:
        raise ConfigError(f"--mtu: {ns.mtu} outside 68..65520 (or 0)")
    if ns.max_flows < 1:
        raise ConfigError("--max-flows: must be at least 1")
    want4, want6 = not ns.ipv6_only, not ns.ipv4_only
    addresses = _by_family(ns.address, "--address")
    cidr: int | None = None
    if addresses.v4 is not None and "/" in addresses.v4:
        addresses.v4, _, length = addresses.v4.partition("/")
        if ns.netmask is not None:
            raise ConfigError("--address ADDR/PREFIX and --netmask exclude each other")
        cidr = _prefix(length)
    if addresses.v6 is not None:
        # passt: a prefix length on an IPv6 address is replaced by 64.
        addresses.v6 = addresses.v6.partition("/")[0]
    gateways = _by_family(ns.gateway, "--gateway")
    if ns.interface is not None and not os.path.exists(f"/sys/class/net/{ns.interface}"):
        raise ConfigError(f"--interface: no host interface {ns.interface!r}")
    route = default_route4(ns.interface)
    host_if = ns.interface or (route[0] if route else None)
    host = interface_address4(host_if) if host_if else None
    addr6: bytes | None = None
    host_gw6: bytes | None = None
    if want6:
        host6 = default_route6(ns.interface)
        if host6 is not None:
            host_gw6 = host6[2]
        if addresses.v6 is not None:
            addr6 = _ipv6(addresses.v6, "--address")
        elif host6 is not None and (addresses.v4 is None or ns.ipv6_only):
            addr6 = host6[0]
    link_local = False
    if addresses.v4 is not None:
        addr = _ipv4(addresses.v4, "--address")
    elif host is not None:
        addr = host[0]
    elif not want4:
        addr = bytes(4)
    else:
        # Nothing to copy: passt's link-local fallback, so the guest still reaches
        # the host through the gateway.
        addr, link_local = LINK_LOCAL_ADDR4, True
    if cidr is not None:
        prefix = cidr
    elif ns.netmask is not None:
        prefix = _prefix(ns.netmask)
    elif link_local:
        prefix = 16
    else:
        prefix = host[1] if host and addresses.v4 is None else 24
    if gateways.v4 is not None:
        gateway = _ipv4(gateways.v4, "--gateway")
    elif link_local:
        gateway = LINK_LOCAL_GATEWAY4
    elif route is not None and (addresses.v4 is None or _inside(route[1], addr, prefix)):
        gateway = route[1]
    elif want4:
        # An address on its own: the first host of its network is the gateway.
        net = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(addr)}/{prefix}", strict=False)
        gateway = next(iter(net.hosts()), net.network_address).packed
    else:
        gateway = bytes(4)
    if want4 and gateway == addr:
        raise ConfigError("--gateway: must differ from the guest's address")
    if gateways.v6 is not None:
        gateway6: bytes | None = _ipv6(gateways.v6, "--gateway")
    else:
        gateway6 = host_gw6 if addresses.v6 is None else None
    names = _dns(ns)
    map_lo, map_lo6, map_router6 = _loopback_maps(ns, gateway if want4 else None, gateway6)
    guest_map = _by_family(ns.map_guest_addr, "--map-guest-addr", allow_none=True)
    map_guest4 = _ipv4(guest_map.v4, "--map-guest-addr") if guest_map.v4 not in (
        None, "none") else None
    map_guest6 = _ipv6(guest_map.v6, "--map-guest-addr") if guest_map.v6 not in (
        None, "none") else None
    outbound = _by_family(ns.outbound, "--outbound")
    if outbound.v4 is not None:
        _ipv4(outbound.v4, "--outbound")
    if outbound.v6 is not None:
        _ipv6(outbound.v6, "--outbound")
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
        addr4=addr, prefix4=prefix, gateway4=gateway, dns4=names.dns4, search=names.search,
        mtu=ns.mtu or 1500, our_mac=mac, map_host_loopback4=map_lo,
        dns_match4=names.match4, dns_host4=names.host4,
        tcp_forward=tcp_fwd, udp_forward=udp_fwd, max_flows=ns.max_flows, addr6=addr6,
        gateway6=gateway6, dns6=names.dns6, map_host_loopback6=map_lo6,
        map_guest_addr4=map_guest4,
        map_guest_addr6=map_guest6, outbound4=outbound.v4, outbound6=outbound.v6,
        outbound_if4=ns.outbound_if4, outbound_if6=ns.outbound_if6,
        hostname=_check_name(ns.hostname, "--hostname"),
        fqdn=_check_name(ns.fqdn, "--fqdn"), announce_mtu=ns.mtu != 0,
        freebind=ns.freebind, ipv4=want4, ipv6=want6, tcp=not ns.no_tcp, udp=not ns.no_udp,
        icmp=not ns.no_icmp, dhcp=not ns.no_dhcp and want4, dhcpv6=not ns.no_dhcpv6,
        ndp=not ns.no_ndp and not ns.no_icmp, ra=not ns.no_ra)
    if map_router6:
        params = dataclasses.replace(params, map_host_loopback6=params.router6)
    return Config(net=params, netns=ns.netns, ifname=ns.ns_ifname, socket_path=ns.socket,
                  vhost_user=ns.vhost_user, pcap=ns.pcap, foreground=ns.foreground,
                  debug=ns.debug or ns.trace, log_file=ns.log_file, pid_file=ns.pid,
                  command=list(ns.command), config_net=ns.config_net,
                  repair_path=repair_path, require_repair=ns.require_repair,
                  linger=not ns.migrate_no_linger, max_state=ns.max_state,
                  migrate_format=ns.migrate_format,
                  one_off=ns.one_off or ns.fd is not None, fd=ns.fd, quiet=ns.quiet,
                  runas=ns.runas, migrate_exit=ns.migrate_exit)
