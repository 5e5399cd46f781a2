"""Split virtqueues in guest memory (virtio spec 1.2 §2.7 "Split Virtqueues").

Layouts, all little-endian (VERSION_1):

    descriptor table  num x {le64 addr (GPA); le32 len; le16 flags; le16 next}   §2.7.5
    avail ring        le16 flags; le16 idx; le16 ring[num]; (le16 used_event)    §2.7.6
    used ring         le16 flags; le16 idx; {le32 id; le32 len}[num]; (le16 avail_event)  §2.7.8

Everything the guest wrote is hostile: heads, next links, lengths, indirect
tables, the avail index.  A malformed chain is dropped and counted
(`VirtQueue.bad_chains`); a nonsensical avail index marks the ring broken
until the front-end configures it again.  Nothing here raises on bad guest
data except `GuestMemoryError`/`ChainError`, which the methods catch.

Ordering on the device side (§2.7.13 "Supplying Buffers to The Device" and
vhost-user.rst "Migration"): buffer data is written and its pages logged,
then used elements are written and logged, then `used->idx` is published
(and logged), then the guest is notified.

The guest reads used->flags and used->idx while we write them, so each is
written with one 16-bit store, through a native-order `H` view of the two
words (`_RingCells.used_words`; why, at `publish`).

Notification suppression (§2.7.7, §2.7.10 without EVENT_IDX): the guest's
NO_INTERRUPT flag is honoured, and our NO_NOTIFY flag asks for kicks only
while the device has nothing to do: a ring it is draining, or a receive
ring with room to spare, stays quiet.  A kick is a vCPU exit (under TCG a
costly one) and a wake-up of tether; the kernel's vhost suppresses them the
same way.  EVENT_IDX is not offered: measured, it saved no tether CPU here.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
from typing import Final

from ...ratelimit import limited
from ...wire import virtio_net
from .memory import DirtyLog, GuestMemoryError, MemoryTable

log = logging.getLogger(__name__)

DESC: Final = struct.Struct("<QIHH")
DESC_SIZE: Final = 16
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1
U16: Final = struct.Struct("<H")
USED_ELEM: Final = struct.Struct("<II")  # id, len
USED_LEN: Final = struct.Struct("<I")

MAX_QUEUE_SIZE: Final = 32768  # split rings: a power of two up to 32768 (§2.7)
MAX_CHAIN_BYTES: Final = 16 << 20  # no sane net buffer is larger; bounds work per chain
# Buffers one claim() looks at, at most: more than 8 frames of 64 KiB in
# 4 KiB buffers take, and a bound on the heads it reads from a large ring.
CLAIM_BUFFERS: Final = 512
HEADS_CHUNK: Final = 32  # heads claim() reads from the avail ring at a time
MAX_INDIRECT: Final = 1024  # entries in one indirect table (Linux never exceeds MAX_SKB_FRAGS+2)

if sys.byteorder != "little":
    # _RingCells stores virtio's little-endian u16s in native order.
    raise ImportError("tether's virtqueues need a little-endian host")

# One segment of a chain: (view, offset into view, length, guest-physical address)
Segment = tuple[memoryview, int, int, int]


_FENCE_LOCK: Final = threading.Lock()


def full_fence() -> None:
    """A full memory barrier from pure Python.

    CPython's lock is a POSIX semaphore; glibc takes and gives it with
    LOCK-prefixed compare-exchange, which orders every earlier load and store
    before every later one on x86 (Intel SDM vol. 3 §9.2.2).
    """
    _FENCE_LOCK.acquire()
    _FENCE_LOCK.release()


def _copy(view: memoryview, dst: int, frame: memoryview, src: int, n: int,  # noqa: PLR0917
          dirty: DirtyLog | None, gpa: int) -> None:
    """frame[src:src + n] into guest memory at view[dst:], logged after the write."""
    view[dst:dst + n] = frame[src:src + n]
    if dirty is not None:
        dirty.mark(gpa, n)


class ChainError(Exception):
    """A descriptor chain that breaks the rules of §2.7.5 / §2.7.5.3."""


class _RxScratch:
    """What scatter() and claim() keep between buffers, kept off VirtQueue
    (see the note on its attributes)."""

    def __init__(self) -> None:
        # scatter(), for a buffer that is not one plain descriptor:
        self.segs: list[Segment] = []
        # Where the header goes when the first buffer does not hold it whole:
        # (view, offset, guest address, header bytes before, bytes there)
        self.header_spans: list[tuple[memoryview, int, int, int, int]] = []
        # claim(): per claimed frame, the index (from `base`) of its first
        # buffer, and one past the last frame's; its payload, the total and
        # largest size of its buffers; where its headers go.
        self.starts: list[int] = []
        self.payloads: list[int] = []
        self.capacities: list[int] = []
        self.largest: list[int] = []
        self.first_views: list[memoryview] = []
        self.first_offs: list[int] = []
        # The claimed frame commit_claimed() takes next; -1: no claim stands
        # (scatter() or a new ring took the buffers it planned).
        self.next_frame = -1
        self.base = 0  # last_avail when the claim was made
        self.headroom = 0  # the header bytes of every claimed frame, after ours

    def clear_claim(self) -> None:
        for kept in (self.starts, self.payloads, self.capacities, self.largest,
                     self.first_offs):
            kept.clear()
        self.first_views.clear()
        self.next_frame = -1


class _RingCells:
    """The rings as arrays of native little-endian cells (see `used_words`).

    Indexing one is a single C-level load or store, where struct's
    unpack_from/pack_into is a call that builds a tuple: scatter() reads an
    avail entry and a descriptor and writes a used element per 4 KiB
    buffer, 17 buffers per 64 KiB frame.  With these cells, the inline
    translation (MemoryTable.span) and one copy per run of adjacent buffers,
    bench_vhost's rx 65534 B fell to 0.67x its CPU per GB (0.258 vs 0.384
    CPU-s/GB, medians of 3 alternating runs).  walk() stays on struct: read
    through these cells, a 17-descriptor chain took no less (best of 15
    timings, 6.4 vs 6.8 us, within the noise), so the struct code, which
    also reads indirect tables, kept it.
    """

    __slots__ = ("avail", "desc", "used", "used_words")

    def __init__(self, desc: memoryview, avail: memoryview, used: memoryview,
                 num: int) -> None:
        # used->flags and used->idx: [0] flags, [1] idx, each one 16-bit store.
        self.used_words = used[:4].cast("H")
        self.avail = avail[4:4 + 2 * num].cast("H")  # avail->ring[]: heads
        self.desc = desc[:DESC_SIZE * num].cast("Q")  # [2i] addr, [2i+1] len | flags | next
        # used->ring[]: element i as one u64, id | len << 32 (both le32): one
        # store per element, where two cost twice the boxing in mypyc's code.
        self.used = used[4:4 + 8 * num].cast("Q")

    def release(self) -> None:
        for view in (self.used_words, self.avail, self.desc, self.used):
            view.release()


class VirtQueue:
    """One split virtqueue, as the device sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.last_avail = 0  # next avail ring slot to consume (free-running u16)
        self.used_idx = 0  # shadow of used->idx (free-running u16)
        self.desc_qva = self.avail_qva = self.used_qva = 0
        self.log_gpa = 0  # used ring's guest-physical address, for the log
        self.log_used = False  # VHOST_VRING_F_LOG: log used-ring writes
        self.addr_set = False
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.started = False
        self.enabled = False
        self.broken = False
        self.bad_chains = 0  # chains dropped as malformed
        self._desc_view: memoryview | None = None
        self._desc_off = 0
        self._avail_view: memoryview | None = None
        self._avail_off = 0
        self._used_view: memoryview | None = None
        self._used_off = 0
        # The rings as native cells: used->flags and used->idx, and what
        # scatter() indexes per buffer.
        self._cells: _RingCells | None = None
        self._pending_used = False  # used elements written, idx not yet published
        # scatter()'s total and largest size of the buffers it used
        self.scatter_capacity = 0
        self.scatter_largest = 0
        self._rx = _RxScratch()
        # Add attributes sparingly: CPython keeps a class's instance attributes
        # in one shared key table, with the fastest loads, only up to about 30
        # names; with 30 here every self.x got slower, and TX cost 10 % more
        # per frame (bench_vhost tx 1514 B: 1.40 vs 1.27 us).  29 now.
        self.kicks_wanted = False  # what we last told the guest (NO_NOTIFY clear)
        self.avail_seen = 0  # the avail index at our last look (available())

    # -- configuration ----------------------------------------------------

    def map_rings(self, memory: MemoryTable) -> None:
        """Translate ring addresses; raises GuestMemoryError if they do not fit."""
        self.unmap_rings()
        if not self.addr_set or self.num == 0:
            return
        num = self.num
        for qva, align in ((self.desc_qva, 16), (self.avail_qva, 2), (self.used_qva, 4)):
            if qva % align:
                raise GuestMemoryError(f"ring address {qva:#x} is not {align}-byte aligned")
        self._desc_view, self._desc_off = memory.qva(self.desc_qva, DESC_SIZE * num)
        self._avail_view, self._avail_off = memory.qva(self.avail_qva, 6 + 2 * num)
        self._used_view, self._used_off = memory.qva(self.used_qva, 6 + 8 * num)
        self._cells = _RingCells(
            self._desc_view[self._desc_off:self._desc_off + DESC_SIZE * num],
            self._avail_view[self._avail_off:self._avail_off + 6 + 2 * num],
            self._used_view[self._used_off:self._used_off + 6 + 8 * num], num)
        self.broken = False
        # Unknown: the ring may say NO_NOTIFY (a source that migrated it, a
        # previous connection); False makes the next want_kicks() write.
        self.kicks_wanted = False

    def unmap_rings(self) -> None:
        self._rx.clear_claim()  # its views are into the memory being let go
        if self._cells is not None:
            self._cells.release()
        self._desc_view = self._avail_view = self._used_view = self._cells = None

    def read_used_idx(self) -> None:
        """Take the used index from guest memory (it is not migrated by the front-end)."""
        if self._used_view is not None:
            self.used_idx = U16.unpack_from(self._used_view, self._used_off + 2)[0]

    @property
    def ready(self) -> bool:
        return self.started and self._used_view is not None and not self.broken

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd is not None:
                os.close(fd)
        self.kick_fd = self.call_fd = None

    # -- the avail side -----------------------------------------------------

    def available(self) -> int:
        """How many heads the guest has made available (0 if the ring is broken)."""
        if not self.ready:
            return 0
        assert self._avail_view is not None
        idx: int = U16.unpack_from(self._avail_view, self._avail_off + 2)[0]
        self.avail_seen = idx
        count = (idx - self.last_avail) & 0xFFFF
        if count > self.num:
            self.broken = True
            self.bad_chains += 1
            limited(log, logging.ERROR,
                    "queue %d: avail idx %d is %d ahead of %d (size %d): ring stopped",
                    self.index, idx, count, self.last_avail, self.num)
            return 0
        return count

    def pop(self) -> int:
        """Consume the next avail slot; the caller checked `available()`."""
        assert self._avail_view is not None
        slot = self.last_avail % self.num
        head: int = U16.unpack_from(self._avail_view, self._avail_off + 4 + 2 * slot)[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def head_at(self, position: int) -> int:
        """The head the guest put at free-running avail position `position`."""
        assert self._avail_view is not None
        slot = position % self.num
        head: int = U16.unpack_from(self._avail_view, self._avail_off + 4 + 2 * slot)[0]
        return head

    def walk(self, head: int, memory: MemoryTable, out: list[Segment],
             writable: bool) -> int:
        """Append the chain's segments to `out`; return its total length.

        `writable` says which kind the caller wants (RX: device-writable only;
        TX: device-readable only).  Raises ChainError or GuestMemoryError.
        """
        assert self._desc_view is not None
        num = self.num
        if head >= num:
            raise ChainError(f"head {head} >= queue size {num}")
        table, table_off, table_len = self._desc_view, self._desc_off, num
        index = head
        seen = 0
        total: int = 0
        indirect = False
        while True:
            seen += 1
            if seen > table_len:
                raise ChainError(f"chain from head {head} loops or exceeds {table_len}")
            addr: int
            length: int
            flags: int
            nxt: int
            addr, length, flags, nxt = DESC.unpack_from(table, table_off + DESC_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if indirect or flags & DESC_F_NEXT or seen != 1:
                    raise ChainError(f"misplaced indirect descriptor in chain {head}")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise ChainError(f"indirect table length {length} is invalid")
                table, table_off = memory.gpa(addr, length)
                table_len = length // DESC_SIZE
                indirect = True
                index = 0
                seen = 0
                continue
            if length == 0:
                raise ChainError(f"zero-length descriptor in chain {head}")
            is_write = bool(flags & DESC_F_WRITE)
            if is_write != writable:
                raise ChainError(
                    f"chain {head}: {'writable' if is_write else 'readable'} descriptor "
                    f"on a {'receive' if writable else 'transmit'} queue"
                )
            total += length
            if total > MAX_CHAIN_BYTES:
                raise ChainError(f"chain {head} is longer than {MAX_CHAIN_BYTES} bytes")
            view, off = memory.gpa(addr, length)
            out.append((view, off, length, addr))
            if not flags & DESC_F_NEXT:
                return total
            if nxt >= table_len:
                raise ChainError(f"chain {head}: next {nxt} >= table size {table_len}")
            index = nxt

    def scatter(self, memory: MemoryTable, header: memoryview, frame: memoryview,
                max_buffers: int, dirty: DirtyLog | None) -> int:
        """Write header + frame across the next receive buffers, in one pass.

        The one way frames reach a receive ring.  Each buffer is either a
        single device-writable descriptor, the way Linux posts them (64 KiB
        frames take 17 merged 4 KiB buffers, so per-buffer work is what RX
        costs), handled inline; or anything else, walked as a chain.  Used
        elements are written as it goes, beyond used->idx where the guest
        does not look until `publish`.  The header is written last, once
        num_buffers is known: `header` is the caller's virtio-net header
        (wire/virtio_net.py), whose num_buffers this sets if it has one.

        Returns how many buffers it used (`scatter_capacity` and
        `scatter_largest` then hold their total and largest size); 0 if the
        available buffers (at most max_buffers) are too small, and nothing
        is consumed; -1 if one of them is malformed: it is dropped and
        counted, and it and those taken before it go back unused (length 0),
        so that no head is used twice.
        """
        cells = self._cells
        assert cells is not None and self._avail_view is not None
        self._rx.next_frame = -1  # buffers a claim planned may go to this frame
        avail, desc, used = cells.avail, cells.desc, cells.used
        mask = self.num - 1  # a power of two (SET_VRING_NUM)
        position, used_idx = self.last_avail, self.used_idx
        idx: int = U16.unpack_from(self._avail_view, self._avail_off + 2)[0]
        self.avail_seen = idx
        count = (idx - position) & 0xFFFF
        if count > mask + 1:
            count = self.available()  # broken: marks and logs it, and says 0
        count = min(count, max_buffers)
        hdr_len = len(header)
        need = hdr_len + len(frame)
        taken = pos = capacity = largest = 0
        # Guest-physical [lo, hi) is `region` at offset + shift: translated
        # inline, every buffer checked against it; anything else via gpa().
        lo, hi, region, shift = memory.span
        # The first buffer, when it is one descriptor that holds the whole
        # header; else the header's place is in _rx.header_spans.
        first_view: memoryview | None = None
        first_off = first_addr = 0
        # The copy not yet made: frame[run_src:run_src + run_len] to
        # run_view[run_dst:], guest address run_gpa.  Linux carves its
        # receive buffers one after another out of 32 KiB pages, so most of
        # a frame is one run: one slice copy (and one log mark) for several
        # buffers instead of one each.
        run_view: memoryview | None = None
        run_dst = run_src = run_len = run_gpa = 0
        while pos < need:
            if taken == count:
                return 0
            head = avail[position & mask]
            off = -1
            length = addr = 0
            if head <= mask:
                word = desc[2 * head + 1]  # le32 len, le16 flags, le16 next
                length = word & 0xFFFFFFFF
                if word >> 32 & 0xFFFF == DESC_F_WRITE and 0 < length <= MAX_CHAIN_BYTES and (
                        pos >= hdr_len if taken else length >= hdr_len):
                    addr = desc[2 * head]
                    if lo <= addr and addr + length <= hi:
                        off = addr + shift
                    else:
                        try:
                            memory.gpa(addr, length)  # another region: it becomes the last
                        except GuestMemoryError:
                            pass  # walk() below says what is wrong
                        else:
                            lo, hi, region, shift = memory.span
                            off = addr + shift
            if off < 0:
                # A chain, a header split over buffers, or a malformed buffer.
                segs = self._rx.segs
                segs.clear()
                if not taken:
                    self._rx.header_spans.clear()
                try:
                    length = self.walk(head, memory, segs, writable=True)
                except (ChainError, GuestMemoryError) as e:
                    self.bad_chains += 1
                    limited(log, logging.WARNING, "queue %d: dropped chain: %s", self.index, e)
                    self._return_unused(head, taken, dirty)
                    self.scatter_largest = largest
                    return -1
                n = self._fill_chain(segs, hdr_len, frame, pos, need, dirty)
            else:
                n = need - pos
                if n > length:  # noqa: PLR1730 (min() is a call, per buffer)
                    n = length
                if not taken:
                    first_view, first_off, first_addr = region, off, addr
                    run_view, run_dst, run_src, run_len, run_gpa = (
                        region, off + hdr_len, 0, n - hdr_len, addr + hdr_len)
                elif region is run_view and off == run_dst + run_len:
                    run_len += n
                else:
                    if run_view is not None:
                        _copy(run_view, run_dst, frame, run_src, run_len, dirty, run_gpa)
                    run_view, run_dst, run_src, run_len, run_gpa = (
                        region, off, pos - hdr_len, n, addr)
            slot = used_idx & mask
            used[slot] = head | n << 32
            if dirty is not None and self.log_used:
                dirty.mark(self.log_gpa + 4 + 8 * slot, 8)
            used_idx = (used_idx + 1) & 0xFFFF
            position = (position + 1) & 0xFFFF
            pos += n
            taken += 1
            capacity += length
            if length > largest:  # noqa: PLR1730 (max() is a call, per buffer)
                largest = length
        if run_view is not None:  # the last run, inline: a frame of one buffer has only it
            run_view[run_dst:run_dst + run_len] = frame[run_src:run_src + run_len]
            if dirty is not None:
                dirty.mark(run_gpa, run_len)
        if hdr_len == virtio_net.HDR_LEN_NUM_BUFFERS:
            virtio_net.NUM_BUFFERS.pack_into(header, virtio_net.NUM_BUFFERS_OFFSET, taken)
        # The buffers that hold the header are logged after its write.
        if first_view is not None:
            first_view[first_off:first_off + hdr_len] = header
            if dirty is not None:
                dirty.mark(first_addr, hdr_len)
        else:
            for view, off, addr, start, n in self._rx.header_spans:
                k = min(hdr_len - start, n)
                view[off:off + k] = header[start:start + k]
                if dirty is not None:
                    dirty.mark(addr, n)
        self.scatter_capacity, self.scatter_largest = capacity, largest
        self.last_avail, self.used_idx = position, used_idx
        self._pending_used = True
        return taken

    def _fill_chain(self, segs: list[Segment], hdr_len: int, frame: memoryview,  # noqa: PLR0917
                    pos: int, need: int, dirty: DirtyLog | None) -> int:
        """scatter()'s copy into a walked chain: bytes pos.. of header + frame,
        up to need; returns how many.  Header bytes are left to scatter, which
        writes them last: the segments that hold them go to header_spans."""
        start = pos
        for view, off, length, addr in segs:
            if pos >= need:
                break
            n = min(length, need - pos)
            stop = pos + n
            if pos < hdr_len:
                if stop > hdr_len:
                    k = hdr_len - pos
                    view[off + k:off + n] = frame[:stop - hdr_len]
                self._rx.header_spans.append((view, off, addr, pos, n))
            else:
                view[off:off + n] = frame[pos - hdr_len:stop - hdr_len]
                if dirty is not None:
                    dirty.mark(addr, n)
            pos = stop
        return pos - start

    def _return_unused(self, bad: int, taken: int, dirty: DirtyLog | None) -> None:
        """The end of a scatter() that met a malformed chain `bad` after `taken`
        good ones: all of them used with length 0, the good ones' elements
        (written beyond used->idx) rewritten so."""
        assert self._used_view is not None
        for i in range(taken):
            offset = 4 + 8 * ((self.used_idx + i) % self.num)
            USED_LEN.pack_into(self._used_view, self._used_off + offset + 4, 0)
            if dirty is not None and self.log_used:
                dirty.mark(self.log_gpa + offset, 8)
        self.last_avail = (self.last_avail + taken + 1) & 0xFFFF
        self.used_idx = (self.used_idx + taken) & 0xFFFF
        self.push_used(bad, 0, dirty)

    # -- receiving in place ---------------------------------------------------

    def claim(self, memory: MemoryTable, hdr_len: int, headroom: int,  # noqa: PLR0917
              payload_max: int, total: int, max_frames: int, max_buffers: int,
              views: list[memoryview]) -> int:
        """Plan up to `max_frames` frames in the next receive buffers, so that
        a socket can receive their payloads straight into guest memory.

        Each frame is `hdr_len` (the virtio-net header) + `headroom` (its
        Ethernet, IP and TCP headers) + up to `payload_max` payload bytes,
        over at most `max_buffers` buffers, the first of which holds both
        headers whole; `total` bounds the payload of all of them.  Appends
        to `views` where the payloads go, in order (buffers adjacent in
        guest memory share one view, as Linux carves them one after another
        out of a page), and returns how many payload bytes they hold (0: not
        one frame fits).  Only single device-writable descriptors are
        claimed (how Linux posts receive buffers); planning stops before
        anything else, which scatter() handles, malformed buffers included.

        Nothing is consumed: commit_claimed() uses the frames in order, and
        what it does not take stays available, as it was.  The used
        elements of full frames are written here, once per buffer, beyond
        used->idx where the guest does not look (as scatter() does): a
        committed full frame then costs no second pass over its buffers.
        """
        rx = self._rx
        rx.clear_claim()
        rx.headroom = headroom
        rx.base = self.last_avail
        count = self.available()
        cells = self._cells
        if count == 0 or cells is None:
            return 0
        desc, used = cells.desc, cells.used
        mask = self.num - 1
        position, used_idx = self.last_avail, self.used_idx
        lo, hi, region, shift = memory.span
        first = hdr_len + headroom
        # The heads, read from the avail ring in one slice per wrap: a list
        # index is much cheaper in compiled code than a memoryview's.
        count = min(count, CLAIM_BUFFERS)
        heads = self._heads(position, min(count, HEADS_CHUNK))
        taken = claimed = frames = 0
        while frames < max_frames and claimed < total:
            want = total - claimed
            if want > payload_max:  # noqa: PLR1730 (min() is a call, per frame)
                want = payload_max
            need = first + want
            start = taken
            kept = len(views)
            pos = capacity = largest = 0
            # The view not yet appended: run_view[run_lo:run_hi]
            run_view = first_view = region
            run_lo = run_hi = first_off = 0
            while pos < need:
                if taken == count or taken - start == max_buffers:
                    break
                if taken == len(heads):
                    heads.extend(self._heads(position + taken,
                                             min(count - taken, HEADS_CHUNK)))
                head = heads[taken]
                if head > mask:
                    break
                word = desc[2 * head + 1]  # le32 len, le16 flags, le16 next
                length = word & 0xFFFFFFFF
                if word >> 32 & 0xFFFF != DESC_F_WRITE or not 0 < length <= MAX_CHAIN_BYTES:
                    break
                if pos == 0 and length <= first:
                    break
                addr = desc[2 * head]
                if not (lo <= addr and addr + length <= hi):
                    try:
                        memory.gpa(addr, length)
                    except GuestMemoryError:
                        break
                    lo, hi, region, shift = memory.span
                off = addr + shift
                n = need - pos
                if n > length:  # noqa: PLR1730
                    n = length
                if pos == 0:
                    first_view, first_off = region, off
                    run_view, run_lo, run_hi = region, off + first, off + n
                elif region is run_view and off == run_hi:
                    run_hi = off + n
                else:
                    views.append(run_view[run_lo:run_hi])
                    run_view, run_lo, run_hi = region, off, off + n
                used[(used_idx + taken) & mask] = head | n << 32
                capacity += length
                if length > largest:  # noqa: PLR1730
                    largest = length
                pos += n
                taken += 1
            if pos < need:  # this frame does not fit: forget its buffers
                del views[kept:]
                taken = start
                break
            views.append(run_view[run_lo:run_hi])
            rx.starts.append(start)
            rx.payloads.append(want)
            rx.capacities.append(capacity)
            rx.largest.append(largest)
            rx.first_views.append(first_view)
            rx.first_offs.append(first_off)
            claimed += want
            frames += 1
        rx.starts.append(taken)
        rx.next_frame = 0
        return claimed

    def _heads(self, position: int, count: int) -> list[int]:
        """The `count` heads the guest made available from `position` on."""
        cells = self._cells
        assert cells is not None
        start = position & (self.num - 1)
        end = start + count
        if end <= self.num:
            return cells.avail[start:end].tolist()
        heads: list[int] = cells.avail[start:].tolist()
        heads.extend(cells.avail[:end - self.num].tolist())
        return heads

    def commit_claimed(self, header: memoryview, headers: memoryview, payload_len: int,
                       dirty: DirtyLog | None) -> int:
        """Use the next claimed frame: its buffers hold `payload_len` payload
        bytes (received in place), `header` (the virtio-net header, whose
        num_buffers this sets) and `headers` are written in front of them,
        after the data and before used->idx, as in scatter().

        Frames go in claim order, and one that holds less than its claim
        must be the last (its unused buffers, and every later frame's, stay
        available).  Returns the buffers used (`scatter_capacity` and
        `scatter_largest` hold their total and largest size), 0 if no
        claimed frame is left, the ring moved, or the payload does not fit.
        """
        rx = self._rx
        k = rx.next_frame
        starts = rx.starts
        rx.next_frame = -1  # until this frame is used whole
        if not 0 <= k < len(starts) - 1 or len(headers) != rx.headroom:
            return 0
        start, end = starts[k], starts[k + 1]
        if start != (self.last_avail - rx.base) & 0xFFFF:
            return 0  # the ring moved since the claim: its buffers are not ours to use
        hdr_len = len(header)
        payload = rx.payloads[k]
        if payload_len > payload:
            return 0  # a caller's bug: more than the claim holds
        if payload_len == payload and dirty is None:
            taken = end - start  # claim() wrote its used elements
            self.scatter_capacity, self.scatter_largest = rx.capacities[k], rx.largest[k]
        else:
            taken = self._used_again(hdr_len + rx.headroom + payload_len, end - start, dirty)
            if taken == 0:
                return 0
        if hdr_len == virtio_net.HDR_LEN_NUM_BUFFERS:
            virtio_net.NUM_BUFFERS.pack_into(header, virtio_net.NUM_BUFFERS_OFFSET, taken)
        view, off = rx.first_views[k], rx.first_offs[k]
        view[off:off + hdr_len] = header
        view[off + hdr_len:off + hdr_len + len(headers)] = headers
        if dirty is not None:
            dirty.mark(self._first_gpa(), hdr_len + len(headers))
        self.last_avail = (self.last_avail + taken) & 0xFFFF
        self.used_idx = (self.used_idx + taken) & 0xFFFF
        self._pending_used = True
        if taken == end - start and payload_len == payload:
            rx.next_frame = k + 1  # else a partial frame: the last
        return taken

    def _used_again(self, need: int, most: int, dirty: DirtyLog | None) -> int:
        """commit_claimed()'s used elements for a frame of `need` bytes from
        last_avail (a partial one, or any while the dirty log is on, which
        wants each page written): the ring read again, not remembered from
        the claim.  A guest that rewrote buffers it gave the device only
        garbles its own data; every address written to was checked by
        claim().  Returns the buffers used, 0 if they no longer hold it."""
        cells = self._cells
        assert cells is not None
        avail, desc, used = cells.avail, cells.desc, cells.used
        mask = self.num - 1
        position, used_idx = self.last_avail, self.used_idx
        pos = capacity = largest = taken = 0
        while pos < need and taken < most:
            head = avail[position & mask]
            if head > mask:
                return 0
            word = desc[2 * head + 1]
            length = word & 0xFFFFFFFF
            if word >> 32 & 0xFFFF != DESC_F_WRITE or not 0 < length <= MAX_CHAIN_BYTES:
                return 0
            n = min(need - pos, length)
            slot = used_idx & mask
            used[slot] = head | n << 32
            if dirty is not None:
                dirty.mark(desc[2 * head], n)
                if self.log_used:
                    dirty.mark(self.log_gpa + 4 + 8 * slot, 8)
            capacity += length
            largest = max(largest, length)
            used_idx = (used_idx + 1) & 0xFFFF
            position = (position + 1) & 0xFFFF
            pos += n
            taken += 1
        if pos < need:
            return 0
        self.scatter_capacity, self.scatter_largest = capacity, largest
        return taken

    def _first_gpa(self) -> int:
        """The guest address of the buffer at last_avail (a single descriptor)."""
        cells = self._cells
        assert cells is not None
        head = cells.avail[self.last_avail & (self.num - 1)]
        return int(cells.desc[2 * head]) if head < self.num else 0

    # -- the used side --------------------------------------------------------

    def push_used(self, head: int, length: int, dirty: DirtyLog | None) -> None:
        """Write one used element (not yet visible: see `publish`)."""
        assert self._used_view is not None
        slot = self.used_idx % self.num
        offset = 4 + 8 * slot
        USED_ELEM.pack_into(self._used_view, self._used_off + offset, head, length)
        # Logged after the write (a harvest in between would clear the bit of a
        # page not yet written) and before publish() makes it visible.
        if dirty is not None and self.log_used:
            dirty.mark(self.log_gpa + offset, 8)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._pending_used = True

    def publish(self, dirty: DirtyLog | None) -> bool:
        """Make pushed elements visible; return whether the guest wants a notification."""
        cells = self._cells
        if not self._pending_used or cells is None:
            return False
        self._pending_used = False
        # x86 keeps stores in program order, so the elements written above are
        # visible before this index (the write barrier of §2.7.13.3).
        # One 16-bit store through the native `H` cell, never struct.pack_into:
        # pack_into clears its destination before it fills it in (CPython's
        # s_pack_internal starts with a memset), so a guest reading in between
        # saw used->idx 0 for a moment, took it for a new index and consumed
        # a stale slot ("output.0: id N is not a head!", then a soft lockup;
        # about once in 5-20 bulk runs of 10 s).  The guest reads used->flags
        # as live, so _set_used_flags stores the same way.  Used elements may
        # use struct: the guest does not read them until this index covers them.
        # (tests/vhost_user: test_the_guest_never_sees_used_idx_half_written)
        cells.used_words[1] = self.used_idx
        if dirty is not None and self.log_used:
            dirty.mark(self.log_gpa + 2, 2)
        # The guest clears NO_INTERRUPT, fences, then rereads used->idx; we
        # store used->idx, then read the flag.  x86 may let our load pass our
        # store, and both sides would miss each other (a stalled queue), so
        # a full fence goes between (§2.7.13.3.1, the device side of §2.7.10).
        full_fence()
        assert self._avail_view is not None
        flags = U16.unpack_from(self._avail_view, self._avail_off)[0]
        return not flags & AVAIL_F_NO_INTERRUPT

    # -- kick suppression -----------------------------------------------------

    def quiet_kicks(self, dirty: DirtyLog | None) -> None:
        """Tell the guest it need not kick (NO_NOTIFY): we will look at the ring anyway."""
        if not self.kicks_wanted or self._cells is None:
            return
        self.kicks_wanted = False
        self._set_used_flags(USED_F_NO_NOTIFY, dirty)

    def want_kicks(self, dirty: DirtyLog | None) -> bool:
        """Ask for a kick at the guest's next buffer; True if one came meanwhile.

        The caller goes idle on this ring after it; on True it must look at
        the ring again: the guest added a buffer after our last look
        (`available()`), maybe while it still saw NO_NOTIFY, so no kick
        will come for it.
        """
        if self._cells is None or self._avail_view is None or self.kicks_wanted:
            return False
        self.kicks_wanted = True
        self._set_used_flags(0, dirty)
        # Store our wish, then reread the index: the mirror of publish()'s
        # fence, against the guest's store-index-then-read-flag.
        full_fence()
        now: int = U16.unpack_from(self._avail_view, self._avail_off + 2)[0]
        return now != self.avail_seen

    def _set_used_flags(self, flags: int, dirty: DirtyLog | None) -> None:
        assert self._cells is not None
        self._cells.used_words[0] = flags
        if dirty is not None and self.log_used:
            dirty.mark(self.log_gpa, 2)

    def notify(self) -> None:
        if self.call_fd is not None:
            try:
                os.eventfd_write(self.call_fd, 1)
            except BlockingIOError:
                pass  # a saturated counter (or a full pipe): a notification is pending anyway
            except OSError as e:
                # A call fd that passed its check and still fails (a socket whose
                # peer went away): the guest misses interrupts, tether carries on.
                limited(log, logging.WARNING,
                                  "queue %d: notifying the guest failed: %s", self.index, e)

    def publish_and_notify(self, dirty: DirtyLog | None) -> None:
        if self.publish(dirty):
            self.notify()
