"""tether-repair: the privileged helper that switches TCP_REPAIR for tether.

tether runs without privileges and passes the sockets to freeze or thaw to
this helper over a UNIX socket (protocol in tether.repair.protocol).  The
helper needs CAP_NET_ADMIN and keeps nothing else once connected.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
import sys
import time
from collections.abc import Sequence

from tether.repair import caps
from tether.repair.kernel import SOL_TCP, TCP_REPAIR
from tether.repair.protocol import (
    ANCBUF_SIZE,
    ProtocolError,
    check_request,
    received_fds,
)

PROG = "tether-repair"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

USAGE = f"""usage: {PROG} PATH

Connect to tether's repair socket PATH (or, if PATH is a directory, wait for
a socket named *.repair to appear in it) and switch TCP_REPAIR on the sockets
tether sends.  Needs CAP_NET_ADMIN.  Exits 0 when tether closes the
connection, 1 on any error, 2 on a usage error.
"""

_CONNECT_RETRY_S = 5.0
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_IN_CLOEXEC = 0o2000000
_INOTIFY_EVENT = struct.Struct("=iIII")


class HelperError(Exception):
    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return EXIT_OK
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write(USAGE)
        return EXIT_USAGE
    try:
        return run(args[0])
    except HelperError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return e.status


def run(path: str) -> int:
    if not caps.has(caps.CAP_NET_ADMIN):
        raise HelperError(
            "needs CAP_NET_ADMIN to switch TCP_REPAIR on tether's sockets; "
            "run it as root or grant it the capability (refusing to start)"
        )
    try:
        caps.harden()
        # Reaching a socket owned by another user may need DAC override;
        # nothing after the connection does.
        caps.keep_only(
            {caps.CAP_NET_ADMIN, caps.CAP_DAC_OVERRIDE, caps.CAP_DAC_READ_SEARCH},
            bounding={caps.CAP_NET_ADMIN},
        )
        conn = connect(path)
        caps.keep_only({caps.CAP_NET_ADMIN})
    except OSError as e:
        raise HelperError(str(e)) from e
    with conn:
        return serve(conn)


def connect(path: str) -> socket.socket:
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise HelperError(f"{path}: {e.strerror}", EXIT_USAGE) from e
    if stat.S_ISDIR(mode):
        path = _wait_for_socket(path)
    elif not stat.S_ISSOCK(mode):
        raise HelperError(f"{path} is neither a socket nor a directory", EXIT_USAGE)
    deadline = time.monotonic() + _CONNECT_RETRY_S
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
            return s
        except ConnectionRefusedError:
            # The file appears at bind(), before listen(): give tether a moment.
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except BaseException:
            s.close()
            raise


def _wait_for_socket(directory: str) -> str:
    """Wait with inotify for a *.repair socket in directory (one already there counts)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if libc.inotify_add_watch(fd, os.fsencode(directory), _IN_CREATE | _IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")
        for name in sorted(os.listdir(directory)):
            found = _repair_socket(directory, name)
            if found:
                return found
        while True:
            buf = os.read(fd, 4096)
            pos = 0
            while pos + _INOTIFY_EVENT.size <= len(buf):
                _, _, _, length = _INOTIFY_EVENT.unpack_from(buf, pos)
                raw = buf[pos + _INOTIFY_EVENT.size : pos + _INOTIFY_EVENT.size + length]
                pos += _INOTIFY_EVENT.size + length
                found = _repair_socket(directory, os.fsdecode(raw.rstrip(b"\0")))
                if found:
                    return found
    finally:
        os.close(fd)


def _repair_socket(directory: str, name: str) -> str | None:
    if not name.endswith(".repair"):
        return None
    full = os.path.join(directory, name)
    try:
        return full if stat.S_ISSOCK(os.stat(full).st_mode) else None
    except FileNotFoundError:
        return None


def serve(conn: socket.socket) -> int:
    """Apply requests until tether hangs up; any bad request ends the helper."""
    while True:
        try:
            # Fresh buffers every call: the control buffer must never shrink
            # to the size of an earlier, smaller message.
            data, ancdata, flags, _ = conn.recvmsg(1, ANCBUF_SIZE)
        except ConnectionResetError:
            return EXIT_OK
        except OSError as e:
            raise HelperError(f"receiving a request: {e.strerror}") from e
        fds = received_fds(ancdata)
        socks: list[socket.socket] = []
        try:
            if not data and not ancdata:
                return EXIT_OK
            command, _ = check_request(data, ancdata, flags)
            # Check them all before touching any.
            for fd in fds:
                socks.append(_tcp_socket(fd))
            for s in socks:
                try:
                    s.setsockopt(SOL_TCP, TCP_REPAIR, command)
                except OSError as e:
                    raise HelperError(f"TCP_REPAIR {command} on a socket: {e.strerror}") from e
        except ProtocolError as e:
            raise HelperError(f"bad request: {e}") from e
        finally:
            for s in socks:
                s.detach()
            for fd in fds:
                os.close(fd)
        try:
            conn.sendall(data)
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET):
                return EXIT_OK
            raise HelperError(f"sending a reply: {e.strerror}") from e


def _tcp_socket(fd: int) -> socket.socket:
    """A socket object for fd, if fd is a TCP socket; the caller detaches it."""
    try:
        s = socket.socket(fileno=fd)
    except OSError as e:
        raise ProtocolError(f"descriptor is not a socket ({e.strerror})") from e
    ok = (
        s.family in (socket.AF_INET, socket.AF_INET6)
        and s.type == socket.SOCK_STREAM
        and s.proto == socket.IPPROTO_TCP
    )
    if not ok:
        s.detach()
        raise ProtocolError(f"descriptor is a socket of family {s.family} type {s.type}, not TCP")
    return s


if __name__ == "__main__":
    sys.exit(main())
