"""Guest memory shared by the front-end, and the dirty-page log.

SET_MEM_TABLE hands us one fd per region (vhost-user.rst, "Memory regions");
we map each whole file range `[0, mmap_offset + size)` and translate:

    guest-physical  g in [gpa, gpa + size)  -> offset mmap_offset + (g - gpa)
    front-end VA    a in [qva, qva + size)  -> offset mmap_offset + (a - qva)

Every address and length here comes from the guest or the front-end, so
every translation is bounds-checked and a failure raises `GuestMemoryError`
(a value the caller counts and drops, never an IndexError from deep inside).

Memory that shrinks under a mapping raises SIGBUS at the next access, which
no Python code can survive.  So each fd must be a regular file (a memfd is
one) holding the whole region, and is pinned against shrinking first
(`fds.pin_size`: QEMU's memfd backends arrive sealed with F_SEAL_SHRINK; an
unsealed memfd that allows sealing gets the seal from us).  A file that
cannot be sealed (QEMU's memory-backend-file, a memfd with seal=off) is the
front-end's promise alone: mapped when `allow_unpinned`, the default, since
QEMU needs its own RAM file intact as much as we do; refused otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections.abc import Sequence
from typing import Final

from ... import ratelimit
from .fds import FdKindError, check_mappable, pin_size
from .protocol import MemRegion, ProtocolError

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 4096  # VHOST_LOG_PAGE: one log bit per 4 KiB guest-physical page


_NO_VIEW: Final = memoryview(b"")


class GuestMemoryError(Exception):
    """A guest or front-end supplied address/length does not fit guest memory."""


class _Mapped:
    __slots__ = ("end", "gpa", "map", "qva", "qva_end", "size", "start", "view")

    def __init__(self, region: MemRegion, fd: int) -> None:
        self.gpa = region.gpa
        self.size = region.size
        self.end = region.gpa + region.size
        self.qva = region.qva
        self.qva_end = region.qva + region.size
        self.start = region.mmap_offset
        self.map = mmap.mmap(
            fd, region.mmap_offset + region.size, mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
        )
        self.view = memoryview(self.map)


class MemoryTable:
    """Mapped regions; `view` is one memoryview per region, `offset` into it."""

    def __init__(self, regions: Sequence[MemRegion], fds: Sequence[int],
                 allow_unpinned: bool = True) -> None:
        """Map every region; the fds are always closed (mapping keeps the memory)."""
        self._regions: list[_Mapped] = []
        self.unpinned = 0  # regions whose file could still shrink (see module doc)
        try:
            for region in regions:
                if region.size == 0 or region.size % PAGE_SIZE:
                    raise ProtocolError(f"memory region size {region.size:#x} is not pages")
                for value in (region.gpa + region.size, region.qva + region.size,
                              region.mmap_offset + region.size):
                    if value >= 1 << 64:
                        raise ProtocolError(f"memory region {region} wraps the address space")
                for other in self._regions:
                    if region.gpa < other.end and other.gpa < region.gpa + region.size:
                        raise ProtocolError(f"memory region {region} overlaps another")
            for region, fd in zip(regions, fds, strict=True):
                if not pin_size(fd):
                    if not allow_unpinned:
                        raise ProtocolError(f"memory region {region}: its file is not "
                                            "sealed against shrinking and cannot be sealed")
                    self.unpinned += 1
                try:
                    check_mappable(fd, "memory region", region.mmap_offset + region.size)
                except (FdKindError, OSError) as e:
                    raise ProtocolError(f"memory region {region}: {e}") from e
                try:
                    self._regions.append(_Mapped(region, fd))
                except (OSError, ValueError, OverflowError) as bad_map:
                    raise ProtocolError(
                        f"cannot map memory region {region}: {bad_map}") from bad_map
        except BaseException:
            self.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._last: _Mapped | None = None
        self.span: tuple[int, int, memoryview, int] = (1, 0, _NO_VIEW, 0)
        if self._regions:
            self._use(self._regions[0])
        if self.unpinned:
            ratelimit.limited(log, logging.WARNING,
                              "%d memory region(s) in files that cannot be sealed: a "
                              "front-end that shrinks them ends this process (SIGBUS)",
                              self.unpinned)

    @property
    def regions(self) -> list[tuple[int, int]]:
        """(gpa, size) of every region, for the log size and for tests."""
        return [(r.gpa, r.size) for r in self._regions]

    def gpa(self, gpa: int, length: int) -> tuple[memoryview, int]:
        """Translate a guest-physical range that must lie inside one region."""
        last = self._last
        if last is not None and last.gpa <= gpa and gpa + length <= last.end:
            return last.view, last.start + gpa - last.gpa
        for r in self._regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                self._use(r)
                return r.view, r.start + gpa - r.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest memory")

    def _use(self, r: _Mapped) -> None:
        """Make r the region gpa() tries first, and `span`'s."""
        self._last = r
        # (start, end, view, shift): for loops that translate each buffer
        # inline, without a call: g in [start, end) is at view offset
        # g + shift; anything else goes through gpa(), which checks it
        # against every region (and raises).  Empty while there is none.
        self.span = (r.gpa, r.end, r.view, r.start - r.gpa)

    def qva(self, qva: int, length: int) -> tuple[memoryview, int]:
        """Translate a front-end virtual range (ring addresses) inside one region."""
        for r in self._regions:
            if r.qva <= qva and qva + length <= r.qva_end:
                return r.view, r.start + qva - r.qva
        raise GuestMemoryError(f"front-end range {qva:#x}+{length:#x} is outside guest memory")

    def close(self) -> None:
        for r in self._regions:
            r.view.release()
            # If a slice of the view is still alive somewhere, the mapping
            # goes when that reference does.
            with contextlib.suppress(BufferError):
                r.map.close()
        self._regions = []
        self._last = None
        self.span = (1, 0, _NO_VIEW, 0)


class DirtyLog:
    """The shared dirty bitmap of SET_LOG_BASE (vhost-user.rst, "Migration").

    One bit per 4 KiB guest-physical page, bit p at byte p // 8.  QEMU harvests
    with an atomic fetch-and-clear of 64-bit words while we set bits.  We are
    the only writer that sets bits and x86 byte stores are atomic, so a plain
    read-modify-write of one byte can at worst re-set a bit QEMU just cleared
    (one page resent), never lose one of ours.
    """

    def __init__(self, fd: int, size: int, offset: int, allow_unpinned: bool = True) -> None:
        try:
            if size == 0 or size > 1 << 40:
                raise ProtocolError(f"log size {size:#x} is out of range")
            if not pin_size(fd) and not allow_unpinned:
                raise ProtocolError("dirty log file is not sealed against shrinking")
            try:
                check_mappable(fd, "dirty log", offset + size)
            except (FdKindError, OSError) as e:
                raise ProtocolError(str(e)) from e
            try:
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            except (OSError, ValueError, OverflowError) as bad_map:
                raise ProtocolError(
                    f"cannot map dirty log ({size:#x}@{offset:#x}): {bad_map}") from bad_map
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self.pages = size * 8
        self.out_of_range = 0  # log writes beyond the bitmap: counted, not fatal
        self.marked = 0  # pages marked (with repeats), for statistics

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page touched by [gpa, gpa + length)."""
        if length <= 0:
            return
        first = gpa // PAGE_SIZE
        last = (gpa + length - 1) // PAGE_SIZE
        if last >= self.pages:
            self.out_of_range += 1
            last = self.pages - 1
        view = self._view
        self.marked += last - first + 1
        page = first
        while page <= last:
            byte = page >> 3
            view[byte] |= 1 << (page & 7)
            page += 1

    def close(self) -> None:
        self._view.release()
        self._map.close()
