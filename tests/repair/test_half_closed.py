"""Half-closed connections migrate and later close cleanly, without a reset.

A restored socket always starts ESTABLISHED; thaw replays our FIN and turns
the peer's received FIN into end-of-file for reads.  Each case drives a real
connection into the state, moves it through the real helper, then finishes
the close on both sides and checks every byte and both ends of file.
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.repair.conftest import recv_exactly, tcp_pairs
from tests.support import Netns, wait_for
from tether.repair import kernel as k
from tether.repair import tcp
from tether.repair.client import RepairHelper
from tether.repair.kernel import TcpState
from tether.repair.record import decode

pytestmark = pytest.mark.root


def state_of(s: socket.socket) -> int:
    return k.tcp_info(s)[0]


def read_to_eof(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    out = bytearray()
    while chunk := s.recv(65536):
        out += chunk
    return bytes(out)


def fill(s: socket.socket) -> int:
    """Write until the socket's buffer is full; return how much was taken."""
    s.setblocking(False)
    total = 0
    block = bytes(range(256)) * 256
    try:
        while True:
            total += s.send(block)
    except BlockingIOError:
        pass
    s.setblocking(True)
    return total


def into_state(name: str, ours: socket.socket, peer: socket.socket) -> tuple[int, int]:
    """Drive ours into the named state; return (bytes ours sent, bytes peer sent)."""
    ours.sendall(b"o" * 1000)
    peer.sendall(b"p" * 2000)
    wait_for(lambda: k.ioctl_int(ours, k.SIOCINQ) == 2000, 5, "data at ours")
    sent = 1000
    if name == "FIN_WAIT1":
        k.silence(ours)  # the peer's ACK of our FIN never arrives
        ours.shutdown(socket.SHUT_WR)
    elif name == "FIN_WAIT1_UNSENT":
        sent += fill(ours)  # the peer does not read: data waits ahead of the FIN
        ours.shutdown(socket.SHUT_WR)
    elif name == "FIN_WAIT2":
        ours.shutdown(socket.SHUT_WR)
    elif name == "CLOSE_WAIT":
        peer.shutdown(socket.SHUT_WR)
    elif name == "LAST_ACK":
        peer.shutdown(socket.SHUT_WR)
        wait_for(lambda: state_of(ours) == TcpState.CLOSE_WAIT, 5, "CLOSE_WAIT")
        k.silence(ours)
        ours.shutdown(socket.SHUT_WR)
    elif name == "CLOSING":
        # Simultaneous close: the FINs cross, neither is acknowledged yet.
        k.silence(peer)
        ours.shutdown(socket.SHUT_WR)
        peer.shutdown(socket.SHUT_WR)
    expected = TcpState[name.removesuffix("_UNSENT")]
    wait_for(lambda: state_of(ours) == expected, 5, f"state {name}")
    return sent, 2000


CASES = ["FIN_WAIT1", "FIN_WAIT1_UNSENT", "FIN_WAIT2", "CLOSE_WAIT", "LAST_ACK", "CLOSING"]


@pytest.mark.parametrize("name", CASES)
def test_half_closed_connection_moves_and_closes_cleanly(
    name: str, ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    (ours, peer), = tcp_pairs(1)
    sent, peer_sent = into_state(name, ours, peer)

    tcp.freeze([ours], backend)
    state = tcp.dump(ours)
    # Within one host, a segment from the peer (a delayed ACK, a window update)
    # between the close and the restore would find no socket and draw a reset.
    guard = tcp.hold_address(state)
    ours.close()
    state, _ = decode(state.encode())
    assert state.state == TcpState[name.removesuffix("_UNSENT")]
    if name == "FIN_WAIT1_UNSENT":
        assert state.unsent_len > 0
    moved = tcp.restore(state, backend)
    guard.close()
    tcp.thaw(moved, state, backend)
    k.unsilence(peer)

    # Our side: the restored queue, then end-of-file if the peer had closed.
    if state.state in k.FIN_RECEIVED:
        assert read_to_eof(moved) == b"p" * peer_sent
    else:
        assert recv_exactly(moved, peer_sent) == b"p" * peer_sent
    # The peer's side: every byte we sent, then our FIN.
    if state.state not in k.FIN_SENT:
        moved.shutdown(socket.SHUT_WR)
    got = read_to_eof(peer)
    assert len(got) == sent and got[:1000] == b"o" * 1000
    if state.state not in k.FIN_RECEIVED:
        peer.shutdown(socket.SHUT_WR)
        assert read_to_eof(moved) == b""
    moved.close()
    peer.close()
    time.sleep(0)  # nothing to wait for: resets would already be counted
    assert ns.tcp_out_rsts() == 0


def test_a_closed_connection_is_not_dumped(ns: Netns, backend: RepairHelper,
                                           real_helper: subprocess.Popen[str]) -> None:
    (ours, peer), = tcp_pairs(1)
    ours.shutdown(socket.SHUT_WR)
    peer.close()
    wait_for(lambda: state_of(ours) == TcpState.CLOSE, 5, "CLOSE")
    tcp.freeze([ours], backend)
    with pytest.raises(tcp.RepairError, match="cannot be migrated"):
        tcp.dump(ours)
    ours.close()
