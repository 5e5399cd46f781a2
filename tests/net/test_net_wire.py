"""wire/ against scapy as an independent oracle: what we build scapy reads, and back."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import checksum as scapy_checksum

from tether.net.output import L2L3, TCP_PAYLOAD, UDP_PAYLOAD, Output
from tether.wire import ParseError, arp, dhcp, ethernet, icmp, ipv4, tcp, udp
from tether.wire.checksum import checksum

GUEST_MAC = "02:00:00:00:00:02"
OUR_MAC = bytes.fromhex("9a559a559a55")
A = bytes([10, 0, 0, 1])
B = bytes([10, 0, 0, 2])


def test_checksum_matches_rfc1071_example() -> None:
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
    assert checksum(bytes.fromhex("0001f203f4f5f6f7")) == (~0xDDF2) & 0xFFFF


@given(st.binary(max_size=300))
def test_checksum_is_scapy_checksum(data: bytes) -> None:
    assert checksum(data) == scapy_checksum(data)


@given(st.binary(max_size=1400), st.integers(1, 65535), st.integers(1, 65535))
def test_udp_frame_read_by_scapy(payload: bytes, sport: int, dport: int) -> None:
    out = Output(OUR_MAC)
    out.guest_mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    frame = bytearray(UDP_PAYLOAD + len(payload))
    frame[UDP_PAYLOAD:] = payload
    pkt = Ether(bytes(out.udp(frame, len(payload), A, sport, B, dport)))
    assert pkt[Ether].dst == GUEST_MAC
    assert pkt[IP].src == "10.0.0.1" and pkt[IP].dst == "10.0.0.2"
    assert pkt[UDP].sport == sport and pkt[UDP].dport == dport
    assert bytes(pkt[UDP].payload) == payload
    ip_csum, udp_csum = pkt[IP].chksum, pkt[UDP].chksum
    del pkt[IP].chksum, pkt[UDP].chksum
    again = Ether(bytes(pkt))
    assert (again[IP].chksum, again[UDP].chksum) == (ip_csum, udp_csum)


@given(st.binary(max_size=1400), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 0x3F), st.integers(0, 65535))
def test_tcp_frame_read_by_scapy(payload: bytes, seq: int, ack: int, flags: int,
                                 window: int) -> None:
    out = Output(OUR_MAC)
    frame = bytearray(TCP_PAYLOAD + len(payload))
    frame[TCP_PAYLOAD:] = payload
    pkt = Ether(bytes(out.tcp(frame, len(payload), A, 80, B, 5555, seq, ack, flags, window)))
    assert (pkt[TCP].seq, pkt[TCP].ack, int(pkt[TCP].flags), pkt[TCP].window) == \
        (seq, ack, flags, window)
    assert bytes(pkt[TCP].payload) == payload
    csum = pkt[TCP].chksum
    del pkt[TCP].chksum
    assert Ether(bytes(pkt))[TCP].chksum == csum


def test_tcp_syn_options_read_by_scapy() -> None:
    opts = tcp.syn_options(65480, 8)
    frame = bytearray(TCP_PAYLOAD + len(opts))
    pkt = Ether(bytes(Output(OUR_MAC).tcp(frame, 0, A, 80, B, 5555, 1, 2, tcp.SYN | tcp.ACK,
                                          65535, opts)))
    assert dict(pkt[TCP].options)["MSS"] == 65480
    assert dict(pkt[TCP].options)["WScale"] == 8


def test_parse_scapy_tcp_syn() -> None:
    raw = bytes(Ether() / IP(src="10.0.0.2", dst="10.0.0.1") /
                TCP(sport=4000, dport=80, seq=77, flags="S",
                    options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)),
                             ("NOP", None), ("WScale", 7)]))
    view = memoryview(raw)[ethernet.HLEN:]
    ip = ipv4.parse(view)
    assert (ip.src, ip.dst, ip.proto) == (B, A, ipv4.PROTO_TCP)
    seg = view[ip.header_len:ip.total_len]
    hdr = tcp.parse(seg)
    assert (hdr.sport, hdr.dport, hdr.seq, hdr.flags) == (4000, 80, 77, tcp.SYN)
    assert tcp.parse_syn_options(seg[tcp.HLEN:hdr.header_len]) == tcp.SynOptions(1460, 7)


def test_parse_scapy_arp_and_build_reply() -> None:
    raw = bytes(ARP(op=1, hwsrc=GUEST_MAC, psrc="10.0.0.2", pdst="10.0.0.1"))
    req = arp.parse(memoryview(raw))
    assert req.op == arp.OP_REQUEST and req.tpa == A
    buf = bytearray(arp.LEN)
    arp.pack_into(buf, 0, arp.Arp(arp.OP_REPLY, OUR_MAC, req.tpa, req.sha, req.spa))
    reply = ARP(bytes(buf))
    assert (reply.op, reply.psrc, reply.hwsrc) == (2, "10.0.0.1", "9a:55:9a:55:9a:55")


def test_icmp_echo_reply_read_by_scapy() -> None:
    frame = bytearray(L2L3 + 8 + 5)
    icmp.pack_echo_into(frame, L2L3, icmp.V4_ECHO_REPLY, 0x1234, 7)
    frame[L2L3 + 8:] = b"hello"
    pkt = Ether(bytes(Output(OUR_MAC).icmp(frame, 13, A, B)))
    assert (pkt[ICMP].type, pkt[ICMP].id, pkt[ICMP].seq) == (0, 0x1234, 7)
    csum = pkt[ICMP].chksum
    del pkt[ICMP].chksum
    assert Ether(bytes(pkt))[ICMP].chksum == csum


def test_dhcp_roundtrip_with_scapy() -> None:
    raw = bytes(BOOTP(chaddr=bytes.fromhex("020000000002"), xid=99) /
                DHCP(options=[("message-type", "discover"), "end"]))
    msg = dhcp.parse(memoryview(raw))
    assert msg.message_type == dhcp.DISCOVER and msg.xid == 99
    out = dhcp.build_reply(msg, B, A, [(dhcp.OPT_MESSAGE_TYPE, bytes([dhcp.OFFER])),
                                       (dhcp.OPT_MTU, struct.pack("!H", 65520)),
                                       (dhcp.OPT_DOMAIN_SEARCH,
                                        dhcp.encode_search_list(["example.org"]))])
    reply = BOOTP(out)
    opts: dict[str, object] = dict(o for o in reply[DHCP].options if isinstance(o, tuple))
    assert reply.yiaddr == "10.0.0.2" and reply.xid == 99
    assert opts["message-type"] == 2 and opts["interface-mtu"] == 65520


PARSERS = [ethernet.parse, arp.parse, ipv4.parse, udp.parse, tcp.parse,
           tcp.parse_syn_options, icmp.parse_echo, dhcp.parse]


@given(st.binary(max_size=400))
def test_parsers_are_total(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(ParseError):
            parse(memoryview(data))


def test_ipv4_refuses_fragments_and_bad_lengths() -> None:
    frag = bytes(IP(src="10.0.0.2", dst="10.0.0.1", flags="MF") / UDP())
    try:
        ipv4.parse(memoryview(frag))
        raise AssertionError("fragment accepted")
    except ParseError as exc:
        assert "fragment" in str(exc)
    short = bytearray(bytes(IP(src="10.0.0.2", dst="10.0.0.1") / UDP()))
    try:
        ipv4.parse(memoryview(short)[:25])
        raise AssertionError("truncated packet accepted")
    except ParseError:
        pass
