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
from collections.abc import Callable, Sequence

from tether.repair import caps
from tether.repair.kernel import (
    MIGRATABLE,
    REPAIR_OFF_NO_WP,
    REPAIR_ON,
    SOL_TCP,
    TCP_INFO,
    TCP_INFO_LEN,
    TCP_REPAIR,
    TcpState,
    silence,
    silenced,
    unsilence,
)
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
            apply(command, socks)
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


Setter = Callable[[socket.socket, int], None]


def _set_repair(s: socket.socket, value: int) -> None:
    s.setsockopt(SOL_TCP, TCP_REPAIR, value)


def apply(command: int, socks: Sequence[socket.socket], set_repair: Setter = _set_repair) -> None:
    """TCP_REPAIR `command` on every socket, or on none.

    The checks (_tcp_socket) leave only sockets the kernel accepts repair on,
    but it may still refuse one midway (its state changed since, a limit):
    then each socket already switched gets its previous mode back, off
    without a window probe so the peer sees nothing, and the request fails
    without a reply, which is how passt-repair's protocol reports failure.
    """
    before = [s.getsockopt(SOL_TCP, TCP_REPAIR) for s in socks]
    for i, s in enumerate(socks):
        try:
            set_repair(s, command)
        except OSError as e:
            undone = _put_back(socks[:i], before[:i], set_repair)
            raise HelperError(f"TCP_REPAIR {command} on socket {i + 1} of {len(socks)}: "
                              f"{e.strerror}; {undone}") from e
    _filter(command, socks)


def _filter(command: int, socks: Sequence[socket.socket]) -> None:
    """With repair on, every incoming segment dropped; with it off, none.

    A socket in repair mode still receives (and acknowledges) what arrives,
    which the dump would miss, so a migrating socket must also be silenced
    (repair/tcp.py, freeze).  Some kernels let only CAP_NET_ADMIN attach a
    socket filter; the back-end, which has none, then relies on this.  Best
    effort: a back-end that could attach its own filter already has.

    Only a connected socket needs it: repair on a fresh one is a target
    restoring a connection, whose segments should be taken, not dropped.
    Attaching a filter costs the kernel a program (about 13 us a socket,
    the most expensive step of a switch), so it is not done twice.
    """
    for s in socks:
        try:
            if command != REPAIR_ON:
                unsilence(s)
            elif not silenced(s) and _state(s) != TcpState.CLOSE:
                silence(s)
        except OSError:
            pass


def _state(s: socket.socket) -> int:
    return s.getsockopt(SOL_TCP, TCP_INFO, TCP_INFO_LEN)[0]


def _put_back(socks: Sequence[socket.socket], before: Sequence[int], set_repair: Setter) -> str:
    failed = 0
    for s, was in zip(socks, before, strict=True):
        try:
            set_repair(s, REPAIR_ON if was else REPAIR_OFF_NO_WP)
        except OSError:
            failed += 1
    if failed:
        return f"{failed} of the {len(socks)} already switched could not be put back"
    return f"the {len(socks)} already switched were put back"


# States TCP_REPAIR can be switched in, for a socket tether hands over: a
# fresh one (CLOSE, before a repair-mode connect) or a connected one.  A
# listening or half-open socket is refused by the kernel (EPERM) or has no
# state worth repairing.
REPAIRABLE = frozenset({TcpState.CLOSE, *MIGRATABLE})


_REPAIRABLE_STATES = frozenset(int(state) for state in REPAIRABLE)
_STATE_NAMES = {int(state): state.name for state in TcpState}


def _tcp_socket(fd: int) -> socket.socket:
    """A socket object for fd, if fd is a TCP socket; the caller detaches it.

    Per descriptor, the fewest system calls that prove it: SO_PROTOCOL says
    TCP (only an AF_INET/AF_INET6 stream socket has it), TCP_INFO gives the
    state.  A migration switches every connection three times, thousands at
    a time, so this is its inner loop.
    """
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    except OSError as e:
        raise ProtocolError(f"descriptor is not a socket ({e.strerror})") from e
    try:
        protocol = s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        domain = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        state = _state(s) if protocol == socket.IPPROTO_TCP else -1
    except OSError as e:
        s.detach()
        if e.errno == errno.ENOTSOCK:
            raise ProtocolError(f"descriptor is not a socket ({e.strerror})") from e
        raise ProtocolError(f"cannot read the socket's kind and state ({e.strerror})") from e
    if protocol != socket.IPPROTO_TCP or domain not in (socket.AF_INET, socket.AF_INET6):
        s.detach()
        raise ProtocolError(f"descriptor is a socket of family {domain} protocol {protocol}, "
                            "not TCP")
    if state not in _REPAIRABLE_STATES:  # LISTEN among them: a listener has no connection
        s.detach()
        raise ProtocolError(f"TCP socket in state {_STATE_NAMES.get(state, state)}: repair "
                            "mode needs a fresh or connected socket")
    return s


if __name__ == "__main__":
    sys.exit(main())
