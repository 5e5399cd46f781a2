"""The virtio-net header in front of every frame (virtio spec 1.2 §5.1.6).

tether's two transports that carry it, the vhost-user rings and a tap with
IFF_VNET_HDR, fill it in here, so the offload rules live in one place.

    struct virtio_net_hdr {            little-endian (VERSION_1; a tap after TUNSETVNETLE)
        u8   flags;                    F_NEEDS_CSUM
        u8   gso_type;                 GSO_NONE, GSO_TCPV4, GSO_TCPV6
        le16 hdr_len;                  GSO: Ethernet + IP + TCP header bytes
        le16 gso_size;                 GSO: payload bytes per segment
        le16 csum_start;               NEEDS_CSUM: where summing starts (the L4 header)
        le16 csum_offset;              NEEDS_CSUM: where, from csum_start, the sum goes
        le16 num_buffers;              only with VERSION_1 or MRG_RXBUF (§5.1.6.1)
    };

NEEDS_CSUM (§5.1.6.2): the frame's TCP/UDP checksum field holds the
pseudo-header sum, and the receiver sums from csum_start to the end.
"""

from __future__ import annotations

import struct
from typing import Final

HDR: Final = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
HDR_LEN: Final = HDR.size  # 10: the legacy header, and a tap's
HDR_LEN_NUM_BUFFERS: Final = 12  # with num_buffers
NUM_BUFFERS: Final = struct.Struct("<H")
NUM_BUFFERS_OFFSET: Final = 10

F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4

_CSUM_OFFSET_TCP: Final = 16  # RFC 9293: the checksum field's offset in the TCP header
_CSUM_OFFSET_UDP: Final = 6  # RFC 768
_MIN_FRAME: Final = 14 + 20 + 8  # Ethernet + IPv4 + UDP: nothing shorter carries TCP or UDP
_ETH: Final = 14
_IPV6_END: Final = _ETH + 40  # IPv6 without extension headers (tether never sends them)


def pack_offload_into(hdr: bytearray, frame: bytes | bytearray | memoryview,
                      gso_mtu: int = 0, length: int = -1) -> None:
    """The offload fields of `hdr` for a frame from tether's stack.

    `length` is the frame's length when `frame` holds only its headers
    (the payload was received into place elsewhere); -1: len(frame).

    A TCP or UDP frame gets NEEDS_CSUM with csum_start/csum_offset; a TCP
    frame whose IP packet is larger than `gso_mtu` (0: never) also gets the
    GSO fields that cut it into segments of that MTU.  Any other frame
    leaves `hdr` as it is, which the caller keeps zeroed between frames,
    and so does one whose checksum field would not lie inside it (a reader
    rejects csum_start + csum_offset + 2 beyond the frame: Linux's
    virtio_net_hdr_to_skb fails the write with EINVAL).
    Inline byte tests, no parsing objects: this runs for every frame.
    """
    size = len(frame)
    if length < 0:
        length = size
    if length < _MIN_FRAME or size < _MIN_FRAME:
        return
    if frame[12] == 0x08 and frame[13] == 0x00:  # IPv4: protocol at 9, IHL in words
        proto, l4, gso = frame[_ETH + 9], _ETH + (frame[_ETH] & 0xF) * 4, GSO_TCPV4
    elif frame[12] == 0x86 and frame[13] == 0xDD:  # IPv6: next header at 6
        proto, l4, gso = frame[_ETH + 6], _IPV6_END, GSO_TCPV6
    else:
        return
    if proto == 6:
        if size < l4 + 20:  # not even a TCP header: nothing to complete
            return
        if gso_mtu and length - _ETH > gso_mtu:
            tcp_hlen = (frame[l4 + 12] >> 4) * 4
            HDR.pack_into(hdr, 0, F_NEEDS_CSUM, gso, l4 + tcp_hlen,
                          gso_mtu - (l4 - _ETH) - tcp_hlen, l4, _CSUM_OFFSET_TCP)
        else:
            HDR.pack_into(hdr, 0, F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, _CSUM_OFFSET_TCP)
    elif proto == 17 and size >= l4 + 8:
        HDR.pack_into(hdr, 0, F_NEEDS_CSUM, GSO_NONE, 0, 0, l4, _CSUM_OFFSET_UDP)
