"""Ethernet II header (IEEE 802.3, type field >= 0x0600)."""

from __future__ import annotations

import struct
from typing import Final

from tether.wire import ParseError

HLEN: Final = 14
TYPE_IPV4: Final = 0x0800
TYPE_ARP: Final = 0x0806
TYPE_IPV6: Final = 0x86DD
BROADCAST: Final = b"\xff" * 6

_HDR: Final = struct.Struct("!6s6sH")


def parse(frame: memoryview) -> tuple[bytes, bytes, int]:
    """(destination MAC, source MAC, ethertype); the payload starts at HLEN."""
    if len(frame) < HLEN:
        raise ParseError(f"ethernet: {len(frame)} bytes, need {HLEN}")
    dst, src, ethertype = _HDR.unpack_from(frame)
    return dst, src, ethertype


def pack_into(buf: bytearray | memoryview, offset: int, dst: bytes, src: bytes,
              ethertype: int) -> None:
    _HDR.pack_into(buf, offset, dst, src, ethertype)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; ValueError on anything else."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)
