"""loop.ReadPace on a real datagram socket pair and the real loop (no root).

What a user relies on: every datagram is read, a burst within a few passes,
and request/response traffic (one datagram per wake-up, other descriptors'
passes in between) pays no failed read for it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tether import loop as evloop


@dataclass
class Reader:
    sock: socket.socket
    pace: evloop.ReadPace
    got: list[bytes] = field(default_factory=list)
    failed_reads: int = 0

    def on_readable(self, _events: int) -> None:
        n = 0
        for _ in range(self.pace.wake()):
            try:
                self.got.append(self.sock.recv(64))
            except BlockingIOError:
                self.failed_reads += 1
                break
            n += 1
        self.pace.done(n)


@pytest.fixture
def rig() -> Iterator[tuple[evloop.Loop, socket.socket, Reader]]:
    loop = evloop.Loop()
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    reader = Reader(ours, evloop.ReadPace(loop, 64))
    loop.add(ours.fileno(), evloop.READ, reader.on_readable)
    try:
        yield loop, peer, reader
    finally:
        loop.close()
        ours.close()
        peer.close()


def test_request_response_reads_once_per_wake_up(
        rig: tuple[evloop.Loop, socket.socket, Reader]) -> None:
    loop, peer, reader = rig
    for i in range(20):
        peer.send(b"request %d" % i)
        loop.run_once(1.0)
        assert reader.got[-1] == b"request %d" % i
        loop.run_once(0)  # the other side's pass: the guest's next request, say
    assert len(reader.got) == 20
    assert reader.failed_reads == 0


def test_a_burst_is_drained_in_a_few_passes(
        rig: tuple[evloop.Loop, socket.socket, Reader]) -> None:
    loop, peer, reader = rig
    for i in range(100):
        peer.send(b"burst %d" % i)
    passes = 0
    while len(reader.got) < 100:
        loop.run_once(1.0)
        passes += 1
        assert passes <= 4, f"{len(reader.got)} of 100 read after {passes} passes"
    assert reader.got == [b"burst %d" % i for i in range(100)]
    # Level-triggered, the fd stays quiet once empty; alone again, it reads once per wake.
    loop.run_once(0)
    peer.send(b"single")
    loop.run_once(1.0)
    assert reader.got[-1] == b"single"
    loop.run_once(0)
    peer.send(b"another")
    loop.run_once(1.0)
    loop.run_once(0)
    assert reader.got[-1] == b"another"
    assert reader.failed_reads <= 2
