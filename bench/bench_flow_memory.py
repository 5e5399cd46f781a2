"""What an established TCP flow costs tether in memory, at passt's table size.

    sudo .venv/bin/python bench/bench_flow_memory.py [--flows 100000]

Prints the flow table's default capacity, read from the real code (the
command line's default, parsed by tether.config, and the Stack built from
it), and tether's own Python memory per established TCP flow, measured with
tracemalloc around `Stack.restore_tcp_flow` (the call a migration target
makes for each flow) and one loop pass (each flow's resume: its pure-ACK
template to the guest, whose sink counts frames):

  real      as many real loopback connections as this process's descriptor
            limit allows (the peers live in a child process, so one
            descriptor each): a real socket, epoll registration, TcpConn,
            flow-table, connection-table and loop-handler entries;
  at N      then, in the same Stack, stand-ins up to --flows flows in all:
            objects with the socket methods the flow calls, with descriptor
            numbers at or above the hard limit (so never a real descriptor of
            this process), registered in the loop's handler table but not in
            the kernel's epoll set (there is no file to register).  The Python
            side of every flow is the real code's; the figure is the table of
            100,000 flows that a 20,000-descriptor container cannot hold.

The per-flow figure for the target adds the size of a real `socket.socket`
object (measured with tracemalloc on the accepted sockets: the stand-ins'
own size is not counted) to the flow's objects.  Not measured: the kernel's
socket and its buffers (the target counts memory beyond them), the kernel's
epoll item (a slab object of the kernel, about 128 bytes, not tether's
heap), and for the stand-ins the real socket calls' side effects (an ioctl
on a stand-in's descriptor fails, so its window reads 0).

Root is needed for the namespace the connections live in.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import select
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator

# tether's public entry points this bench drives: kept together, to follow moves in src/.
from bench_migration import CountingSink, Peers, Worker

from tether.cli import _raise_fd_limit as raise_fd_limit
from tether.config import build_parser, from_args
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, TcpFlowRecord
from tether.transport.tap_setup import inside

GUEST = socket.inet_aton("10.77.0.2")
GATEWAY = socket.inet_aton("10.77.0.1")
LISTEN_PORT = 6000
STANDIN_SNDBUF = (2626560).to_bytes(4, "little")  # SO_SNDBUF of an idle loopback socket
SPARE_FDS = 1000  # the loop, the listener, the worker's pipe, the interpreter's own files


def mapped(raw4: bytes) -> bytes:
    return bytes(10) + b"\xff\xff" + raw4


def record(i: int) -> TcpFlowRecord:
    """An established guest -> host flow, distinct by its guest port and, every 20,000
    flows, by the remote port the guest sees; nothing in flight (no timer armed)."""
    guest_side = (mapped(GATEWAY), mapped(GUEST), LISTEN_PORT + i // 20000, 40000 + i % 20000)
    return TcpFlowRecord((PIF_TAP, PIF_HOST), (guest_side, (bytes(16), bytes(16), 0, 0)),
                         retries=0, ws_from_tap=7, ws_to_tap=8, events=ESTABLISHED,
                         tap_mss=65480, sndbuf=0, flags=0, seq_dup_ack_approx=0,
                         wnd_from_tap=512, wnd_to_tap=512, seq_to_tap=1000,
                         seq_ack_from_tap=1000, seq_from_tap=2000, seq_ack_to_tap=2000,
                         seq_init_from_tap=1999)


def default_capacity() -> tuple[int, int]:
    """(the command line's default --max-flows, a Stack's table capacity built from it)."""
    config = from_args(build_parser().parse_args([]))
    loop = Loop()
    try:
        return config.net.max_flows, Stack(loop, config.net).flows.capacity
    finally:
        loop.close()


class StandInSocket:
    """What a TcpConn calls on its socket, without a descriptor: an idle connection's
    answers (nothing to read, a send buffer of the usual size)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def setblocking(self, flag: bool) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def getsockopt(self, level: int, option: int) -> int:
        # A new int object per call, as a real socket's answer is (a shared constant
        # would make the stand-ins' flows look 32 bytes cheaper).
        return int.from_bytes(STANDIN_SNDBUF, "little")

    def recv_into(self, *args: object) -> int:
        raise BlockingIOError

    def close(self) -> None:
        self._fd = -1


class PartialEpoll:
    """The loop's epoll set, passing real descriptors through and accepting stand-ins'
    numbers (at or above first_fake) without a kernel registration."""

    def __init__(self, real: select.epoll, first_fake: int) -> None:
        self.real = real
        self.first_fake = first_fake

    def register(self, fd: int, events: int) -> None:
        if fd < self.first_fake:
            self.real.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        if fd < self.first_fake:
            self.real.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if fd < self.first_fake:
            self.real.unregister(fd)

    def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
        return self.real.poll(timeout)

    def close(self) -> None:
        self.real.close()


@dataclasses.dataclass
class FlowMemory:
    capacity_cli: int
    capacity_stack: int
    flows: int
    real: int
    real_per_flow: float
    """tracemalloc bytes per flow after the real flows only."""
    per_flow: float
    """tracemalloc bytes per flow after all flows (real and stand-ins)."""
    standin_per_flow: float
    """The stand-ins' marginal bytes per flow."""
    socket_object: float
    """tracemalloc bytes of one accepted socket.socket object."""
    restore_us: float
    """Microseconds of restore_tcp_flow per real flow."""

    @property
    def total_per_flow(self) -> float:
        """The target's figure: the flow's objects plus its socket object."""
        return self.per_flow + self.socket_object


@contextlib.contextmanager
def own_namespace() -> Iterator[None]:
    ns = f"tfm{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with inside(f"/run/netns/{ns}"):
            yield
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def measure(n: int) -> FlowMemory:
    """n flows in one Stack: real ones up to the descriptor limit, stand-ins beyond."""
    raise_fd_limit()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    capacity_cli, capacity = default_capacity()
    if capacity < n:
        raise RuntimeError(f"the default flow table holds {capacity} flows, fewer than {n}")
    n_real = max(0, min(n, hard - SPARE_FDS))
    with own_namespace():
        loop = Loop()
        # Private attribute on purpose: the one place a stand-in must not reach the kernel.
        loop._epoll = PartialEpoll(loop._epoll, hard)  # type: ignore[assignment]
        stack = Stack(loop, NetParams(addr4=GUEST, prefix4=24, gateway4=GATEWAY))
        # As the daemon's transports (tap with a vnet header, vhost-user) do: the
        # stack then keeps a pure-ACK template per flow, which is part of its cost.
        stack.output.partial_l4_checksums = True
        stack.attach(CountingSink())
        listener = socket.create_server(("127.0.0.1", LISTEN_PORT), backlog=4096)
        peers = Worker("peers", lambda: Peers(LISTEN_PORT + 1000))
        ours: list[socket.socket | StandInSocket] = []
        try:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            while len(ours) < n_real:
                batch = min(2000, n_real - len(ours))
                peers.call("connect", batch, LISTEN_PORT)
                ours.extend(listener.accept()[0] for _ in range(batch))
            socket_object = (tracemalloc.get_traced_memory()[0] - before) / max(n_real, 1)
            tracemalloc.stop()
            ours.extend(StandInSocket(hard + i) for i in range(n - n_real))
            records = [record(i) for i in range(n)]
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            t0 = time.perf_counter()
            for rec, sock in zip(records[:n_real], ours[:n_real], strict=True):
                stack.restore_tcp_flow(rec, sock)  # type: ignore[arg-type]
            restore_s = time.perf_counter() - t0
            loop.run_once(0)  # each flow's resume (a duplicate ACK to the guest)
            after_real = tracemalloc.get_traced_memory()[0]
            for rec, sock in zip(records[n_real:], ours[n_real:], strict=True):
                stack.restore_tcp_flow(rec, sock)  # type: ignore[arg-type]
            loop.run_once(0)
            after_all = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            if len(stack.flows) != n:
                raise RuntimeError(f"{len(stack.flows)} flows in the table, {n} expected")
        finally:
            stack.close()
            peers.close()
            listener.close()
            loop.close()
    return FlowMemory(
        capacity_cli, capacity, n, n_real,
        real_per_flow=(after_real - base) / max(n_real, 1),
        per_flow=(after_all - base) / n,
        standin_per_flow=(after_all - after_real) / max(n - n_real, 1),
        socket_object=socket_object, restore_us=restore_s / max(n_real, 1) * 1e6)


def report(m: FlowMemory) -> None:
    print(f"default flow table capacity: {m.capacity_cli} (command line default), "
          f"{m.capacity_stack} (Stack built from it)")
    print(f"{m.real} real established TCP flows: {m.real_per_flow:.0f} B of tether's Python "
          f"memory per flow, + {m.socket_object:.0f} B for its socket object; "
          f"restore_tcp_flow {m.restore_us:.1f} us per flow")
    if m.flows > m.real:
        print(f"{m.flows} flows in the same Stack ({m.flows - m.real} of them stand-ins "
              f"without a descriptor, past the fd limit): {m.per_flow:.0f} B per flow, the "
              f"stand-ins {m.standin_per_flow:.0f} B each")
    print(f"per established flow at {m.flows}: {m.total_per_flow:.0f} B beyond the kernel's "
          f"socket (flow objects + socket object; target <= 1024 B)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_flow_memory: needs root (network namespace)")
    report(measure(args.flows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
