"""The TCP frames tether sends the guest, checked by scapy (not by tether's parser).

The guest is played by scapy frames fed to the stack; the host peer is a real
socket on loopback inside a namespace of the test's own.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from tests.net.conftest import GATEWAY, Netns, Recorder, delete_netns, make_netns
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.transport.tap_setup import inside

GUEST = "10.77.0.2"
GUEST_MAC = "02:00:00:00:00:02"
GUEST_PORT = 40000
GUEST_ISN = 1000


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = make_netns("tfrm")
    yield ns
    delete_netns(ns)


def _from_guest(stack: Stack, port: int, **tcp: object) -> None:
    frame = bytes(Ether(src=GUEST_MAC) / IP(src=GUEST, dst=GATEWAY) /
                  TCP(sport=GUEST_PORT, dport=port, window=65535, **tcp))  # type: ignore[arg-type]
    stack.frames_from_guest([memoryview(frame)])


def _completed(frame: bytes) -> Ether:
    """Finish a partial checksum as the guest's device does (virtio 1.2 section
    5.1.6.2: sum from the L4 header on, the field holding the pseudo-header sum)."""
    l4 = 14 + (frame[14] & 0xF) * 4
    segment = frame[l4:] + b"\0" * (len(frame[l4:]) & 1)
    total = sum(struct.unpack(f"!{len(segment) // 2}H", segment))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    done = bytearray(frame)
    struct.pack_into("!H", done, l4 + 16, ~total & 0xFFFF)
    return Ether(bytes(done))


def _checksums_valid(pkt: Ether) -> bool:
    fresh = pkt.copy()
    del fresh[IP].chksum
    del fresh[TCP].chksum
    fresh = Ether(bytes(fresh))
    return bool(fresh[IP].chksum == pkt[IP].chksum and fresh[TCP].chksum == pkt[TCP].chksum)


@pytest.mark.root
def test_pure_acks_are_valid_segments_with_partial_checksums(netns: Netns) -> None:
    """Pure ACKs come from a per-connection template: each must carry its own
    seq, ack and window, and complete to a correct checksum."""
    with inside(f"/run/netns/{netns.name}"):
        loop = Loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        gw = socket.inet_aton(GATEWAY)
        stack = Stack(loop, NetParams(addr4=socket.inet_aton(GUEST), prefix4=24, gateway4=gw,
                                      map_host_loopback4=gw))
        sink = Recorder()
        stack.attach(sink)
        stack.output.partial_l4_checksums = True
        try:
            _from_guest(stack, port, flags="S", seq=GUEST_ISN, options=[("MSS", 65480)])
            assert loop.run(until=lambda: bool(sink.frames), timeout=10)
            syn_ack = Ether(sink.frames[-1])
            assert syn_ack[TCP].flags == "SA" and syn_ack[TCP].ack == GUEST_ISN + 1
            ours = syn_ack[TCP].seq + 1
            _from_guest(stack, port, flags="A", seq=GUEST_ISN + 1, ack=ours)
            peer, _ = listener.accept()

            acks: list[Ether] = []
            seq = GUEST_ISN + 1
            for size in (1000, 3000):
                sink.frames.clear()
                frame = bytes(Ether(src=GUEST_MAC) / IP(src=GUEST, dst=GATEWAY) /
                              TCP(sport=GUEST_PORT, dport=port, flags="PA", seq=seq, ack=ours,
                                  window=65535) / (b"x" * size))
                stack.frames_from_guest([memoryview(frame)])
                seq += size
                # Less than two full segments: acknowledged by the delayed-ACK timer.
                assert loop.run(until=lambda: bool(sink.frames), timeout=5)
                acks.append(_completed(sink.frames[-1]))
            peer.settimeout(5)
            assert peer.recv(4000, socket.MSG_WAITALL) == b"x" * 4000

            for pkt, acked in zip(acks, (GUEST_ISN + 1001, GUEST_ISN + 4001), strict=True):
                assert pkt[Ether].dst == GUEST_MAC
                assert (pkt[IP].src, pkt[IP].dst, pkt[IP].len) == (GATEWAY, GUEST, 40)
                assert (pkt[TCP].sport, pkt[TCP].dport) == (port, GUEST_PORT)
                assert pkt[TCP].flags == "A" and pkt[TCP].seq == ours and pkt[TCP].ack == acked
                assert pkt[TCP].window > 0
                assert _checksums_valid(pkt)
            peer.close()
        finally:
            stack.close()
            listener.close()
            loop.close()
