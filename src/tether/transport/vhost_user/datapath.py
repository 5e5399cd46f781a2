"""The data path of the vhost-user net device: frames through the two virtqueues.

TX (guest -> tether): a kick, or a poll timer while the guest streams,
takes the chains the guest made available, hands their frames (the
virtio-net header skipped) to the `frames.GuestPort` in one batch, and
returns the chains.  RX (tether -> guest): `send_frame` copies a frame with
its virtio-net header (wire/virtio_net.py) into the guest's receive buffers;
it is the device's `frames.FrameSink`, with `has_room` and `flush`.

Everything here runs per frame, so it keeps to what measured fast in
CPython: struct.unpack_from on memoryviews, preallocated scratch lists and
buffers, no per-frame objects of its own.  The control side (device.py)
sets the fields below as the front-end configures the device; nothing in
flight crosses a loop pass, so the control side may change them between
any two calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from ...frames import GuestPort
from ...loop import Loop
from ...ratelimit import limited
from ...wire import virtio_net
from .memory import DirtyLog, GuestMemoryError, MemoryTable
from .virtqueue import MAX_QUEUE_SIZE, ChainError, Segment, VirtQueue

log = logging.getLogger(__name__)

RX, TX = 0, 1  # virtio-net queue pair 0 (virtio spec §5.1.2)
NUM_QUEUES: Final = 2
_ZERO_HDR: Final = bytes(virtio_net.HDR_LEN_NUM_BUFFERS)
MAX_FRAME: Final = 65535 + 14  # largest Ethernet frame (MTU 65520 + header, with room)
TX_BATCH: Final = 64  # chains per pass before yielding to other fds
# TX mitigation, as QEMU's own virtio-net "tx=timer": after a batch with bulk
# data in it, kicks stay off and the ring is looked at again after TX_POLL.
# A guest streaming at 1.5 Gbit/s adds a frame every ~0.4 ms, so this takes
# two or three per wake-up instead of one, with no kick (a vCPU exit) for
# any of them; measured side by side, tether's CPU per GB uploaded fell to
# 0.69x (1.06 vs 1.54 CPU-s/GB) and the TCG guest's rate rose.  Small
# frames (ACKs, requests) go back to kicks at once: no added latency for
# them.  1 ms is epoll's granularity.
TX_POLL: Final = 0.001
TX_POLL_BYTES: Final = 32 << 10  # data in a batch that makes it bulk
TX_SLOT: Final = MAX_FRAME + virtio_net.HDR_LEN_NUM_BUFFERS  # a gathered frame with its header
TX_ARENA_FRAMES: Final = 16  # gathered frames per pass that need no allocation
# Frames one claim plans (their payloads in one recvmsg): 8 frames of 64 KiB
# take 136 receive buffers, well under the kernel's 1024 iovecs per call.
CLAIM_FRAMES: Final = 8


class DataPath:
    """RX and TX of one device; a frames.FrameSink through its device."""

    def __init__(self, loop: Loop, port: GuestPort) -> None:
        self.loop = loop
        self.port = port
        self._tx_segs: list[Segment] = []
        self._tx_arena = memoryview(bytearray(TX_ARENA_FRAMES * TX_SLOT))
        # The virtio-net header of the next frame to the guest: zero but for
        # the offload fields of the frame at hand (see send_frame).
        self._hdr = bytearray(virtio_net.HDR_LEN_NUM_BUFFERS)
        self._hdr_view = memoryview(self._hdr)  # its first hdr_len bytes
        self._tx_scheduled = False
        self.rx_dropped = 0  # frames for the guest dropped (no buffers / not running)
        self.rx_frames = 0
        self.rx_multi_buffer = 0  # frames spread over several buffers (MRG_RXBUF)
        self.rx_in_place = 0  # of rx_frames, those whose payload a socket wrote (commit)
        self.tx_frames = 0
        self.logged_pages = 0  # dirty-log marks of closed logs (see device.stats())
        self.reset()

    def reset(self) -> None:
        """Back to a device no front-end has touched (after close())."""
        # Set by the control side from the negotiated features:
        self.set_hdr_len(virtio_net.HDR_LEN_NUM_BUFFERS)
        self.mergeable = False
        self.logging = False  # LOG_ALL: mark what we write in dirty_log
        self.partial_checksums = False  # frames to the guest carry NEEDS_CSUM
        self.memory: MemoryTable | None = None
        self.dirty_log: DirtyLog | None = None
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self._want_room = False
        self._rx_buf_size = 0
        self._scan_valid = False  # see _measure_room
        self._scan_pos = 0
        self._scan_room = 0

    def close(self) -> None:
        """Let go of the rings, their fds and guest memory."""
        self.close_queues()
        if self.memory is not None:
            self.memory.close()
        if self.dirty_log is not None:
            self.logged_pages += self.dirty_log.marked
            self.dirty_log.close()

    def close_queues(self) -> None:
        for vq in self.queues:
            if vq.kick_fd is not None:
                self.loop.remove(vq.kick_fd)
            vq.unmap_rings()
            vq.close_fds()

    # -- what the control side tells the data path ---------------------------------

    def set_hdr_len(self, hdr_len: int) -> None:
        """The virtio-net header is 10 or 12 bytes (§5.1.6: num_buffers with
        VERSION_1 or MRG_RXBUF)."""
        self.hdr_len = hdr_len
        self._hdr_view = memoryview(self._hdr)[:hdr_len]

    def rings_changed(self) -> None:
        """Ring positions or buffers may have changed: measure RX room afresh."""
        self._scan_valid = False

    def set_memory(self, memory: MemoryTable) -> list[str]:
        """Use a new memory table; returns why started rings could not be mapped in it."""
        self._scan_valid = False
        if self.memory is not None:
            for vq in self.queues:
                vq.unmap_rings()
            self.memory.close()
        self.memory = memory
        self._rx_buf_size = 0
        failed = []
        for vq in self.queues:
            try:
                vq.map_rings(memory)
            except GuestMemoryError as e:
                # A stopped ring's old addresses may not fit the new table:
                # QEMU sends fresh ones (SET_VRING_ADDR) before starting it.
                if vq.started:
                    vq.broken = True
                    failed.append(f"queue {vq.index}: {e}")
        return failed

    def set_dirty_log(self, new: DirtyLog) -> None:
        if self.dirty_log is not None:
            self.logged_pages += self.dirty_log.marked
            self.dirty_log.close()
        self.dirty_log = new

    def kick_handler(self, index: int) -> Callable[[int], None]:
        """What the loop calls when queue `index`'s kick fd fires."""
        return self._rx_kick if index == RX else self._tx_kick

    def queue_started(self, index: int) -> None:
        if index == TX:
            self._schedule_tx()
        else:
            self.loop.call_soon(self._room_check)

    def queue_enabled(self, index: int) -> None:
        if index == RX:
            self.loop.call_soon(self._room_check)

    def publish(self, index: int) -> None:
        """Make what was written to queue `index` visible (and logged) now."""
        vq = self.queues[index]
        if vq.ready:
            vq.publish_and_notify(self._log())

    # -- TX: guest -> port -----------------------------------------------------------

    def _log(self) -> DirtyLog | None:
        return self.dirty_log if self.logging else None

    def _tx_kick(self, events: int) -> None:
        self._process_tx()

    def _schedule_tx(self, delay: float = 0.0) -> None:
        if not self._tx_scheduled:
            self._tx_scheduled = True
            # A timer, not call_soon: the loop drains deferred work before it
            # polls again, so a busy guest would starve every other fd.
            self.loop.call_later(delay, self._process_tx)

    def _process_tx(self) -> None:
        self._tx_scheduled = False
        vq = self.queues[TX]
        memory = self.memory
        if memory is None or not vq.ready:
            return
        count = min(vq.available(), TX_BATCH)
        dirty = self._log()
        if count == 0:
            if vq.want_kicks(dirty):
                self._schedule_tx()
            return
        vq.quiet_kicks(dirty)  # we come back until the ring is empty
        hdr_len = self.hdr_len
        segs = self._tx_segs
        frames: list[memoryview] = []
        heads: list[int] = []
        batch_bytes = 0
        for _ in range(count):
            head = vq.pop()
            segs.clear()
            try:
                total = vq.walk(head, memory, segs, writable=False)
                if not hdr_len < total <= hdr_len + MAX_FRAME:
                    raise ChainError(f"chain {head}: {total} bytes is no frame")
            except (ChainError, GuestMemoryError) as e:
                vq.bad_chains += 1
                limited(log, logging.WARNING, "queue %d: dropped chain: %s", vq.index, e)
                vq.push_used(head, 0, dirty)
                continue
            heads.append(head)
            batch_bytes += total
            if len(segs) == 1:
                view, off, length, _ = segs[0]
                frames.append(view[off + hdr_len:off + length])
            else:
                # Gathered into a slot of the arena (Linux sends big frames
                # as a header descriptor plus one per page): no allocation,
                # no zeroing of 64 KiB per frame.
                if len(heads) <= TX_ARENA_FRAMES:
                    start = (len(heads) - 1) * TX_SLOT
                    buf = self._tx_arena[start:start + total]
                else:
                    buf = memoryview(bytearray(total))
                pos = 0
                for view, off, length, _ in segs:
                    buf[pos:pos + length] = view[off:off + length]
                    pos += length
                frames.append(buf[hdr_len:])
        if frames and vq.enabled:
            self.tx_frames += len(frames)
            try:
                self.port.frames_from_guest(frames)
            except Exception:
                log.exception("guest port failed on %d frames", len(frames))
        for frame in frames:
            try:
                frame.release()
            except BufferError:
                limited(log, logging.ERROR, "guest port kept a frame view beyond the call")
        for head in heads:
            vq.push_used(head, 0, dirty)
        vq.publish_and_notify(dirty)
        if vq.available():
            self._schedule_tx()
        elif batch_bytes >= TX_POLL_BYTES:
            self._schedule_tx(TX_POLL)
        elif vq.want_kicks(dirty):
            self._schedule_tx()

    # -- RX: port -> guest (frames.FrameSink) ----------------------------------------

    def _rx_kick(self, events: int) -> None:
        self._room_check()

    def _room_check(self) -> None:
        if not self._want_room:
            return
        if self._room():
            self._want_room = False
            self.queues[RX].quiet_kicks(self._log())
            self.port.guest_room_available()
        else:
            self._wait_for_room()  # the ring may have just started

    def has_room(self) -> bool:
        """Whether a full-sized frame fits; if not, guest_room_available() follows."""
        if self._room():
            return True
        self._wait_for_room()
        return False

    def _wait_for_room(self) -> None:
        """Ask the guest to kick us when it adds receive buffers.

        Only now: while there is room, its refills need not wake us.
        """
        self._want_room = True
        vq = self.queues[RX]
        if vq.ready and vq.want_kicks(self._log()):
            self.loop.call_soon(self._room_check)

    def _room(self) -> bool:
        vq = self.queues[RX]
        if not vq.enabled or self.memory is None:
            return False
        count = vq.available()
        if count == 0:
            return False
        if not self.mergeable:
            return True
        # Fast path: estimated from the largest buffer seen (Linux posts
        # mergeable buffers of similar sizes); an overestimate only costs a
        # dropped frame, after which room is signalled again.
        need = MAX_FRAME + self.hdr_len
        if count * self._rx_buf_size >= need:
            return True
        return self._measure_room(vq, count, need)

    def _measure_room(self, vq: VirtQueue, count: int, need: int) -> bool:
        """The tight case: add up the available buffers' sizes.

        Incremental: `_scan_room` is the capacity of the heads from
        last_avail up to `_scan_pos`; send_frame subtracts what it consumes,
        so each head is walked here once however often the stack asks.
        """
        assert self.memory is not None
        scanned = (self._scan_pos - vq.last_avail) & 0xFFFF
        if not self._scan_valid or scanned > count or self._scan_room < 0:
            self._scan_pos, self._scan_room, scanned = vq.last_avail, 0, 0
            self._scan_valid = True
        segs: list[Segment] = []
        while self._scan_room < need and scanned < count:
            segs.clear()
            try:
                size = vq.walk(vq.head_at(self._scan_pos), self.memory, segs, writable=True)
            except (ChainError, GuestMemoryError):
                self._scan_valid = False
                return True  # send_frame will meet, drop and count the bad chain
            self._rx_buf_size = max(self._rx_buf_size, size)
            self._scan_room += size
            self._scan_pos = (self._scan_pos + 1) & 0xFFFF
            scanned += 1
        return self._scan_room >= need

    def _rx_consumed(self, capacity: int) -> None:
        """Keep _measure_room's running total right after buffers were used."""
        if self._scan_valid:
            # The consumed heads were the first ones of the scanned range, or
            # the scan is behind and must restart.
            vq = self.queues[RX]
            if (self._scan_pos - vq.last_avail) & 0xFFFF <= vq.num:
                self._scan_room -= capacity
            else:
                self._scan_valid = False

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        vq = self.queues[RX]
        memory = self.memory
        if memory is None or not vq.ready or not vq.enabled:
            self.rx_dropped += 1
            return False
        hdr = self._hdr
        if self.partial_checksums:
            virtio_net.pack_offload_into(hdr, frame)
        taken = vq.scatter(memory, self._hdr_view, memoryview(frame),
                           MAX_QUEUE_SIZE if self.mergeable else 1, self._log())
        hdr[:] = _ZERO_HDR
        if taken <= 0:
            if taken:  # a malformed buffer, dropped with the frame
                self._scan_valid = False
                self._rx_buf_size = max(self._rx_buf_size, vq.scatter_largest)
            else:  # no room: the buffers stay for a frame that fits
                self._wait_for_room()
            self.rx_dropped += 1
            return False
        self._rx_consumed(vq.scatter_capacity)
        self._rx_buf_size = max(self._rx_buf_size, vq.scatter_largest)
        self.rx_frames += 1
        if taken > 1:
            self.rx_multi_buffer += 1
        return True

    # -- RX in place: port -> guest (frames.InPlaceSink) ------------------------------

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        """Plan frames in the guest's receive buffers (VirtQueue.claim): only
        where the guest completes checksums, since nobody sums a payload the
        stack never sees."""
        vq = self.queues[RX]
        memory = self.memory
        if (memory is None or not self.partial_checksums or not vq.ready
                or not vq.enabled):
            return 0
        return vq.claim(memory, self.hdr_len, headroom, payload_max, total, CLAIM_FRAMES,
                        MAX_QUEUE_SIZE if self.mergeable else 1, views)

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        """The next claimed frame, its payload received in place, to the guest."""
        vq = self.queues[RX]
        hdr = self._hdr
        virtio_net.pack_offload_into(hdr, headers, 0, len(headers) + payload_len)
        taken = vq.commit_claimed(self._hdr_view, headers, payload_len, self._log())
        hdr[:] = _ZERO_HDR
        if taken == 0:
            self.rx_dropped += 1
            return False
        self._rx_consumed(vq.scatter_capacity)
        self._rx_buf_size = max(self._rx_buf_size, vq.scatter_largest)
        self.rx_frames += 1
        self.rx_in_place += 1
        if taken > 1:
            self.rx_multi_buffer += 1
        return True

    def flush(self) -> None:
        vq = self.queues[RX]
        if vq.ready:
            vq.publish_and_notify(self._log())

