"""Frames too short for the old 54-byte floor still carry their offload header.

With checksum offload on a tap, the stack leaves TCP/UDP checksums partial
(the pseudo-header sum) and relies on NEEDS_CSUM in the virtio-net header for
the guest's kernel to finish them.  A UDP-over-IPv4 datagram with under 12
payload bytes makes a frame shorter than 54 bytes; tap used to send those with
an all-zero header, so the guest's kernel checked the partial sum, found it
wrong and dropped the datagram.  These tests let a real namespace kernel do
that check on replies (guest -> host -> guest) and on forwarded requests
(host -> guest -> host).
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable

import pytest

from tests.net.conftest import GATEWAY, ROUTER6, Tether
from tests.support import wait_for

pytestmark = pytest.mark.root

# Payload sizes around the old floor: 0 and 1 byte (42- and 43-byte frames over
# IPv4), 11 (the largest that was broken) and 12 (the first that worked).
SIZES = (0, 1, 11, 12)

# Runs in the namespace: one datagram of each size to HOST:PORT, each answer
# must come back byte for byte.  The socket timeout bounds every wait.
_GUEST_CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.settimeout(5)
for n in map(int, sys.argv[3:]):
    msg = bytes(range(65, 65 + n))
    sock.sendto(msg, (host, port))
    try:
        data, _ = sock.recvfrom(100)
    except socket.timeout:
        raise SystemExit(f"no answer to a {n}-byte datagram")
    if data != msg[::-1]:
        raise SystemExit(f"bad answer to a {n}-byte datagram: {data!r}")
print("ok")
"""

# Runs in the namespace: echoes (reversed) as many datagrams as it is told.
_GUEST_SERVER = """
import socket, sys
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("::", int(sys.argv[1])))
sock.settimeout(10)
print("listening", flush=True)
for _ in range(int(sys.argv[2])):
    data, peer = sock.recvfrom(100)
    sock.sendto(data[::-1], peer)
print("ok")
"""


class _EchoPeer:
    """A UDP echo server (reversing) on the host's loopback, in a thread."""

    def __init__(self, family: socket.AddressFamily) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        self.sock.settimeout(0.2)  # lets the thread notice `stop` between datagrams
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                data, peer = self.sock.recvfrom(100)
            except TimeoutError:
                continue
            self.sock.sendto(data[::-1], peer)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_dad(t: Tether) -> None:
    wait_for(lambda: "tentative" not in t.ns.run("ip", "-6", "addr").stdout, 10, "IPv6 DAD")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_small_udp_replies_reach_the_guest(start_tether: Callable[..., Tether],
                                           family: socket.AddressFamily) -> None:
    t = start_tether()
    if family == socket.AF_INET6:
        _wait_dad(t)
    peer = _EchoPeer(family)
    try:
        # The gateway stands for the host's loopback; over IPv6, tether's
        # link-local address does.
        target = GATEWAY if family == socket.AF_INET else f"{ROUTER6}%tap0"
        done = t.ns.run(sys.executable, "-c", _GUEST_CLIENT, target, str(peer.port),
                        *map(str, SIZES), check=False, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == "ok"
    finally:
        peer.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_small_forwarded_udp_reaches_the_guest(start_tether: Callable[..., Tether],
                                               host: str) -> None:
    port = _free_udp_port()
    t = start_tether("-u", str(port))
    if ":" in host:
        _wait_dad(t)
    server = t.ns.popen(sys.executable, "-c", _GUEST_SERVER, str(port), str(len(SIZES)))
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            for n in SIZES:
                msg = bytes(range(97, 97 + n))
                sock.sendto(msg, (host, port))
                try:
                    data, _ = sock.recvfrom(100)
                except TimeoutError:
                    pytest.fail(f"no answer to a {n}-byte datagram through -u")
                assert data == msg[::-1], n
        out, err = server.communicate(timeout=15)
        assert out.strip().endswith("ok"), out + err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
