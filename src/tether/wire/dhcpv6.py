"""DHCPv6, RFC 8415: section 8 (message format), 21 (options).

Enough for one client: answer Solicit, Request, Confirm, Renew, Rebind and
Information-request with one address (IA_NA) and the DNS servers (RFC 3646).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

CLIENT_PORT: Final = 546
SERVER_PORT: Final = 547
ALL_SERVERS: Final = bytes.fromhex("ff020000000000000000000000010002")  # section 7.1

SOLICIT: Final = 1
ADVERTISE: Final = 2
REQUEST: Final = 3
CONFIRM: Final = 4
RENEW: Final = 5
REBIND: Final = 6
REPLY: Final = 7
INFORMATION_REQUEST: Final = 11

OPT_CLIENTID: Final = 1
OPT_SERVERID: Final = 2
OPT_IA_NA: Final = 3
OPT_IAADDR: Final = 5
OPT_RAPID_COMMIT: Final = 14
OPT_DNS_SERVERS: Final = 23  # RFC 3646
OPT_CLIENT_FQDN: Final = 39  # RFC 4704

_OPT: Final = struct.Struct("!HH")


class Message(NamedTuple):
    type: int
    xid: bytes
    options: dict[int, bytes]


def parse(data: memoryview) -> Message:
    if len(data) < 4:
        raise ParseError(f"dhcpv6: {len(data)} bytes, need 4")
    options: dict[int, bytes] = {}
    i = 4
    while i < len(data):
        if i + 4 > len(data):
            raise ParseError("dhcpv6: truncated option header")
        code, length = _OPT.unpack_from(data, i)
        if i + 4 + length > len(data):
            raise ParseError(f"dhcpv6: option {code} overruns the message")
        options.setdefault(code, bytes(data[i + 4:i + 4 + length]))
        i += 4 + length
    return Message(data[0], bytes(data[1:4]), options)


def option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + value


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL (section 11.4): type 3, hardware type 1 (Ethernet), the MAC."""
    return struct.pack("!HH", 3, 1) + mac


def ia_na(iaid: bytes, addr: bytes, lifetime: int = 0xFFFFFFFF) -> bytes:
    """IA_NA (section 21.4) holding one IA Address (section 21.6), T1/T2 left to the client."""
    iaaddr = option(OPT_IAADDR, addr + struct.pack("!II", lifetime, lifetime))
    return option(OPT_IA_NA, iaid + struct.pack("!II", 0, 0) + iaaddr)
