"""The offload fields wire/virtio_net.py writes, at the short end of frames."""

from __future__ import annotations

from tether.wire import virtio_net


def _ipv4(proto: int, l4: bytes, ihl: int = 5) -> bytes:
    ip = bytes([0x40 | ihl, 0, 0, 0, 0, 0, 0, 0, 64, proto]) + bytes(10 + (ihl - 5) * 4)
    return bytes(12) + b"\x08\x00" + ip + l4


def _ipv6(proto: int, l4: bytes) -> bytes:
    return bytes(12) + b"\x86\xdd" + bytes([0x60, 0, 0, 0, 0, 0, proto, 64]) + bytes(32) + l4


def _offload(frame: bytes) -> tuple[int, ...]:
    hdr = bytearray(virtio_net.HDR_LEN)
    virtio_net.pack_offload_into(hdr, frame, 1500)
    return virtio_net.HDR.unpack(hdr)


def test_the_shortest_udp_frames_get_needs_csum() -> None:
    # 42 bytes (IPv4, empty datagram) and 43 (one byte): the frames tap once sent bare.
    for payload in (b"", b"x"):
        assert _offload(_ipv4(17, bytes(8) + payload)) == (virtio_net.F_NEEDS_CSUM, 0, 0, 0,
                                                           34, 6)
    assert _offload(_ipv6(17, bytes(8))) == (virtio_net.F_NEEDS_CSUM, 0, 0, 0, 54, 6)


def test_no_needs_csum_when_the_checksum_field_is_past_the_end() -> None:
    # A reader would reject csum_start + csum_offset + 2 beyond the frame.
    assert _offload(_ipv4(6, bytes(19))) == (0,) * 6  # a TCP header cut short
    assert _offload(_ipv4(17, bytes(4), ihl=15)) == (0,) * 6  # 42 bytes, but options first
    assert _offload(_ipv6(17, bytes(7))) == (0,) * 6
    assert _offload(_ipv4(6, bytes(20))) == (virtio_net.F_NEEDS_CSUM, 0, 0, 0, 34, 16)
