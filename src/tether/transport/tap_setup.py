"""A tap device inside a network namespace, as pasta uses one.

The device is created from inside the target namespace (setns on this thread,
then back), so it lives there while tether's own sockets stay in the namespace
tether started in; tap.py then moves its frames.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_TUNSETVNETLE = 0x400454DC
_TUNSETOFFLOAD = 0x400454D0
# Offloads the guest's kernel may use towards tether: partial checksums and TCP
# segments up to 64 KiB whatever the MTU (tether terminates TCP, so it does not
# care how the guest cut its stream, and never checks L4 checksums).
_TUN_F_CSUM = 0x01
_TUN_F_TSO4 = 0x02
_TUN_F_TSO6 = 0x04
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_SIOCSIFMTU = 0x8922
_SIOCSIFHWADDR = 0x8924
_IFF_UP = 0x1
_CLONE_NEWNET = 0x40000000
_ARPHRD_ETHER = 1


class NamespaceError(OSError):
    """The namespace cannot be entered or the device cannot be made in it."""


def netns_path(name_or_path: str) -> str:
    """A path as is; a bare name as iproute2 keeps it (/run/netns/NAME)."""
    return name_or_path if "/" in name_or_path else f"/run/netns/{name_or_path}"


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(err, f"setns: {os.strerror(err)}")


@contextmanager
def inside(path: str) -> Iterator[None]:
    """Run the body with this thread in the network namespace at path."""
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(exc.errno, f"network namespace {path}: {exc.strerror}") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def _ifreq(name: str, fmt: str = "", *values: int | bytes) -> bytes:
    return struct.pack("16s" + fmt, name.encode(), *values).ljust(40, b"\0")


def _set_up(ctl: socket.socket, name: str) -> None:
    flags = struct.unpack_from("H", fcntl.ioctl(ctl, _SIOCGIFFLAGS, _ifreq(name)), 16)[0]
    fcntl.ioctl(ctl, _SIOCSIFFLAGS, _ifreq(name, "H", flags | _IFF_UP))


def create_tap(netns: str, name: str, mtu: int, mac: bytes | None = None,
               vnet_hdr: bool = True) -> int:
    """Create (or attach to) tap `name` in netns, set its MTU (and MAC), bring it up.

    Returns the non-blocking tap fd; raises NamespaceError / OSError with the reason.
    """
    if len(name.encode()) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    with inside(netns_path(netns)):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
            fcntl.ioctl(fd, _TUNSETIFF, _ifreq(name, "H", flags))
            if vnet_hdr:
                fcntl.ioctl(fd, _TUNSETVNETLE, struct.pack("i", 1))
                fcntl.ioctl(fd, _TUNSETOFFLOAD, _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                fcntl.ioctl(ctl, _SIOCSIFMTU, _ifreq(name, "i", mtu))
                if mac is not None:
                    fcntl.ioctl(ctl, _SIOCSIFHWADDR, _ifreq(name, "H6s", _ARPHRD_ETHER, mac))
                _set_up(ctl, name)
        except BaseException:
            os.close(fd)
            raise
    return fd


_SIOCSIFADDR = 0x8916
_SIOCSIFNETMASK = 0x891C
_SIOCADDRT = 0x890B
_RTF_UP = 0x1
_RTF_GATEWAY = 0x2
# struct rtentry on LP64 (linux/route.h): pad, dst, gateway, genmask, flags, pad,
# pad, pad, metric, dev pointer, mtu, window, irtt; 120 bytes.
_RTENTRY = struct.Struct("=Q16s16s16sHh4xQQh6xQQQH6x")


def _sockaddr_in(addr: bytes) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, addr)


def configure_ipv4(netns: str, name: str, addr: bytes, prefix: int, gateway: bytes) -> None:
    """Give the interface its address and a default route, as pasta's --config-net does.

    Plain ioctls (no netlink library), run from inside the namespace.
    """
    mask = (0xFFFFFFFF << (32 - prefix) & 0xFFFFFFFF).to_bytes(4, "big")
    with inside(netns_path(netns)), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
        _set_up(ctl, "lo")  # a fresh namespace's loopback starts down
        fcntl.ioctl(ctl, _SIOCSIFADDR, struct.pack("16s16s8x", name.encode(),
                                                   _sockaddr_in(addr)))
        fcntl.ioctl(ctl, _SIOCSIFNETMASK, struct.pack("16s16s8x", name.encode(),
                                                      _sockaddr_in(mask)))
        route = _RTENTRY.pack(0, _sockaddr_in(bytes(4)), _sockaddr_in(gateway),
                              _sockaddr_in(bytes(4)), _RTF_UP | _RTF_GATEWAY, 0, 0, 0, 0,
                              0, 0, 0, 0)
        with contextlib.suppress(FileExistsError):  # a default route exists: keep it
            fcntl.ioctl(ctl, _SIOCADDRT, route)
