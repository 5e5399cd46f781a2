"""Building IPv4 frames towards the guest: Ethernet + IPv4 + L4, checksums filled in.

Builders take a buffer whose L4 payload the caller has already placed (often
straight from a socket with recv_into), so payload bytes are copied at most once.
"""

from __future__ import annotations

import struct

from tether.wire import ethernet, ipv4, tcp, udp
from tether.wire.checksum import finish, ones_sum, pseudo_sum

L2L3 = ethernet.HLEN + ipv4.HLEN  # 34: where the L4 header starts
UDP_PAYLOAD = L2L3 + udp.HLEN
TCP_PAYLOAD = L2L3 + tcp.HLEN  # for segments without options


class Output:
    """Knows the two MAC addresses; everything else comes per frame."""

    def __init__(self, our_mac: bytes) -> None:
        self.our_mac = our_mac
        self.guest_mac: bytes = ethernet.BROADCAST
        # When the transport completes TCP/UDP checksums itself (virtio's NEEDS_CSUM:
        # the field holds the pseudo-header sum, the device sums the rest), summing
        # every payload byte here would be wasted: it is most of the per-byte cost.
        self.partial_l4_checksums = False

    def _l2l3(self, frame: bytearray, l4_len: int, proto: int, src: bytes, dst: bytes,  # noqa: PLR0917
              dst_mac: bytes | None = None) -> None:
        ethernet.pack_into(frame, 0, dst_mac or self.guest_mac, self.our_mac, ethernet.TYPE_IPV4)
        ipv4.pack_into(frame, ethernet.HLEN, ipv4.HLEN + l4_len, proto, src, dst)

    def udp(self, frame: bytearray, payload_len: int, src: bytes, sport: int, dst: bytes,  # noqa: PLR0917
            dport: int, dst_mac: bytes | None = None) -> memoryview:
        """frame[UDP_PAYLOAD:UDP_PAYLOAD + payload_len] holds the payload already."""
        length = udp.HLEN + payload_len
        self._l2l3(frame, length, ipv4.PROTO_UDP, src, dst, dst_mac)
        udp.pack_into(frame, L2L3, sport, dport, length)
        view = memoryview(frame)[:L2L3 + length]
        pseudo = pseudo_sum(src, dst, ipv4.PROTO_UDP, length)
        if self.partial_l4_checksums:
            struct.pack_into("!H", frame, L2L3 + 6, pseudo)
        else:
            csum = finish(ones_sum(view[L2L3:], pseudo))
            struct.pack_into("!H", frame, L2L3 + 6, csum or 0xFFFF)  # RFC 768: 0 is "none"
        return view

    def icmp(self, frame: bytearray, icmp_len: int, src: bytes, dst: bytes) -> memoryview:
        """frame[L2L3:L2L3 + icmp_len] is a full ICMP message with a zero checksum."""
        self._l2l3(frame, icmp_len, ipv4.PROTO_ICMP, src, dst)
        view = memoryview(frame)[:L2L3 + icmp_len]
        struct.pack_into("!H", frame, L2L3 + 2, finish(ones_sum(view[L2L3:])))
        return view

    def tcp(self, frame: bytearray, payload_len: int, src: bytes, sport: int, dst: bytes,  # noqa: PLR0917
            dport: int, seq: int, ack: int, flags: int, window: int,
            options: bytes = b"") -> memoryview:
        """With options, the caller put the payload at TCP_PAYLOAD + len(options)."""
        hlen = tcp.pack_into(frame, L2L3, sport, dport, seq, ack, flags, window, options)
        length = hlen + payload_len
        self._l2l3(frame, length, ipv4.PROTO_TCP, src, dst)
        view = memoryview(frame)[:L2L3 + length]
        pseudo = pseudo_sum(src, dst, ipv4.PROTO_TCP, length)
        if self.partial_l4_checksums:
            struct.pack_into("!H", frame, L2L3 + 16, pseudo)
        else:
            struct.pack_into("!H", frame, L2L3 + 16, finish(ones_sum(view[L2L3:], pseudo)))
        return view
