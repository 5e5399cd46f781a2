"""Frame capture in the classic pcap format (what Wireshark and tcpdump read).

Sits on the frames seam: wraps the stack's GuestPort and the transport's
FrameSink, so every transport gets capture for free.  Format: libpcap file
header (magic 0xa1b2c3d4, version 2.4, LINKTYPE_ETHERNET) then one 16-byte
record header per frame; see https://www.tcpdump.org/manpages/pcap-savefile.5.html.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from typing import BinaryIO

from tether.frames import FrameSink, GuestPort

_FILE_HEADER = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")
SNAPLEN = 65535 + 14
LINKTYPE_ETHERNET = 1


class PcapWriter:
    def __init__(self, path: str) -> None:
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - lives as long as tether
        self._file.write(_FILE_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self._file.flush()

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        now = time.time()
        sec = int(now)
        length = len(frame)
        self._file.write(_RECORD.pack(sec, int((now - sec) * 1e6), min(length, SNAPLEN), length))
        self._file.write(frame[:SNAPLEN])

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CapturingSink:
    """A FrameSink that records each frame it passes on."""

    def __init__(self, sink: FrameSink, pcap: PcapWriter) -> None:
        self.sink = sink
        self.pcap = pcap
        # Captured frames then show partial TCP/UDP checksums, as on a real
        # offloading NIC; Wireshark reads them and flags the checksum only.
        self.checksum_offload = bool(getattr(sink, "checksum_offload", False))
        self.segment_offload = bool(getattr(sink, "segment_offload", False))

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        sent = self.sink.send_frame(frame)
        if sent:
            self.pcap.write(frame)
        return sent

    def has_room(self) -> bool:
        return self.sink.has_room()

    def flush(self) -> None:
        self.sink.flush()
        self.pcap.flush()


class CapturingPort:
    """A GuestPort that records each frame from the guest before the stack sees it."""

    def __init__(self, port: GuestPort, pcap: PcapWriter) -> None:
        self.port = port
        self.pcap = pcap

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        for frame in frames:
            self.pcap.write(frame)
        self.port.frames_from_guest(frames)

    def guest_room_available(self) -> None:
        self.port.guest_room_available()
