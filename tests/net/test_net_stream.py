"""The stream transport (QEMU -netdev stream framing: 4-byte big-endian length + frame).

The guest is again a namespace's kernel: a small relay plays QEMU's part, moving
frames between a tap device in the namespace and tether's UNIX socket.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from tests.net.conftest import GATEWAY, GUEST, Netns, delete_netns, make_netns
from tests.net.hostside import TcpPeer, pattern
from tests.support import wait_for
from tether.transport.tap_setup import inside

MiB = 1 << 20


def open_plain_tap(ns: Netns) -> int:
    with inside(f"/run/netns/{ns.name}"):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"tap0", 0x0002 | 0x1000))
    ns.run("ip", "link", "set", "tap0", "mtu", "65520", "up")
    ns.run("ip", "addr", "add", f"{GUEST}/24", "dev", "tap0")
    ns.run("ip", "route", "add", "default", "via", GATEWAY)
    return fd


class Relay(threading.Thread):
    """What QEMU's -netdev stream does with a NIC: frames <-> length-prefixed stream."""

    def __init__(self, tap: int, path: str) -> None:
        super().__init__(daemon=True)
        self.tap = tap
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.stop = False

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.tap, selectors.EVENT_READ)
        sel.register(self.sock, selectors.EVENT_READ)
        buf = bytearray()
        while not self.stop:
            for key, _ in sel.select(0.2):
                if key.fileobj == self.tap:
                    frame = os.read(self.tap, 65550)
                    self.sock.sendall(struct.pack("!I", len(frame)) + frame)
                    continue
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    (n,) = struct.unpack_from("!I", buf)
                    if len(buf) < 4 + n:
                        break
                    os.write(self.tap, bytes(buf[4:4 + n]))
                    del buf[:4 + n]


@pytest.fixture
def stream_tether(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    path = str(tmp_path / "tether.sock")
    log = tmp_path / "tether.log"
    # --runas root: the socket lives in root's own test directory, which the nobody
    # tether would otherwise become cannot write.
    proc = subprocess.Popen([sys.executable, "-m", "tether.cli", "-f", "-l", str(log),
                             "--runas", "root", "--socket", path, "-a", GUEST, "-n", "24",
                             "-g", GATEWAY], text=True)
    wait_for(lambda: log.exists() and "running" in log.read_text(), 10, "tether to start")
    yield proc, path, log
    proc.terminate()
    proc.wait(10)
    assert "Traceback" not in log.read_text()


@pytest.mark.root
def test_namespace_kernel_over_stream_transport(
        stream_tether: tuple[subprocess.Popen[str], str, Path]) -> None:
    _, path, _ = stream_tether
    ns = make_netns("tstr")
    try:
        relay = Relay(open_plain_tap(ns), path)
        relay.start()
        peer = TcpPeer("transfer", send=4 * MiB)
        ns.guest_tool("tcp-client", GATEWAY, str(peer.port), str(4 * MiB), str(4 * MiB))
        assert peer.done.wait(30) and peer.received == [pattern(4 * MiB)]
        relay.stop = True
    finally:
        delete_netns(ns)


def _framed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


def test_bad_length_drops_that_client_only(
        stream_tether: tuple[subprocess.Popen[str], str, Path]) -> None:
    proc, path, log = stream_tether
    arp = bytes(Ether(src="02:00:00:00:00:02", dst="ff:ff:ff:ff:ff:ff") /
                ARP(hwsrc="02:00:00:00:00:02", psrc=GUEST, pdst=GATEWAY))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
        bad.connect(path)
        bad.sendall(struct.pack("!I", 1 << 30) + b"junk")
        bad.settimeout(10)
        assert bad.recv(10) == b""  # tether hung up on it
    assert proc.poll() is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as good:
        good.connect(path)
        good.settimeout(10)
        good.sendall(_framed(arp))
        header = good.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack("!I", header)
        reply = Ether(good.recv(n, socket.MSG_WAITALL))
        assert reply[ARP].op == 2 and reply[ARP].psrc == GATEWAY
    # One guest at a time: the next may connect once tether has seen this one go.
    wait_for(lambda: "stream client disconnected" in log.read_text(), 10, "tether to see EOF")
    # A frame with broken headers is dropped, the client stays.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.settimeout(10)
        broken = bytes(Ether() / IP(src=GUEST, dst=GATEWAY, ihl=15) / UDP())
        client.sendall(_framed(broken) + _framed(arp))
        (n,) = struct.unpack("!I", client.recv(4, socket.MSG_WAITALL))
        assert ARP in Ether(client.recv(n, socket.MSG_WAITALL))
    assert "frame length" in log.read_text()
