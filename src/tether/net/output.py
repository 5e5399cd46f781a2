"""Building frames towards the guest: Ethernet + IPv4/IPv6 + L4, checksums filled in.

The address length picks the IP version (4 or 16 bytes).  Builders take a
buffer whose L4 payload the caller has already placed at `l4_offset(addr) +
L4 header length` (often straight from a socket with recv_into), so payload
bytes are copied at most once.
"""

from __future__ import annotations

import struct
from typing import Final

from tether.wire import ethernet, ipv4, ipv6, tcp, udp
from tether.wire.checksum import finish, ones_sum, pseudo_sum

L2L3: Final = ethernet.HLEN + ipv4.HLEN  # 34: where the L4 header starts over IPv4
L2L3_V6: Final = ethernet.HLEN + ipv6.HLEN  # 54: over IPv6
UDP_PAYLOAD: Final = L2L3 + udp.HLEN
TCP_PAYLOAD: Final = L2L3 + tcp.HLEN  # for IPv4 segments without options


def l4_offset(addr: bytes) -> int:
    return L2L3 if len(addr) == 4 else L2L3_V6


class Output:
    """Knows the two MAC addresses; everything else comes per frame."""

    def __init__(self, our_mac: bytes) -> None:
        self.our_mac = our_mac
        self.guest_mac: bytes = ethernet.BROADCAST
        # When the transport completes TCP/UDP checksums itself (virtio's NEEDS_CSUM:
        # the field holds the pseudo-header sum, the device sums the rest), summing
        # every payload byte here would be wasted: it is most of the per-byte cost.
        self.partial_l4_checksums = False
        # When the transport also cuts big TCP segments to the guest's MTU (GSO), TCP
        # sends up to 64 KiB per frame: per-frame cost is most of the cost at MTU 1500.
        self.segment_offload = False
        # When the transport lets TCP receive payloads straight into the guest's
        # buffers (frames.InPlaceSink; Stack.attach sets it).
        self.in_place = False

    def _l2l3(self, frame: bytearray, l4_len: int, proto: int, src: bytes, dst: bytes,  # noqa: PLR0917
              dst_mac: bytes | None = None, hop_limit: int = 64) -> int:
        mac = dst_mac or self.guest_mac
        if len(src) == 4:
            ethernet.pack_into(frame, 0, mac, self.our_mac, ethernet.TYPE_IPV4)
            ipv4.pack_into(frame, ethernet.HLEN, ipv4.HLEN + l4_len, proto, src, dst)
            return L2L3
        ethernet.pack_into(frame, 0, mac, self.our_mac, ethernet.TYPE_IPV6)
        ipv6.pack_into(frame, ethernet.HLEN, l4_len, proto, src, dst, hop_limit)
        return L2L3_V6

    def _l4_checksum(self, view: memoryview, field: int, pseudo: int, zero_is: int) -> None:
        if self.partial_l4_checksums:
            struct.pack_into("!H", view, field, pseudo)
        else:
            l4 = L2L3 if field < L2L3_V6 else L2L3_V6
            csum = finish(ones_sum(view[l4:], pseudo))
            struct.pack_into("!H", view, field, csum or zero_is)

    def udp(self, frame: bytearray, payload_len: int, src: bytes, sport: int, dst: bytes,  # noqa: PLR0917
            dport: int, dst_mac: bytes | None = None) -> memoryview:
        length = udp.HLEN + payload_len
        l4 = self._l2l3(frame, length, ipv4.PROTO_UDP, src, dst, dst_mac)
        udp.pack_into(frame, l4, sport, dport, length)
        view = memoryview(frame)[:l4 + length]
        # RFC 768: a computed 0 is sent as 0xFFFF (0 means "no checksum").
        self._l4_checksum(view, l4 + 6, pseudo_sum(src, dst, ipv4.PROTO_UDP, length), 0xFFFF)
        return view

    def icmp(self, frame: bytearray, icmp_len: int, src: bytes, dst: bytes) -> memoryview:
        """frame[L2L3:L2L3 + icmp_len] is a full ICMP message with a zero checksum."""
        self._l2l3(frame, icmp_len, ipv4.PROTO_ICMP, src, dst)
        view = memoryview(frame)[:L2L3 + icmp_len]
        struct.pack_into("!H", frame, L2L3 + 2, finish(ones_sum(view[L2L3:])))
        return view

    def icmp6(self, frame: bytearray, icmp_len: int, src: bytes, dst: bytes,  # noqa: PLR0917
              dst_mac: bytes | None = None, hop_limit: int = 64) -> memoryview:
        """frame[L2L3_V6:...] is a full ICMPv6 message with a zero checksum (RFC 4443 2.3)."""
        self._l2l3(frame, icmp_len, ipv6.PROTO_ICMPV6, src, dst, dst_mac, hop_limit)
        view = memoryview(frame)[:L2L3_V6 + icmp_len]
        pseudo = pseudo_sum(src, dst, ipv6.PROTO_ICMPV6, icmp_len)
        struct.pack_into("!H", frame, L2L3_V6 + 2, finish(ones_sum(view[L2L3_V6:], pseudo)))
        return view

    def tcp(self, frame: bytearray, payload_len: int, src: bytes, sport: int, dst: bytes,  # noqa: PLR0917
            dport: int, seq: int, ack: int, flags: int, window: int,
            options: bytes = b"") -> memoryview:
        """The payload is at l4_offset(src) + 20 + len(options)."""
        l4 = l4_offset(src)
        hlen = tcp.pack_into(frame, l4, sport, dport, seq, ack, flags, window, options)
        length = hlen + payload_len
        self._l2l3(frame, length, ipv4.PROTO_TCP, src, dst)
        view = memoryview(frame)[:l4 + length]
        self._l4_checksum(view, l4 + 16, pseudo_sum(src, dst, ipv4.PROTO_TCP, length), 0)
        return view
