"""DHCPv4 messages, RFC 2131 section 2 (format) and RFC 2132 (options)."""

from __future__ import annotations

# The "idna" codec is found by a lazy import at its first use; tether may have
# dropped privileges by then, and a Python installed where only root can read
# would no longer find it.  Import it while tether can.
import encodings.idna  # noqa: F401
import struct
from typing import Final, NamedTuple

from tether.wire import ParseError

SERVER_PORT: Final = 67
CLIENT_PORT: Final = 68
MAGIC: Final = b"\x63\x82\x53\x63"  # RFC 2131 section 3
FIXED_LEN: Final = 236  # op .. file, before the magic cookie
BOOTREQUEST: Final = 1
BOOTREPLY: Final = 2

# RFC 2132 option codes
OPT_PAD: Final = 0
OPT_SUBNET_MASK: Final = 1
OPT_ROUTER: Final = 3
OPT_DNS: Final = 6
OPT_HOSTNAME: Final = 12
OPT_DOMAIN_NAME: Final = 15
OPT_MTU: Final = 26
OPT_CLIENT_FQDN: Final = 81  # RFC 4702
OPT_REQUESTED_IP: Final = 50
OPT_LEASE_TIME: Final = 51
OPT_MESSAGE_TYPE: Final = 53
OPT_SERVER_ID: Final = 54
OPT_DOMAIN_SEARCH: Final = 119  # RFC 3397
OPT_END: Final = 255

DISCOVER: Final = 1
OFFER: Final = 2
REQUEST: Final = 3
DECLINE: Final = 4
ACK: Final = 5
NAK: Final = 6
RELEASE: Final = 7
INFORM: Final = 8

# op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr
_FIXED: Final = struct.Struct("!BBBBIHH4s4s4s4s16s")


class Message(NamedTuple):
    op: int
    xid: int
    flags: int
    ciaddr: bytes
    chaddr: bytes
    options: dict[int, bytes]

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value is not None and len(value) == 1 else None


def parse(data: memoryview) -> Message:
    if len(data) < FIXED_LEN + len(MAGIC):
        raise ParseError(f"dhcp: {len(data)} bytes, need {FIXED_LEN + len(MAGIC)}")
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr = \
        _FIXED.unpack_from(data)
    if htype != 1 or hlen != 6:
        raise ParseError("dhcp: hardware type is not Ethernet")
    if bytes(data[FIXED_LEN:FIXED_LEN + 4]) != MAGIC:
        raise ParseError("dhcp: no magic cookie")
    options: dict[int, bytes] = {}
    i = FIXED_LEN + 4
    n = len(data)
    while i < n:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            break
        if i + 1 >= n:
            raise ParseError("dhcp: option length missing")
        length = data[i + 1]
        if i + 2 + length > n:
            raise ParseError(f"dhcp: option {code} overruns the message")
        # RFC 3396: repeated options concatenate.
        options[code] = options.get(code, b"") + bytes(data[i + 2:i + 2 + length])
        i += 2 + length
    return Message(op, xid, flags, ciaddr, chaddr[:6], options)


def build_reply(request: Message, yiaddr: bytes, siaddr: bytes,
                options: list[tuple[int, bytes]]) -> bytes:
    """A BOOTREPLY; options longer than 255 bytes are split (RFC 3396)."""
    fixed = _FIXED.pack(BOOTREPLY, 1, 6, 0, request.xid, 0, request.flags, bytes(4), yiaddr,
                        siaddr, bytes(4), request.chaddr.ljust(16, b"\0"))
    out = bytearray(fixed)
    out += bytes(192)  # sname and file, unused
    out += MAGIC
    for code, value in options:
        for start in range(0, max(len(value), 1), 255):
            chunk = value[start:start + 255]
            out += bytes([code, len(chunk)]) + chunk
    out.append(OPT_END)
    if len(out) < 300:  # BOOTP minimum, some clients insist on it (RFC 1542 section 3.3)
        out += bytes(300 - len(out))
    return bytes(out)


def encode_search_list(domains: list[str]) -> bytes:
    """RFC 1035 section 3.1 names, uncompressed, for option 119."""
    out = bytearray()
    for domain in domains:
        for label in domain.strip(".").split("."):
            if label:
                raw = label.encode("idna")
                out += bytes([len(raw)]) + raw
        out.append(0)
    return bytes(out)


def client_fqdn(name: str) -> bytes:
    """Option 81 from a server (RFC 4702 section 2): E (wire-format name), RCODEs 255."""
    return bytes([0x04, 0xFF, 0xFF]) + encode_search_list([name])
