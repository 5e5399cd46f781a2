"""What an established TCP flow costs tether in memory, at the default table size.

    sudo .venv/bin/python bench/bench_flow_memory.py [--flows 100000]

In a network namespace of its own, the script opens N real TCP connections
on loopback and hands each accepted socket to a real Stack as an established
flow (the way a migration target does, `Stack.restore_tcp_flow`), then
reports Python's memory (tracemalloc) per flow: the flow's own objects, its
flow-table, connection-table and epoll entries, its handler; not the
kernel's socket, nor the socket objects, which exist before the flow does
(their size is printed apart).  Also: the default flow-table capacity, and
how long the N flows took to hand over.  Root is needed for the namespace
and for the file-descriptor limit (2 fds per connection).
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.loop import Loop  # noqa: E402
from tether.net.params import NetParams  # noqa: E402
from tether.net.stack import Stack  # noqa: E402
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, TcpFlowRecord  # noqa: E402
from tether.transport.tap import inside  # noqa: E402

GUEST = socket.inet_aton("10.77.0.2")
GATEWAY = socket.inet_aton("10.77.0.1")


def mapped(raw4: bytes) -> bytes:
    return bytes(10) + b"\xff\xff" + raw4


def record(guest_port: int) -> TcpFlowRecord:
    guest_side = (mapped(GATEWAY), mapped(GUEST), 6000, guest_port)
    return TcpFlowRecord((PIF_TAP, PIF_HOST), (guest_side, (bytes(16), bytes(16), 0, 0)),
                         0, 7, 8, ESTABLISHED, 65480, 0, 0, 0, 512, 512, 1000, 1000, 2000,
                         2000, 1999)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--flows", type=int, default=100_000)
    args = parser.parse_args()
    n = args.flows
    want = 2 * n + 1000
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        # A container may cap the hard limit even for root: measure what fits.
        n = (hard - 1000) // 2
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"the file-descriptor limit is {hard} and cannot be raised here: "
              f"{n} flows instead of {args.flows}")
    ns = f"tfm{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with inside(f"/run/netns/{ns}"):
            return measure(n)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def measure(n: int) -> int:
    loop = Loop()
    stack = Stack(loop, NetParams(addr4=GUEST, prefix4=24, gateway4=GATEWAY))
    capacity = stack.flows.capacity
    if capacity < n:
        print(f"the default flow table holds {capacity} flows, fewer than {n}")
        return 1
    listener = socket.create_server(("127.0.0.1", 6000), backlog=4096)
    peers: list[socket.socket] = []
    ours: list[socket.socket] = []
    while len(ours) < n:
        batch = min(2000, n - len(ours))
        for _ in range(batch):
            peers.append(socket.create_connection(("127.0.0.1", 6000)))
        for _ in range(batch):
            ours.append(listener.accept()[0])
    records = [record(40000 + i % 20000 + (i // 20000) * 0) for i in range(n)]
    # Distinct keys: vary the guest port and, past 20000, the guest's "remote" port.
    records = [TcpFlowRecord(r.pif, ((r.sides[0][0], r.sides[0][1], 6000 + i // 20000,
                                      r.sides[0][3]), r.sides[1]), *_tail(r))
               for i, r in enumerate(records)]
    socket_size = sys.getsizeof(ours[0])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for rec, sock in zip(records, ours, strict=True):
        stack.restore_tcp_flow(rec, sock)
    seconds = time.perf_counter() - t0
    loop.run_once(0)  # the thaw's deferred ACKs: no sink, so nothing is sent
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_flow = (after - before) / n
    print(f"default flow table capacity: {capacity} flows")
    print(f"{n} established TCP flows: {per_flow:.0f} bytes of Python memory per flow "
          f"(+ {socket_size} for the socket object), handed over in {seconds:.2f} s "
          f"({seconds / n * 1e6:.1f} us per flow)")
    stack.close()
    for s in peers:
        s.close()
    listener.close()
    loop.close()
    return 0


def _tail(r: TcpFlowRecord) -> tuple[int, ...]:
    return (r.retries, r.ws_from_tap, r.ws_to_tap, r.events, r.tap_mss, r.sndbuf, r.flags,
            r.seq_dup_ack_approx, r.wnd_from_tap, r.wnd_to_tap, r.seq_to_tap,
            r.seq_ack_from_tap, r.seq_from_tap, r.seq_ack_to_tap, r.seq_init_from_tap)


if __name__ == "__main__":
    sys.exit(main())
