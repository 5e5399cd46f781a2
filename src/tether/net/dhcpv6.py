"""The DHCPv6 server (RFC 8415): one address for one client, and DNS servers.

Sans-IO: a parsed message and the guest's MAC in, the reply payload (or None) out.
Every reply fits the link: a message whose answer would not (a client id far
beyond a DUID's 130 bytes, RFC 8415 section 11.1) gets none.
"""

from __future__ import annotations

from typing import Final

from tether.net.params import NetParams
from tether.wire import dhcpv6, ipv6, udp
from tether.wire.dhcp import encode_search_list

MAX_DUID: Final = 130  # RFC 8415 section 11.1: "no more than 130 octets (including the type code)"


def reply(params: NetParams, msg: dhcpv6.Message) -> bytes | None:
    kind = msg.type
    if kind == dhcpv6.SOLICIT:
        answer = dhcpv6.REPLY if dhcpv6.OPT_RAPID_COMMIT in msg.options else dhcpv6.ADVERTISE
    elif kind in (dhcpv6.REQUEST, dhcpv6.CONFIRM, dhcpv6.RENEW, dhcpv6.REBIND,
                  dhcpv6.INFORMATION_REQUEST):
        answer = dhcpv6.REPLY
    else:
        return None
    client_id = msg.options.get(dhcpv6.OPT_CLIENTID)
    if client_id is None or not 2 <= len(client_id) <= MAX_DUID:
        return None  # section 16: every message we answer must carry a valid one
    out = bytearray([answer]) + msg.xid
    out += dhcpv6.option(dhcpv6.OPT_CLIENTID, client_id)
    out += dhcpv6.option(dhcpv6.OPT_SERVERID, dhcpv6.duid_ll(params.our_mac))
    ia = msg.options.get(dhcpv6.OPT_IA_NA)
    if ia is not None and len(ia) >= 12 and params.addr6 is not None \
            and kind != dhcpv6.INFORMATION_REQUEST:
        out += dhcpv6.ia_na(ia[:4], params.addr6)
    if answer == dhcpv6.REPLY and kind == dhcpv6.SOLICIT:
        out += dhcpv6.option(dhcpv6.OPT_RAPID_COMMIT, b"")
    if params.dns6:
        out += dhcpv6.option(dhcpv6.OPT_DNS_SERVERS, b"".join(params.dns6))
    if params.fqdn is not None:
        # RFC 4704 section 4: flags 0 (the server does the updates, if any), then the name.
        out += dhcpv6.option(dhcpv6.OPT_CLIENT_FQDN, b"\0" + encode_search_list([params.fqdn]))
    if len(out) > params.mtu - ipv6.HLEN - udp.HLEN:
        return None  # only a configuration with thousands of DNS servers gets here
    return bytes(out)
