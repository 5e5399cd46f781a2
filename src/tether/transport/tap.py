"""The tap transport: frames between a tap device and the stack, as pasta moves them.

Frames are read and written without any prefix (IFF_NO_PI), each behind a
virtio-net header when the device has one (IFF_VNET_HDR).  Making the device
in its namespace is tap_setup.py's: that runs once, this runs per frame (and
is compiled in the optional build, tools/compile.py).
"""

from __future__ import annotations

import errno
import io
import logging
import os
from typing import Final

from tether import loop as evloop
from tether.frames import GuestPort
from tether.ratelimit import limited
from tether.wire import virtio_net

log = logging.getLogger(__name__)

# With IFF_VNET_HDR each frame carries the 10-byte struct virtio_net_hdr
# (wire/virtio_net.py), little-endian after TUNSETVNETLE (tap_setup.py).
VNET_HDR_LEN: Final = virtio_net.HDR_LEN
_PLAIN_HDR: Final = bytes(VNET_HDR_LEN)

FRAME_MAX: Final = 65536 + 128  # a 64 KiB GSO frame, its Ethernet and virtio-net headers
BATCH: Final = 32  # frames read per wake-up before the stack sees them


class TapTransport:
    """Implements frames.FrameSink over a tap fd and feeds a GuestPort."""

    def __init__(self, loop: evloop.Loop, fd: int, port: GuestPort,
                 vnet_hdr: bool = True, mtu: int = 65520) -> None:
        self.loop = loop
        self.fd = fd
        self.port = port
        # With a virtio-net header on each frame, the kernel completes TCP/UDP
        # checksums for us (NEEDS_CSUM), so the stack may leave them partial.
        self.vnet_hdr = vnet_hdr
        self.checksum_offload = vnet_hdr
        # ...and cuts TCP segments larger than the MTU into MTU-sized ones (GSO),
        # so the stack may send up to 64 KiB per frame even to a 1500-byte link.
        self.segment_offload = vnet_hdr
        self.mtu = mtu
        self._skip = VNET_HDR_LEN if vnet_hdr else 0
        self._hdr = bytearray(VNET_HDR_LEN)  # zero between frames
        self._file = io.FileIO(fd, "r+b", closefd=False)
        self._buffers = [bytearray(FRAME_MAX) for _ in range(BATCH)]
        self._views = [memoryview(b) for b in self._buffers]
        self._pace = evloop.ReadPace(loop, BATCH)
        self._blocked = False
        self.frames_in = 0
        self.frames_out = 0
        self.frames_dropped = 0
        loop.add(fd, evloop.READ, self._on_event)

    def _on_event(self, events: int) -> None:
        if events & evloop.WRITE and self._blocked:
            self._blocked = False
            self.loop.modify(self.fd, evloop.READ)
            self.port.guest_room_available()
        if events & evloop.READ:
            self._read_batch()

    def _read_batch(self) -> None:
        batch: list[memoryview] = []
        views = self._views
        for i in range(self._pace.wake()):
            view = views[i]
            try:
                n = self._file.readinto(view)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                limited(log, logging.WARNING, "tap read: %s", exc)
                break
            if not n:  # None: EAGAIN
                break
            if n > self._skip:
                batch.append(view[self._skip:n])
        self._pace.done(len(batch))
        if batch:
            self.frames_in += len(batch)
            self.port.frames_from_guest(batch)

    # -- frames.FrameSink ----------------------------------------------------

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        try:
            if self.vnet_hdr:
                # The kernel completes TCP/UDP checksums the stack left partial
                # (NEEDS_CSUM) and cuts TCP segments beyond the MTU (GSO).  Every
                # frame, however short: a 43-byte UDP/IPv4 frame has a partial
                # checksum too, and without NEEDS_CSUM the guest drops it.
                hdr = self._hdr
                virtio_net.pack_offload_into(hdr, frame, self.mtu)
                try:
                    os.writev(self.fd, (hdr, frame))
                finally:
                    hdr[:] = _PLAIN_HDR
            else:
                os.write(self.fd, frame)
        except BlockingIOError:
            self._block()
            self.frames_dropped += 1
            return False
        except OSError as exc:
            # EIO while the link is down, EINVAL for an oversized frame: drop this one.
            log.debug("tap write: %s", exc)
            self.frames_dropped += 1
            return False
        self.frames_out += 1
        return True

    def _block(self) -> None:
        if not self._blocked:
            self._blocked = True
            self.loop.modify(self.fd, evloop.READ | evloop.WRITE)

    def has_room(self) -> bool:
        return not self._blocked

    def flush(self) -> None:
        pass  # every write is already visible to the guest's kernel

    def close(self) -> None:
        self.loop.remove(self.fd)
        os.close(self.fd)
