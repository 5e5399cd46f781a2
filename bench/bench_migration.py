"""What a live migration costs tether, with 1, 2, 100 and 1000 (or 10,000) TCP connections.

    sudo .venv/bin/python bench/bench_migration.py [--counts 1,2,100,1000] [--repeat 3]
        [--rcvq BYTES] [--sndq BYTES] [--check N] [--control] [--linger]
        [--vm | --vm-only] [--vm-rate 2M] [--vm-seconds 20]

(bench/README.md has the same in a table.)

Needs root: it creates (and deletes) its own network namespace, and two real
tether-repair helpers switch TCP_REPAIR on the sockets.

In-process part (the main numbers; no QEMU, no guest).  The peers, the source
stack and the target stack each run in a process of their own (forked, in a
namespace made for the scenario, driven over a pipe), so that no process holds more than one
descriptor per connection (plus, on the source, one silent address holder
per outbound connection once its socket is closed): 10,000 connections fit
under a 20,000-descriptor hard limit.  Each process raises its soft limit to
the hard one with the daemon's own function.  The state goes from source to
target through a file, outside the timed calls.  For each count N and each
load, N real TCP connections are opened on the namespace's loopback:
even ones look outbound (the guest connected to the gateway, tether's socket
connected to a bench server), odd ones inbound (a bench client connected to
the source stack's forwarded port, tether's socket accepted from it), so N=2
is the reference's pair (one OUT, one IN).  tether's side of each is handed
to a real `Stack` with `restore_tcp_flow()` and a `TcpFlowRecord`, as if a
guest had opened it; the guest side is a FrameSink that counts frames.  Then:

    source Handover(stack, helper, linger=False)   save_state()       -> "save"
    target Handover(stack2, helper2)               load_state(data)   -> "load"
                                                   rings_started()    -> "thaw"
    source                                         front_end_gone()   (not timed)

  save   rings stopped -> bytes: freeze (drop filter + repair on through the
         helper), dump every socket, encode the stream, and (same host, no
         linger) close the sockets behind silent address holders.
  load   bytes -> sockets re-created in repair mode (parse, validate, restore
         through the helper).  QEMU's downtime includes save and load.
  thaw   the guest runs on the target: repair off, hand the flows to the stack.
         passt does this inside its load, so compare load+thaw to passt's load.

Loads: "idle" = nothing queued.  "busy" = at the freeze each connection holds
--rcvq bytes from the peer in tether's receive queue (already pushed to the
guest by the source stack, peeking, and not acknowledged by the guest: data
in flight towards the guest, as passt's busy flows have) and --sndq bytes in
tether's send queue that the peer has not acknowledged (its receive buffer is
small and it is not reading).  The queues are a snapshot: peers do not write
during the measured calls.

After each thaw every migrated connection (--check 3: three of them) is checked
at the socket level, all at once: the peer reads the whole send queue and a
marker byte tether's restored socket writes, and tether's restored socket reads
the whole receive queue and a marker byte the peer writes, byte for byte.  A
failed check aborts the run.  --control repeats each busy run without migrating
(the same checks on the original sockets), as a baseline.

Columns (medians over --repeat runs, interleaved so noise hits all rows alike):
    conns        N
    load         idle / busy
    save, load, thaw   ms of the calls above;  s+l = save + load (QEMU downtime share)
    s+l min-max  spread of save + load over the runs
    src/dst us   per connection: save / N and (load + thaw) / N
    state B      the device-state stream's size
    queued B     bytes of the sockets' queues inside it (read back from the stream)
    fixed/conn   (state - queued) / N   (includes the stream's own overhead)
    per flow     (state - queued - empty state) / N: bytes each flow adds

--vm (optional; --vm-only skips the rest): one real same-host migration of a
512 MiB TCG guest on two tethers with a checked stream each way, printing QMP
downtime and total-time, the state size tether logged, the save/load spans
(SET_DEVICE_STATE_FD to CHECK_DEVICE_STATE, as the reference measured them)
from its log, and whether both streams arrived intact.  Uses tests/vm (QEMU 10
and the guest image).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import fcntl
import gc
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import re
import select
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# tether's public entry points this bench drives: kept together, to follow moves in src/.
from tether.cli import _raise_fd_limit as raise_fd_limit  # the daemon's own, at its start
from tether.handover.device_state import Handover
from tether.handover.format import TCP_FLOWS, TETHER_FORMAT
from tether.loop import Loop
from tether.migrate.stream import parse
from tether.net.params import NetParams, PortRange
from tether.net.stack import Stack
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, SOCK_ACCEPTED, TcpFlowRecord
from tether.repair.client import RepairHelper

GUEST = socket.inet_aton("10.0.2.15")
GATEWAY = socket.inet_aton("10.0.2.2")
PORTS = itertools.count(10000, 2)
"""Each scenario's "host service" port (outbound flows) and, one above, the source
stack's -t port (inbound flows): fresh ones, so no TIME-WAIT of an earlier run is in
the way (see the report: a thawed socket loses SO_REUSEADDR)."""
GUEST_PORT_BASE = 20000
SIOCINQ = 0x541B
SIOCOUTQ = 0x5411
MASK32 = 0xFFFFFFFF
PEER_MSS = 1460
PEER_RCVBUF = 32 << 10
"""The peers announce an Ethernet MSS and keep a small receive buffer, so that
tether's send queue stays full while they do not read.  Not smaller: with
loopback's 65483 MSS the window is below one segment and tether's socket sends
only from its zero-window probe timer, and with a 4 KiB buffer the peer drops
in-window segments for lack of memory; either way tether's socket backs off for
seconds (timers of the kernel, not of the migration) before the checks get data."""

# lab-results.md, section 3: passt, 2 busy connections, TCG, this machine.
REF_SAVE_LOAD = ((6.4, 10.5), (11.4, 12.3), (4.8, 2.0))
REF_IDLE = (1.0, 0.7, 476)
REF_FIXED, REF_PER_FLOW = 62, 164


# -- plumbing -----------------------------------------------------------------


def setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    """Move this process into a fresh namespace (lo up); on the way out, back to its
    own and the namespace deleted, with every socket of it (TIME-WAIT included)."""
    back = os.open(f"/proc/{os.getpid()}/ns/net", os.O_RDONLY)
    name = f"tether-bench-mig-{os.getpid()}-{next(NAMESPACES)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        setns(f"/run/netns/{name}")
        try:
            yield name
        finally:
            setns(f"/proc/self/fd/{back}")
    finally:
        os.close(back)
        subprocess.run(["ip", "netns", "del", name], check=False)


NAMESPACES = itertools.count()


def start_helper(directory: str, side: str) -> tuple[RepairHelper, subprocess.Popen[bytes]]:
    """A real tether-repair process for one side, as each tether daemon has its own."""
    path = os.path.join(directory, f"{side}.repair")
    client = RepairHelper(path)
    proc = subprocess.Popen([sys.executable, "-m", "tether.repair.helper", path])
    try:
        client.wait(10)
    except BaseException:
        stop_helper(client, proc)
        raise
    return client, proc


def stop_helper(client: RepairHelper, proc: subprocess.Popen[bytes]) -> None:
    client.close()  # the helper sees EOF and exits 0
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class CountingSink:
    """The guest's side of the vhost-user device: takes every frame, counts them."""

    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        self.frames += 1
        self.bytes += len(frame)
        return True

    def has_room(self) -> bool:
        return True

    def flush(self) -> None:
        pass


def ioctl_int(sock: socket.socket, request: int) -> int:
    out = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    value: int = struct.unpack("i", out)[0]
    return value


def wait_until(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll a kernel condition (queue lengths have no event to wait on), bounded."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        select.select([], [], [], 0.001)  # a poll interval, not a synchronisation


def pattern(seed: int, length: int) -> bytes:
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (length // 251 + 1))[:length]


def to_tether(index: int, length: int) -> bytes:
    """What the peer of connection index queues towards tether (its receive queue)."""
    return pattern(index, length)


def from_tether(index: int, length: int) -> bytes:
    """What tether's socket of connection index queues towards the peer (its send queue)."""
    return pattern(index + 101, length)


def mapped(addr4: bytes) -> bytes:
    return bytes(10) + b"\xff\xff" + addr4


def host_side(sock: socket.socket) -> tuple[bytes, bytes, int, int]:
    local, peer = sock.getsockname(), sock.getpeername()
    return (mapped(socket.inet_aton(local[0])), mapped(socket.inet_aton(peer[0])), local[1],
            peer[1])


# -- processes -----------------------------------------------------------------------
#
# Three descriptors per connection (tether's socket on the source, the peer's, the
# target's restored one) would not fit 10,000 connections under a 20,000-descriptor
# hard limit in one process.  So the peers, the source stack and the target stack
# each live in a forked process of their own (all in the bench's namespace), driven
# over a pipe; the state goes from source to target through a file in the work
# directory, outside the timed calls, as it would go through QEMU's pipe.


class Worker:
    """A forked process holding one object; calls its methods by name, one at a time."""

    def __init__(self, name: str, factory: Callable[[], object]) -> None:
        ctx = multiprocessing.get_context("fork")
        self.name = name
        self.conn, child = ctx.Pipe()
        # Not a daemon: a worker may start workers of its own (the targets' migration
        # lab runs scenario() in a child).  close() ends it; so does EOF on its pipe.
        self.proc = ctx.Process(target=_serve, args=(child, factory), name=name)
        self.proc.start()
        child.close()
        self._pending = False

    def start(self, method: str, *args: object) -> None:
        """Begin a call and return at once: two workers can then work side by side."""
        assert not self._pending, f"{self.name}: a call is still running"
        self.conn.send((method, args))
        self._pending = True

    def result(self, timeout: float = 600.0) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer in {timeout:.0f} s")
        self._pending = False
        ok, value = self.conn.recv()
        if not ok:
            raise RuntimeError(f"{self.name} failed:\n{value}")
        return value

    def call(self, method: str, *args: object, timeout: float = 600.0) -> Any:
        self.start(method, *args)
        return self.result(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _serve(conn: multiprocessing.connection.Connection, factory: Callable[[], object]) -> None:
    # The process's own descriptor limit, raised as the daemon raises it.
    raise_fd_limit()
    try:
        obj = factory()
    except BaseException:
        conn.recv()
        conn.send((False, traceback.format_exc()))
        return
    try:
        while (request := conn.recv()) is not None:
            method, args = request
            try:
                conn.send((True, getattr(obj, method)(*args)))
            except Exception:
                conn.send((False, traceback.format_exc()))
    except EOFError:
        pass
    finally:
        close = getattr(obj, "close", None)
        if close is not None:
            close()


def open_fds() -> int:
    """Descriptors this process holds now: each must stay under the hard limit."""
    return len(os.listdir("/proc/self/fd"))


class HoldsFds:
    def fds(self) -> int:
        return open_fds()


Ends = tuple[tuple[str, int], tuple[str, int]]
"""A connection as tether's socket sees it: (its address, the peer's)."""


def read_both(pending: dict[int, tuple[socket.socket, bytes, str]], timeout: float) -> float:
    """Read every socket's expected bytes at once, in order (a stalled connection does
    not hold up the others' windows); RuntimeError on a wrong byte, EOF or a stall.
    Returns the seconds until the last byte arrived."""
    started = time.monotonic()
    got: dict[int, bytearray] = {fd: bytearray() for fd in pending}
    with selectors.DefaultSelector() as sel:
        for sock, _, _ in pending.values():
            sel.register(sock, selectors.EVENT_READ)
        deadline = started + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                fd, (sock, data, what) = next(iter(pending.items()))
                raise RuntimeError(f"{len(pending)} directions stalled, e.g. {what} after "
                                   f"{len(got[fd])} of {len(data)} bytes: {ss_info(sock)}")
            for key, _ in sel.select(left):
                sock, data, what = pending[key.fd]
                have = got[key.fd]
                chunk = sock.recv(len(data) - len(have))
                if not chunk:
                    raise RuntimeError(f"{what}: EOF after {len(have)} of {len(data)} bytes")
                have += chunk
                if have != data[:len(have)]:
                    raise RuntimeError(f"{what}: stream damaged within bytes "
                                       f"{len(have) - len(chunk)}-{len(have)}")
                if len(have) == len(data):
                    sel.unregister(sock)
                    del pending[key.fd]
    return time.monotonic() - started


def check_side(socks: dict[int, socket.socket], marker: bytes,
               expect: Callable[[int], bytes], what: str, timeout: float) -> float:
    """One end's half of the check: write marker after the queued data, read the other
    end's queued data and its marker."""
    pending = {}
    for index, sock in socks.items():
        sock.setblocking(False)
        sock.send(marker)
        pending[sock.fileno()] = (sock, expect(index), f"connection {index} {what}")
    return read_both(pending, timeout)


class Peers(HoldsFds):
    """The far ends: a server the outbound connections reach, clients of the -t port."""

    def __init__(self, server_port: int) -> None:
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
        self.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, PEER_MSS)
        self.server.bind(("127.0.0.1", server_port))
        self.server.listen(4096)
        self.unnamed: list[socket.socket] = []
        self.socks: dict[int, socket.socket] = {}

    def accept(self, k: int) -> None:
        for _ in range(k):
            if not select.select([self.server], [], [], 10)[0]:
                raise RuntimeError("an outbound connection did not arrive")
            self.unnamed.append(self.server.accept()[0])  # buffer and MSS from the listener

    def connect(self, k: int, port: int) -> None:
        for _ in range(k):
            peer = socket.socket()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, PEER_MSS)
            peer.connect(("127.0.0.1", port))
            self.unnamed.append(peer)

    def name(self, ends: list[tuple[int, Ends]]) -> None:
        """Learn each connection's index from the source's view of its ends."""
        mine = {(s.getpeername(), s.getsockname()): s for s in self.unnamed}
        self.socks = {index: mine.pop(pair) for index, pair in ends}
        if mine:
            raise RuntimeError(f"{len(mine)} peer connections the source does not know")
        self.unnamed = []

    def fill(self, rcvq: int) -> None:
        for index, sock in self.socks.items():
            sock.sendall(to_tether(index, rcvq))

    def check(self, picks: list[int], sndq: int, timeout: float) -> float:
        return check_side({i: self.socks[i] for i in picks}, b"P",
                          lambda i: from_tether(i, sndq) + b"T", "tether -> peer", timeout)

    def close(self) -> None:
        for sock in [*self.unnamed, *self.socks.values()]:
            sock.close()
        self.server.close()


@dataclasses.dataclass
class Conn:
    index: int
    ours: socket.socket  # tether's socket on the source
    inbound: bool


def stack_params(forward_port: int | None) -> NetParams:
    fwd = () if forward_port is None else (PortRange(forward_port, forward_port, forward_port),)
    return NetParams(addr4=GUEST, prefix4=24, gateway4=GATEWAY, map_host_loopback4=GATEWAY,
                     tcp_forward=fwd)


class Source(HoldsFds):
    """The source tether: a stack with a -t port, its connections, its helper."""

    def __init__(self, directory: str, server_port: int, forward_port: int,
                 linger: bool) -> None:
        count_hold_failures()
        self.server_port, self.forward_port = server_port, forward_port
        self.loop = Loop()
        self.stack = Stack(self.loop, stack_params(forward_port))
        self.stack.attach(CountingSink())
        self.stack.start()
        self.forward = self.stack.listening_sockets()[0]
        self.conns: list[Conn] = []
        self.helper, self.helper_proc = start_helper(directory, "source")
        self.handover = Handover(self.stack, self.helper, require_repair=True, linger=linger,
                                 listeners=self.stack.listening_sockets)

    def connect(self, indices: list[int]) -> None:
        for i in indices:
            ours = socket.socket()
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            ours.connect(("127.0.0.1", self.server_port))
            self.conns.append(Conn(i, ours, False))

    def accept(self, indices: list[int]) -> None:
        for i in indices:
            if not select.select([self.forward], [], [], 10)[0]:
                raise RuntimeError("an inbound connection did not arrive")
            self.conns.append(Conn(i, self.forward.accept()[0], True))

    def ends(self) -> list[tuple[int, Ends]]:
        self.conns.sort(key=lambda c: c.index)
        for c in self.conns:
            c.ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            c.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        return [(c.index, (c.ours.getsockname(), c.ours.getpeername())) for c in self.conns]

    def fill(self, sndq: int) -> None:
        for c in self.conns:
            c.ours.sendall(from_tether(c.index, sndq))  # the peer does not read: it stays queued

    def hand_to_stack(self, rcvq: int, busy: bool) -> None:
        """Wait for the peers' bytes, hand every connection to the stack as an
        established flow, and let it push what it holds to the guest (peeking; the
        guest acknowledges nothing)."""
        wait_until("the peers' data to reach tether",
                   lambda: all(ioctl_int(c.ours, SIOCINQ) == rcvq for c in self.conns))
        for c in self.conns:
            self.stack.restore_tcp_flow(flow_record(c, self.server_port, self.forward_port),
                                        c.ours)
        if not self.loop.run(until=lambda: in_flight(self.stack) == [rcvq] * len(self.conns),
                             timeout=20):
            raise RuntimeError("the source stack did not push the receive queues to the guest")
        if busy and not all(ioctl_int(c.ours, SIOCOUTQ) > 0 for c in self.conns):
            raise RuntimeError("a busy connection has an empty send queue: "
                               "--sndq is within the peer's receive window")

    def save(self, path: str) -> tuple[float, int, int]:
        """(seconds of save_state(), state bytes, addresses not held silently)."""
        unheld_before = HOLD_FAILURES.count
        gc.collect()
        t0 = time.perf_counter()
        data = self.handover.save_state()
        took = time.perf_counter() - t0
        Path(path).write_bytes(data)
        return took, len(data), HOLD_FAILURES.count - unheld_before

    def front_end_gone(self) -> None:
        self.handover.front_end_gone()

    def control(self, picks: list[int], rcvq: int, timeout: float) -> tuple[float, int]:
        """Not migrated: the same check on the original sockets."""
        self.stack.forget_tcp_flows()
        socks = {c.index: c.ours for c in self.conns if c.index in set(picks)}
        took = check_side(socks, b"T", lambda i: to_tether(i, rcvq) + b"P", "peer -> tether",
                          timeout)
        return took, sum(total_retrans(c.ours) for c in self.conns)

    def close(self) -> None:
        for c in self.conns:
            c.ours.close()
        self.stack.close()
        self.loop.close()
        stop_helper(self.helper, self.helper_proc)


class Target(HoldsFds):
    """The target tether: a stack of its own and a helper; loads what the source saved."""

    def __init__(self, directory: str) -> None:
        self.loop = Loop()
        self.stack = Stack(self.loop, stack_params(None))
        self.sink = CountingSink()
        self.stack.attach(self.sink)
        self.helper, self.helper_proc = start_helper(directory, "target")
        self.handover = Handover(self.stack, self.helper, require_repair=True)
        self.restored: dict[int, socket.socket] = {}

    def load(self, path: str, ends: list[tuple[int, Ends]], rcvq: int) -> tuple[float, float]:
        """(seconds of load_state(), of rings_started()), then the stack's resume is
        checked and the sockets taken back from it for the byte check."""
        data = Path(path).read_bytes()
        n = len(ends)
        gc.collect()
        t0 = time.perf_counter()
        self.handover.load_state(data)
        t1 = time.perf_counter()
        self.handover.rings_started()
        t2 = time.perf_counter()
        if self.handover.last_result != f"resumed {n} of {n} TCP connections":
            raise RuntimeError(f"target: {self.handover.last_result!r}")
        before = self.sink.frames
        self.loop.run_once(0)  # the stack's resume: a duplicate ACK to the guest per flow
        if self.sink.frames < before + n or self.stack.internal_errors:
            raise RuntimeError(f"target stack: {self.sink.frames - before} frames to the "
                               f"guest for {n} flows, {self.stack.internal_errors} internal "
                               "errors")
        if in_flight(self.stack) != [rcvq] * n:
            raise RuntimeError("the target's flows lost track of the data in flight")
        by_ends = {pair: index for index, pair in ends}
        for sock in self.stack.forget_tcp_flows():
            self.restored[by_ends[sock.getsockname(), sock.getpeername()]] = sock
        return t1 - t0, t2 - t1

    def check(self, picks: list[int], rcvq: int, timeout: float) -> tuple[float, int]:
        took = check_side({i: self.restored[i] for i in picks}, b"T",
                          lambda i: to_tether(i, rcvq) + b"P", "peer -> tether", timeout)
        return took, sum(total_retrans(s) for s in self.restored.values())

    def close(self) -> None:
        for sock in self.restored.values():
            sock.close()
        self.stack.close()
        self.loop.close()
        stop_helper(self.helper, self.helper_proc)


class MigrationLab:
    """A worker's object that runs scenarios, each in a fresh namespace, for a caller
    that keeps its own (bench/targets.py)."""

    def run(self, n: int, busy: bool, queues: tuple[int, int], check: int,
            linger: bool) -> Result:
        """queues: (rcvq, sndq) of a busy connection."""
        rcvq, sndq = queues
        with private_netns():
            return scenario(n, busy, argparse.Namespace(rcvq=rcvq, sndq=sndq, linger=linger,
                                                        check=check))


# -- one scenario ----------------------------------------------------------------


@dataclasses.dataclass
class Result:
    conns: int
    busy: bool
    save: float
    load: float
    thaw: float
    size: int
    queued: int
    checked: int
    unheld: int
    check_s: float
    retrans: int
    migrated: bool = True
    max_fds: int = 0
    """The most descriptors one of the three processes held at the points sampled."""


def flow_record(conn: Conn, server_port: int, forward_port: int) -> TcpFlowRecord:
    """What tether's stack would hold for this connection had a guest made it."""
    seq_to_guest = random.getrandbits(32)
    seq_from_guest = random.getrandbits(32)
    if conn.inbound:
        guest = (mapped(GATEWAY), mapped(GUEST), conn.ours.getpeername()[1], forward_port)
        pif, sides = (PIF_HOST, PIF_TAP), (host_side(conn.ours), guest)
        events = ESTABLISHED | SOCK_ACCEPTED
    else:
        guest = (mapped(GATEWAY), mapped(GUEST), server_port, GUEST_PORT_BASE + conn.index)
        pif, sides = (PIF_TAP, PIF_HOST), (guest, host_side(conn.ours))
        events = ESTABLISHED
    return TcpFlowRecord(pif, sides, retries=0, ws_from_tap=7, ws_to_tap=8, events=events,
                         tap_mss=65480, sndbuf=0, flags=0, seq_dup_ack_approx=0,
                         wnd_from_tap=0xFFFF, wnd_to_tap=0xFFFF, seq_to_tap=seq_to_guest,
                         seq_ack_from_tap=seq_to_guest, seq_from_tap=seq_from_guest,
                         seq_ack_to_tap=seq_from_guest,
                         seq_init_from_tap=(seq_from_guest - 1) & MASK32)


def in_flight(stack: Stack) -> list[int]:
    return [(r.seq_to_tap - r.seq_ack_from_tap) & MASK32 for r, _ in stack.dump_tcp_flows()]


def ss_info(sock: socket.socket) -> str:
    """ss's view of both ends of a connection, for a failure message."""
    local, peer = sock.getsockname(), sock.getpeername()
    where = (f"( sport = :{local[1]} and dport = :{peer[1]} ) or "
             f"( sport = :{peer[1]} and dport = :{local[1]} )")
    out = subprocess.run(["ss", "-tinoe", "state", "all", where], capture_output=True,
                         text=True, check=False).stdout
    return " | ".join(line.strip() for line in out.splitlines()[1:])


TCPI_TOTAL_RETRANS = struct.Struct("=100xI")


def total_retrans(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_TOTAL_RETRANS.size)
    value: int = TCPI_TOTAL_RETRANS.unpack(raw)[0]
    return value


CHECK_TIMEOUT = 60.0
BATCH = 100
"""Connections opened per round each way: below the -t listener's backlog (128), so
the peers' connects complete before the source accepts them."""


def scenario(n: int, busy: bool, args: argparse.Namespace, *, control: bool = False) -> Result:
    """N connections from the peers' process to the source's, migrated to the target's.

    args: rcvq, sndq (busy bytes each way per connection), linger, check (0: every
    connection, else up to 3 of them)."""
    rcvq, sndq = (args.rcvq, args.sndq) if busy else (0, 0)
    server_port = next(PORTS)
    fwd = server_port + 1
    workers: list[Worker] = []
    with tempfile.TemporaryDirectory(prefix="tbmig") as tmp:
        try:
            peers = Worker("peers", lambda: Peers(server_port))
            workers.append(peers)
            source = Worker("source", lambda: Source(tmp, server_port, fwd, args.linger))
            workers.append(source)
            for first in range(0, n, 2 * BATCH):
                indices = range(first, min(n, first + 2 * BATCH))
                outbound = [i for i in indices if i % 2 == 0]
                inbound = [i for i in indices if i % 2 == 1]
                source.call("connect", outbound)
                peers.call("accept", len(outbound))
                peers.call("connect", len(inbound), fwd)
                source.call("accept", inbound)
            ends: list[tuple[int, Ends]] = source.call("ends")
            peers.call("name", ends)
            if busy:
                peers.call("fill", rcvq)
                source.call("fill", sndq)
            source.call("hand_to_stack", rcvq, busy)
            fds = [peers.call("fds"), source.call("fds")]
            picks = list(range(n)) if args.check == 0 else sorted({0, n // 2, n - 1})[:args.check]
            if control:
                peers.start("check", picks, sndq, CHECK_TIMEOUT)
                took, retrans = source.call("control", picks, rcvq, CHECK_TIMEOUT)
                took = max(took, peers.result())
                return Result(n, busy, 0, 0, 0, 0, 0, len(picks), 0, took, retrans,
                              migrated=False, max_fds=max(fds))
            target = Worker("target", lambda: Target(tmp))
            workers.append(target)
            state = os.path.join(tmp, "state")
            save_s, size, unheld = source.call("save", state)
            fds.append(source.call("fds"))  # the silent address holders now
            if args.linger:
                source.call("front_end_gone")  # one host: the source's sockets go first
            load_s, thaw_s = target.call("load", state, ends, rcvq)
            fds.append(target.call("fds"))
            if not args.linger:
                source.call("front_end_gone")
            peers.start("check", picks, sndq, CHECK_TIMEOUT)
            took, retrans = target.call("check", picks, rcvq, CHECK_TIMEOUT)
            took = max(took, peers.result())
            sent = parse(TETHER_FORMAT, Path(state).read_bytes()).value(TCP_FLOWS)
            flows_sent = list(sent)
            if len(flows_sent) != n:
                raise RuntimeError(f"{len(flows_sent)} flows in the state, {n} expected")
            queued = sum(len(f.socket.send_queue) + len(f.socket.recv_queue)
                         for f in flows_sent)
            if busy and not all(f.socket.send_queue and f.socket.recv_queue for f in flows_sent):
                raise RuntimeError("a busy connection was dumped with an empty queue")
            return Result(n, busy, save_s, load_s, thaw_s, size, queued, len(picks), unheld,
                          took, retrans, max_fds=max(fds))
        finally:
            for worker in reversed(workers):
                worker.close()


class CountHoldFailures(logging.Filter):
    """Handover's warning when it cannot keep a silent listener on a moving address:
    counted, and reported once in the run's line instead of line by line (at
    10,000 connections a few dozen ports are shared with another socket of the
    namespace, which connect() allows, and bind() then refuses).

    The warning is rate-limited: a line that went out says how many like it were
    left out before it, and those still left out when the run ends are not known,
    so the count is a lower bound."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "cannot hold" not in message:
            return True
        left_out = re.search(r"\((\d+) more like it were left out\)", message)
        self.count += 1 + (int(left_out.group(1)) if left_out else 0)
        return False


def count_hold_failures() -> None:
    """Count those warnings (a filter on the logger that issues them), and let
    the others through under a quieter root logger."""
    logging.getLogger("tether.handover").setLevel(logging.WARNING)
    logging.getLogger("tether.handover.device_state").addFilter(HOLD_FAILURES)


HOLD_FAILURES = CountHoldFailures()


def empty_state_size() -> int:
    loop = Loop()
    try:
        stack = Stack(loop, NetParams(addr4=GUEST, prefix4=24, gateway4=GATEWAY))
        return len(Handover(stack, None).save_state())
    finally:
        loop.close()


# -- report ------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def report(results: list[Result], empty: int, args: argparse.Namespace) -> None:
    keys = sorted({(r.conns, r.busy) for r in results})
    print(f"\ntether device state with no connections: {empty} B "
          f"(passt: {REF_FIXED} B); medians of {args.repeat} runs, times in ms\n")
    head = (f"{'conns':>5} {'load':>4} {'save':>7} {'load':>7} {'thaw':>7} {'s+l':>7} "
            f"{'s+l min-max':>15} {'src us':>7} {'dst us':>7} {'state B':>11} "
            f"{'queued B':>11} {'fixed/conn':>10} {'per flow':>8}")
    print(head)
    print("-" * len(head))
    for n, busy in keys:
        rs = [r for r in results if (r.conns, r.busy) == (n, busy)]
        save = med([r.save for r in rs]) * 1e3
        load = med([r.load for r in rs]) * 1e3
        thaw = med([r.thaw for r in rs]) * 1e3
        sl = [(r.save + r.load) * 1e3 for r in rs]
        size = int(med([r.size for r in rs]))
        queued = int(med([r.queued for r in rs]))
        fixed = med([(r.size - r.queued) / n for r in rs])
        per_flow = med([(r.size - r.queued - empty) / n for r in rs])
        print(f"{n:>5} {'busy' if busy else 'idle':>4} {save:>7.2f} {load:>7.2f} {thaw:>7.2f} "
              f"{med(sl):>7.2f} {min(sl):>7.2f}-{max(sl):<7.2f} {save * 1e3 / n:>7.0f} "
              f"{(load + thaw) * 1e3 / n:>7.0f} {size:>11} {queued:>11} {fixed:>10.1f} "
              f"{per_flow:>8.1f}")
    ref_sl = sorted(s + lo for s, lo in REF_SAVE_LOAD)
    print("\nreference (passt, lab-results.md, 2 busy connections, 3 runs): save "
          f"{min(s for s, _ in REF_SAVE_LOAD)}-{max(s for s, _ in REF_SAVE_LOAD)} ms, load "
          f"{min(lo for _, lo in REF_SAVE_LOAD)}-{max(lo for _, lo in REF_SAVE_LOAD)} ms, "
          f"save+load {ref_sl[0]:.1f} / {ref_sl[1]:.1f} / {ref_sl[2]:.1f} ms; "
          f"idle pair {REF_IDLE[0]} / {REF_IDLE[1]} ms, {REF_IDLE[2]} B; "
          f"{REF_FIXED} B + {REF_PER_FLOW} B per flow + queues")
    for busy in (True, False):
        rs = [r for r in results if r.conns == 2 and r.busy == busy]
        if not rs:
            continue
        both = med([(r.save + r.load) * 1e3 for r in rs])
        slt = med([(r.save + r.load + r.thaw) * 1e3 for r in rs])
        ref = ref_sl[1] if busy else REF_IDLE[0] + REF_IDLE[1]
        print(f"tether, 2 {'busy' if busy else 'idle'}: save+load {both:.2f} ms, with thaw "
              f"{slt:.2f} ms, against passt's {'median ' if busy else ''}{ref:.1f} ms: "
              f"{'within' if slt <= ref else 'OVER'} target (thaw counted)")
    per_flow = med([(r.size - r.queued - empty) / r.conns for r in results])
    print(f"fixed bytes per flow: {per_flow:.0f} (target <= {REF_PER_FLOW}): "
          f"{'within' if per_flow <= REF_PER_FLOW else 'OVER'} target")


# -- the real VM (--vm) -------------------------------------------------------------

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) tether: (.*)$", re.M)


def log_events(text: str) -> list[tuple[datetime.datetime, str]]:
    return [(datetime.datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f"), msg)
            for t, msg in LOG_TIME.findall(text)]


def span_ms(text: str, start: str, end: str) -> float | None:
    """ms from the first log line containing start to the next containing end."""
    began = None
    for when, msg in log_events(text):
        if began is None and start in msg:
            began = when
        elif began is not None and end in msg:
            return (when - began).total_seconds() * 1e3
    return None


def vm_migration(rate: str, seconds: int) -> None:
    """One same-host migration of a TCG guest on tether, streams both ways (as
    tests/vm/test_migration.py sets it up), with QMP's and tether's figures."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.support import wait_for  # noqa: PLC0415
    from tests.vm import pattern  # noqa: PLC0415  (QEMU and the guest only with --vm)
    from tests.vm.guest import DHCP_ARG, build_tstream, ensure_guest  # noqa: PLC0415
    from tests.vm.harness import Vm, qemu_missing_reason  # noqa: PLC0415
    from tests.vm.tetherlab import Helper, Peer, Tether, host_namespace  # noqa: PLC0415

    reason = qemu_missing_reason()
    if reason:
        sys.exit(f"--vm: {reason}")
    guest = ensure_guest()
    up_port, down_port = 6000, 5001
    work = Path(tempfile.mkdtemp(prefix="tbm"))
    with host_namespace("tbm") as ns:
        tstream = build_tstream(work)
        procs: list[Tether | Helper | Peer] = []
        vms: list[Vm] = []
        try:
            tethers = []
            for name, port in (("t1", down_port), ("t2", down_port + 1)):
                t = Tether(work, name, ns, "-t", str(port), "--migrate-no-linger")
                procs.append(t)
                procs.append(Helper(work, f"{name}-helper", t))
                t.wait_log(r"repair helper pid \d+ connected")
                tethers.append(t)
            t1, t2 = tethers
            vm1 = Vm(work, "vm1", t1.socket, guest, kernel_args=[DHCP_ARG], memory_mib=512)
            vms.append(vm1)
            vm2 = Vm(work, "vm2", t2.socket, guest, kernel_args=[DHCP_ARG], memory_mib=512,
                     incoming=f"unix:{work}/vm2.migrate")
            vms.append(vm2)
            vm1.wait_booted()

            def run(vm: Vm, command: str, timeout: float = 60) -> str:
                status, out = vm.console.run(command, timeout)
                if status != 0:
                    raise RuntimeError(f"{vm.name}: {command}: {out}")
                return out

            run(vm1, "ping -c 1 -W 5 10.200.0.1")
            progress = work / "up.progress"
            up = Peer(work, "up", ns, tstream, "-t", "8", "-p", str(progress), "serve",
                      str(up_port), "recv", "7")
            procs.append(up)
            up.wait_log("TSTREAM listening")
            run(vm1, f"tstream -r {rate} -d {seconds} -t 8 send 10.200.0.1 {up_port} 0 7 "
                     ">/tmp/up.out 2>&1 & true")
            run(vm1, f"tstream -t 8 serve {down_port} recv 9 >/tmp/down.out 2>/tmp/down.err "
                     "& true")
            run(vm1, "until grep -q listening /tmp/down.err; do usleep 20000; done")
            down = Peer(work, "down", ns, tstream, "-r", rate, "-d", str(seconds), "-t", "8",
                        "send", "127.0.0.1", str(down_port), "0", "9")
            procs.append(down)
            wait_for(lambda: "bytes=" in (progress.read_text() if progress.exists() else "")
                     and int(progress.read_text().split("bytes=")[1].split()[0]) > 1 << 20,
                     60, "the guest->host stream to carry 1 MiB")
            for vm in (vm1, vm2):
                vm.qmp("migrate-set-capabilities",
                       capabilities=[{"capability": "return-path", "state": True}])
            vm1.qmp("migrate", uri=f"unix:{work}/vm2.migrate")
            wait_for(lambda: vm1.qmp("query-migrate").get("status") in
                     ("completed", "failed", "cancelled"), 120, "the migration to end")
            info = vm1.qmp("query-migrate")
            if info.get("status") != "completed":
                raise RuntimeError(f"migration {info.get('status')}: {info}")
            t2.wait_log("migration: guest resumed here")
            up_result = up.result(seconds * 4)
            down_result = down.result(seconds * 4)
            run(vm2, "wait; true", seconds * 4)
            guest_up = pattern.parse_result(run(vm2, "cat /tmp/up.out"))
            guest_down = pattern.parse_result(run(vm2, "cat /tmp/down.out"))
            vm1.close()
            t1.wait_log("migration complete")
            src, dst = t1.text(), t2.text()
        except BaseException:
            print(f"--vm failed: logs kept in {work}", file=sys.stderr)
            raise
        finally:
            for vm in vms:
                vm.close()
            for proc in reversed(procs):
                proc.stop()
    shutil.rmtree(work)
    size = re.search(r"migration: state saved, (\d+) bytes", src)
    resumed = re.search(r"resumed (\d+ of \d+) TCP connections", dst)
    save = span_ms(src, "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE")
    load = span_ms(dst, "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE")
    thaw = span_ms(dst, "CHECK_DEVICE_STATE", "guest resumed here")
    print(f"\nVM migration (TCG, 512 MiB guest, 2 streams at {rate}B/s each way, tether -d "
          "--migrate-no-linger):")
    print(f"  QMP: total-time {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
          f"setup {info.get('setup-time')} ms; RAM {info.get('ram', {}).get('transferred')} B")
    print(f"  tether: state {size.group(1) if size else '?'} B; from SET_DEVICE_STATE_FD to "
          f"CHECK_DEVICE_STATE (log, ms resolution): save {fmt_ms(save)}, load {fmt_ms(load)}; "
          f"target CHECK to thawed (includes QEMU starting the rings) {fmt_ms(thaw)}; "
          f"{resumed.group(1) if resumed else '?'} resumed")
    print(f"  streams: up host {up_result} / guest {guest_up}; down host {down_result} / "
          f"guest {guest_down}")
    ok = (up_result.get("result") == "ok" and guest_down.get("result") == "ok"
          and up_result.get("bytes") == guest_up.get("bytes")
          and down_result.get("bytes") == guest_down.get("bytes"))
    print(f"  streams intact: {'yes' if ok else 'NO'}")
    print("  reference (passt, 2 x 2 MB/s): total 3.3-4.0 s, downtime 165-197 ms with -d, "
          "90 ms without; state 0.2-0.5 MB")


def fmt_ms(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="1,2,100,1000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rcvq", type=int, default=96 << 10,
                    help="busy: bytes in tether's receive queue per connection")
    ap.add_argument("--sndq", type=int, default=128 << 10,
                    help="busy: bytes tether has sent or queued, unacknowledged, per connection")
    ap.add_argument("--linger", action="store_true",
                    help="source keeps its sockets until the front-end goes (cross-host mode; "
                         "here the source is committed before the target loads)")
    ap.add_argument("--idle-only", action="store_true")
    ap.add_argument("--control", action="store_true",
                    help="after each busy run, the same connections checked without migrating")
    ap.add_argument("--check", type=int, default=0,
                    help="connections checked after the thaw: 0 = all (default), else up to 3")
    ap.add_argument("--vm", action="store_true",
                    help="also migrate a real VM with 2 busy connections (QMP downtime)")
    ap.add_argument("--vm-only", action="store_true", help="only the VM migration")
    ap.add_argument("--vm-rate", default="2M", help="--vm: bytes/s of each stream (tstream -r)")
    ap.add_argument("--vm-seconds", type=int, default=20, help="--vm: length of each stream")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_migration: needs root (network namespace, TCP_REPAIR)")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    if args.vm_only:
        vm_migration(args.vm_rate, args.vm_seconds)
        return
    counts = [int(c) for c in args.counts.split(",")]
    loads = [False] if args.idle_only else [False, True]
    results: list[Result] = []
    # A namespace per scenario: 10,000 connections leave as many ports in TIME-WAIT,
    # bound ones that connect() will not reuse, and three runs would exhaust the
    # ephemeral range of a namespace they shared.
    print(f"a fresh namespace per scenario; peers, source and target in three processes, "
          f"each side with its tether-repair helper; linger={args.linger}; busy = "
          f"{args.rcvq} B receive queue + {args.sndq} B send queue per connection")
    for rep in range(args.repeat):
        for n in counts:
            for busy in loads:
                with private_netns():
                    r = scenario(n, busy, args)
                results.append(r)
                print(f"  run {rep + 1}: {n:>5} {'busy' if busy else 'idle'}: save "
                      f"{r.save * 1e3:.2f} load {r.load * 1e3:.2f} thaw "
                      f"{r.thaw * 1e3:.2f} ms, {r.size} B; {r.checked} checked both "
                      f"ways in {r.check_s:.2f} s, {r.retrans} retransmissions, "
                      f"{r.unheld} addresses not held; at most {r.max_fds} descriptors "
                      "in one process", flush=True)
                if busy and args.control:
                    with private_netns():
                        c = scenario(n, busy, args, control=True)
                    print(f"  run {rep + 1}: {n:>5} busy, not migrated (control): "
                          f"checked in {c.check_s:.2f} s, {c.retrans} "
                          "retransmissions", flush=True)
    report(results, empty_state_size(), args)
    if args.vm:
        vm_migration(args.vm_rate, args.vm_seconds)


if __name__ == "__main__":
    main()
