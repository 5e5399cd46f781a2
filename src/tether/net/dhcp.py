"""The DHCPv4 server (RFC 2131): one client, one address, decided by configuration.

Sans-IO: a parsed request in, the reply's DHCP payload (or None) out.
"""

from __future__ import annotations

import struct

from tether.net.params import NetParams
from tether.wire import dhcp, ipv4, udp


def reply(params: NetParams, request: dhcp.Message) -> bytes | None:
    """OFFER for DISCOVER, ACK/NAK for REQUEST, ACK for INFORM; None for the rest."""
    if request.op != dhcp.BOOTREQUEST:
        return None
    kind = request.message_type
    if kind == dhcp.DISCOVER:
        answer = dhcp.OFFER
    elif kind == dhcp.REQUEST:
        wanted = request.options.get(dhcp.OPT_REQUESTED_IP, request.ciaddr)
        if wanted not in (params.addr4, bytes(4)):
            return dhcp.build_reply(request, bytes(4), params.gateway4,
                                    [(dhcp.OPT_MESSAGE_TYPE, bytes([dhcp.NAK])),
                                     (dhcp.OPT_SERVER_ID, params.gateway4)])
        answer = dhcp.ACK
    elif kind == dhcp.INFORM:
        answer = dhcp.ACK
    else:
        return None  # DECLINE, RELEASE: there is no other address to give
    options: list[tuple[int, bytes]] = [
        (dhcp.OPT_MESSAGE_TYPE, bytes([answer])),
        (dhcp.OPT_SERVER_ID, params.gateway4),
        (dhcp.OPT_LEASE_TIME, struct.pack("!I", params.lease_time)),
        (dhcp.OPT_SUBNET_MASK, params.netmask4),
        (dhcp.OPT_ROUTER, params.gateway4),
    ]
    if params.announce_mtu:
        options.append((dhcp.OPT_MTU, struct.pack("!H", min(params.mtu, 0xFFFF))))
    if params.hostname is not None:
        options.append((dhcp.OPT_HOSTNAME, params.hostname.encode()))
    if params.fqdn is not None:
        options.append((dhcp.OPT_CLIENT_FQDN, dhcp.client_fqdn(params.fqdn)))
    if params.dns4:
        options.append((dhcp.OPT_DNS, b"".join(params.dns4)))
    if params.search:
        options.append((dhcp.OPT_DOMAIN_SEARCH, dhcp.encode_search_list(list(params.search))))
    yiaddr = bytes(4) if kind == dhcp.INFORM else params.addr4
    out = dhcp.build_reply(request, yiaddr, params.gateway4, options)
    room = min(params.mtu, 0xFFFF) - ipv4.HLEN - udp.HLEN
    while len(out) > room and len(options) > 5:
        # Too many DNS servers or search domains for the link: leave the least
        # needed options out rather than send a frame the link cannot carry.
        options.pop()
        out = dhcp.build_reply(request, yiaddr, params.gateway4, options)
    return out if len(out) <= room else None
