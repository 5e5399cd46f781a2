"""The repair helper protocol, shared by tether-repair and the back-end.

Wire-compatible with passt-repair (passt's repair.c / passt-repair.c):

- The back-end listens on a UNIX stream socket; the helper connects.
- Request, back-end to helper: one message whose data is a single signed
  byte, the TCP_REPAIR value to apply (1 on, 0 off, -1 off without window
  probe), with 1 to 253 (SCM_MAX_FD, include/net/scm.h) descriptors in one
  SCM_RIGHTS control message.
- Reply, helper to back-end: the same byte, once per request, after every
  descriptor of the request has been switched.
"""

from __future__ import annotations

import array
import socket
import struct

SCM_MAX_FD = 253
COMMANDS = (1, 0, -1)

_CMD = struct.Struct("b")
FD_SIZE = array.array("i").itemsize
# Room for the largest legal request plus one fd, so that an oversized one is
# seen whole (and its descriptors closed) instead of silently truncated.
ANCBUF_SIZE = socket.CMSG_SPACE((SCM_MAX_FD + 1) * FD_SIZE)


class ProtocolError(Exception):
    """A message that breaks the helper protocol."""


def encode_command(command: int) -> bytes:
    if command not in COMMANDS:
        raise ValueError(f"repair command {command} is not one of {COMMANDS}")
    return _CMD.pack(command)


def decode_command(data: bytes) -> int:
    if len(data) != 1:
        raise ProtocolError(f"command must be 1 byte, got {len(data)}")
    command = int(_CMD.unpack(data)[0])
    if command not in COMMANDS:
        raise ProtocolError(f"unknown command byte {data[0]:#04x}")
    return command


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data carrying fds, for sendmsg."""
    if not 1 <= len(fds) <= SCM_MAX_FD:
        raise ValueError(f"{len(fds)} descriptors in one message, need 1 to {SCM_MAX_FD}")
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every descriptor the kernel installed for us, whatever else is wrong,
    so that the caller can close them all."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % FD_SIZE
            fds.extend(array.array("i", data[:usable]))
    return fds


def check_request(
    data: bytes, ancdata: list[tuple[int, int, bytes]], msg_flags: int
) -> tuple[int, int]:
    """Validate one request; return (command, descriptor count)."""
    if msg_flags & socket.MSG_CTRUNC:
        raise ProtocolError("control data truncated: more descriptors than one request may carry")
    if msg_flags & socket.MSG_TRUNC:
        raise ProtocolError("request longer than 1 byte")
    command = decode_command(data)
    if len(ancdata) != 1:
        raise ProtocolError(f"expected one control message, got {len(ancdata)}")
    level, kind, payload = ancdata[0]
    if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
        raise ProtocolError(f"control message level {level} type {kind} is not SCM_RIGHTS")
    if len(payload) % FD_SIZE:
        raise ProtocolError(f"SCM_RIGHTS length {len(payload)} is not a whole number of fds")
    count = len(payload) // FD_SIZE
    if not 1 <= count <= SCM_MAX_FD:
        raise ProtocolError(f"{count} descriptors, expected 1 to {SCM_MAX_FD}")
    return command, count
