"""What a file descriptor from the front-end must be before the device uses it.

Every fd QEMU sends has one role, and each role needs one kind of file
(vhost-user.rst, "Message types"): an eventfd for kick, call and err, a pipe
for the device state, a shared-memory file for guest memory and the dirty
log.  A front-end may send anything instead: a regular file as a kick fd
makes epoll refuse it, a pipe's read end as a call fd fails at the first
notification, a blocking pipe nobody reads wedges the loop.  So each fd is
checked once, when it arrives, and made non-blocking; a wrong one raises
`FdKindError`, which the device turns into a refused request.
"""

from __future__ import annotations

import fcntl
import os
import stat

# fcntl(2) memfd seals (linux/fcntl.h); Python's fcntl has them from 3.9 on Linux.
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)


class FdKindError(Exception):
    """An fd of the wrong kind, or opened the wrong way, for its role."""


def describe(fd: int) -> str:
    """The kind of file behind fd, in words: eventfd, pipe, socket, regular file..."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        return f"unusable fd ({e.strerror})"
    if stat.S_ISFIFO(mode):
        return "pipe"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    try:
        # Anonymous inodes (eventfd, timerfd, epoll, signalfd...) have no file type.
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "unknown file"
    if target == "anon_inode:[eventfd]":
        return "eventfd"
    return target


def _access(fd: int) -> tuple[bool, bool]:
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return mode in (os.O_RDONLY, os.O_RDWR), mode in (os.O_WRONLY, os.O_RDWR)


def _require(fd: int, role: str, kinds: tuple[str, ...], read: bool, write: bool) -> None:
    kind = describe(fd)
    if kind not in kinds:
        raise FdKindError(f"{role} fd is a {kind}, expected {' or '.join(kinds)}")
    readable, writable = _access(fd)
    if (read and not readable) or (write and not writable):
        need = "read" if read and not readable else "write"
        raise FdKindError(f"{role} fd is a {kind} not open for {need}ing")
    os.set_blocking(fd, False)


NOTIFIERS = ("eventfd", "pipe", "socket")


def check_kick(fd: int) -> None:
    """A kick fd: the device waits for it to become readable (epoll)."""
    _require(fd, "kick", NOTIFIERS, read=True, write=False)


def check_call(fd: int, role: str = "call") -> None:
    """A call or err fd: the device writes an 8-byte count to it, never blocking."""
    _require(fd, role, NOTIFIERS, read=False, write=True)


def check_state(fd: int, *, saving: bool) -> None:
    """A device-state fd: a pipe or socket end we write (save) or read (load)."""
    _require(fd, "device-state", ("pipe", "socket"), read=not saving, write=saving)


def check_mappable(fd: int, role: str, end: int) -> None:
    """A shared-memory fd (memfd, tmpfs or hugetlbfs file) holding at least `end` bytes.

    mmap() beyond the end of a file "succeeds" and the first access raises
    SIGBUS, so the size is checked here rather than left to the mapping.
    """
    kind = describe(fd)
    if kind != "regular file":
        raise FdKindError(f"{role} fd is a {kind}, expected a memfd or a regular file")
    readable, writable = _access(fd)
    if not (readable and writable):
        raise FdKindError(f"{role} fd is not open for reading and writing")
    size = os.fstat(fd).st_size
    if size < end:
        raise FdKindError(f"{role} file holds {size:#x} bytes, the region needs {end:#x}")


def pin_size(fd: int) -> bool:
    """Make sure the file behind fd can no longer shrink; whether it can be made so.

    A memfd sealed with F_SEAL_SHRINK (QEMU's memory-backend-memfd seals its
    files by default) is safe; an unsealed memfd that still allows sealing
    gets the seal from us.  A plain file, or a memfd created without
    MFD_ALLOW_SEALING, cannot be pinned: False.
    """
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        return False  # not a shmem file: no seals at all
    if seals & F_SEAL_SHRINK:
        return True
    if seals & F_SEAL_SEAL:
        return False
    try:
        fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
    except OSError:
        return False
    return True
