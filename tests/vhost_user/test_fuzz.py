"""Hypothesis: hostile descriptor tables and message payloads never break the device.

Whatever the guest writes into its rings and whatever the front-end sends,
the device must neither raise nor hang: bad chains are dropped and counted,
bad messages end the connection, and a fresh connection works again.
"""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tether.transport.vhost_user import protocol as p

from .frontend import BUF_BASE, MEM_SIZE, QSIZE, Frontend
from .test_device import RX, TX, Rig

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

addresses = st.one_of(
    st.integers(0, MEM_SIZE + 0x1000),  # in and just past guest memory
    st.sampled_from([BUF_BASE, MEM_SIZE - 16, 2**64 - 16, 2**63]),
)
descriptor = st.tuples(
    addresses,
    st.one_of(st.integers(0, 0x3000), st.sampled_from([0, 16, 32, 2**32 - 1])),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT in every combination
    st.one_of(st.integers(0, QSIZE + 2), st.integers(0, 0xFFFF)),
)


@FUZZ
@given(
    table=st.lists(descriptor, min_size=QSIZE, max_size=QSIZE),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=QSIZE),
    indirect=st.lists(descriptor, min_size=0, max_size=8),
    frame_sizes=st.lists(st.integers(0, 70000), max_size=4),
)
def test_hostile_descriptor_tables(table: list[tuple[int, int, int, int]],
                                   heads: list[int],
                                   indirect: list[tuple[int, int, int, int]],
                                   frame_sizes: list[int]) -> None:
    rig = Rig()
    try:
        rig.fe.start(rig.guest)
        g = rig.guest
        # An indirect table the descriptors may point at (BUF_BASE).
        for i, (addr, length, flags, nxt) in enumerate(indirect):
            struct.pack_into("<QIHH", g.mem, BUF_BASE + 16 * i, addr, length, flags, nxt)
        for q in (RX, TX):
            for i, (addr, length, flags, nxt) in enumerate(table):
                g.set_desc(q, i, addr, length, flags, nxt)
            for head in heads:
                g.offer(q, head)
            rig.fe.kick_queue(q)
        for size in frame_sizes:
            rig.device.send_frame(bytes(size))
        rig.device.flush()
        # Every frame delivered came from a readable chain of sane size.
        assert all(len(f) <= 65549 for f in rig.port.frames)
        # The device still answers, and every used element names a real head.
        assert rig.fe.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES
        for q in (RX, TX):
            for head, length in g.used(q):
                assert head < QSIZE or rig.device.bad_chains
                assert length <= 16 << 20
    finally:
        rig.close()


known = st.sampled_from(list(p.Request))
payload = st.one_of(
    st.binary(max_size=80),
    st.builds(p.VRING_STATE.pack, st.integers(0, 3),
              st.integers(0, 2**32 - 1)),
    st.builds(p.U64.pack, st.integers(0, 2**64 - 1)),
    st.builds(lambda n: p.MEM_TABLE_HEAD.pack(n, 0) + bytes(32 * min(n, 9)),
              st.integers(0, 12)),
)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@FUZZ
@given(messages=st.lists(st.tuples(st.one_of(known, st.integers(0, 100)), payload,
                                   st.sampled_from([0x1, 0x9, 0x0, 0x5, 0x2]),
                                   st.integers(0, 2)),
                         min_size=1, max_size=12))
def test_hostile_messages_end_in_replies_or_a_clean_disconnect(
        messages: list[tuple[int, bytes, int, int]]) -> None:
    fds_before = open_fds()
    rig = Rig()
    try:
        for request, data, flags, nfds in messages:
            if not rig.device.connected:
                break
            # Attached fds (eventfds, as QEMU sends for rings) must be closed
            # by the device whatever becomes of the message.
            fds = [os.eventfd(0) for _ in range(nfds)]
            rig.fe.send(request, data, fds, flags=flags)
            for fd in fds:
                os.close(fd)
        # A connection that survived still works; one that did not leaves a
        # clean device for the next front-end.
        if not rig.device.connected:
            rig.fe.close()
            rig.fe = Frontend(rig.loop, rig.device)
        rig.fe.sock.setblocking(False)
        try:
            while rig.fe.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        rig.fe.sock.settimeout(5)
        assert rig.serves_an_honest_front_end()
    finally:
        rig.close()
    assert open_fds() == fds_before, "the device leaked file descriptors"
