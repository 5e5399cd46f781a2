"""Issue 6: what a live migration costs tether, with 1, 2, 100 and 1000 TCP connections.

    sudo .venv/bin/python bench/bench_migration.py [--counts 1,2,100,1000] [--repeat 3]
        [--rcvq BYTES] [--sndq BYTES] [--check N] [--control] [--linger]
        [--vm | --vm-only] [--vm-rate 2M] [--vm-seconds 20]

(bench/README.md has the same in a table.)

Needs root: it creates (and deletes) its own network namespace, and two real
tether-repair helpers switch TCP_REPAIR on the sockets.

In-process part (the main numbers; no QEMU, no guest).  For each count N and
each load, N real TCP connections are opened on the namespace's loopback:
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
import os
import random
import re
import resource
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tether.handover.device_state import Handover
from tether.handover.format import TETHER_FORMAT
from tether.handover.records import TcpFlow
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


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    """Move this process into a fresh namespace (lo up); delete it on the way out."""
    name = f"tether-bench-mig-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class Helpers:
    """Two real tether-repair processes, one per side, as two tether daemons have."""

    def __init__(self, directory: str) -> None:
        self.clients: list[RepairHelper] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for side in ("source", "target"):
                path = os.path.join(directory, f"{side}.repair")
                client = RepairHelper(path)
                self.clients.append(client)
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tether.repair.helper", path]))
                client.wait(10)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for client in self.clients:
            client.close()  # the helper sees EOF and exits 0
        for proc in self.procs:
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


def mapped(addr4: bytes) -> bytes:
    return bytes(10) + b"\xff\xff" + addr4


def host_side(sock: socket.socket) -> tuple[bytes, bytes, int, int]:
    local, peer = sock.getsockname(), sock.getpeername()
    return (mapped(socket.inet_aton(local[0])), mapped(socket.inet_aton(peer[0])), local[1],
            peer[1])


# -- one scenario ----------------------------------------------------------------


@dataclasses.dataclass
class Conn:
    index: int
    ours: socket.socket  # tether's socket (source), then None once released
    peer: socket.socket
    inbound: bool
    rcvq: bytes  # what the peer wrote to tether
    sndq: bytes  # what tether wrote to the peer


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


def open_conns(n: int, server: socket.socket, forward: socket.socket, *, busy: bool,
               rcvq: int, sndq: int) -> list[Conn]:
    server_port, forward_port = server.getsockname()[1], forward.getsockname()[1]
    conns = []
    for i in range(n):
        inbound = i % 2 == 1
        if inbound:
            peer = socket.socket()
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
            peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, PEER_MSS)
            peer.connect(("127.0.0.1", forward_port))
            select.select([forward], [], [], 10)
            ours, _ = forward.accept()
        else:
            ours = socket.socket()
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            ours.connect(("127.0.0.1", server_port))
            peer, _ = server.accept()  # SO_RCVBUF and MSS inherited from the listener
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        conn = Conn(i, ours, peer, inbound, b"", b"")
        if busy:
            conn.rcvq = pattern(i, rcvq)
            conn.sndq = pattern(i + 101, sndq)
            peer.sendall(conn.rcvq)
            ours.sendall(conn.sndq)  # sits in tether's send queue: the peer does not read
        conns.append(conn)
    def arrived() -> bool:
        return all(ioctl_int(c.ours, SIOCINQ) == len(c.rcvq) for c in conns)

    wait_until("the peers' data to reach tether", arrived)
    return conns


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


def check_all(pairs: Sequence[tuple[Conn, socket.socket]], timeout: float) -> float:
    """Every connection carries its queued data and one byte more, both ways, in order.

    tether's socket writes b"T" after its send queue, the peer b"P" after what it
    had sent; all of them are read at once (a stalled connection does not hold up
    the others' windows).  Returns the seconds until the last byte arrived.
    """
    started = time.monotonic()
    expect: dict[int, tuple[socket.socket, bytes, bytearray, str]] = {}
    with selectors.DefaultSelector() as sel:
        for conn, ours in pairs:
            ours.setblocking(False)
            conn.peer.setblocking(False)
            ours.send(b"T")
            conn.peer.send(b"P")
            kind = "inbound" if conn.inbound else "outbound"
            for sock, data, what in ((conn.peer, conn.sndq + b"T", "tether -> peer"),
                                     (ours, conn.rcvq + b"P", "peer -> tether")):
                expect[sock.fileno()] = (sock, data, bytearray(),
                                         f"connection {conn.index} ({kind}) {what}")
                sel.register(sock, selectors.EVENT_READ)
        deadline = started + timeout
        while expect:
            left = deadline - time.monotonic()
            if left <= 0:
                sock, data, got, what = next(iter(expect.values()))
                raise RuntimeError(f"{len(expect)} directions stalled, e.g. {what} after "
                                   f"{len(got)} of {len(data)} bytes: {ss_info(sock)}")
            for key, _ in sel.select(left):
                sock, data, got, what = expect[key.fd]
                chunk = sock.recv(len(data) - len(got))
                if not chunk:
                    raise RuntimeError(f"{what}: EOF after {len(got)} of {len(data)} bytes")
                got += chunk
                if got != data[:len(got)]:
                    raise RuntimeError(f"{what}: stream damaged within bytes "
                                       f"{len(got) - len(chunk)}-{len(got)}")
                if len(got) == len(data):
                    sel.unregister(sock)
                    del expect[key.fd]
    return time.monotonic() - started


CHECK_TIMEOUT = 60.0


def scenario(n: int, busy: bool, args: argparse.Namespace, helpers: Helpers, *,
             control: bool = False) -> Result:
    loop, loop2 = Loop(), Loop()
    server_port = next(PORTS)
    fwd = server_port + 1
    params = NetParams(addr4=GUEST, prefix4=24, gateway4=GATEWAY, map_host_loopback4=GATEWAY,
                       tcp_forward=(PortRange(fwd, fwd, fwd),))
    source = Stack(loop, params)
    target = Stack(loop2, dataclasses.replace(params, tcp_forward=()))
    sink, sink2 = CountingSink(), CountingSink()
    source.attach(sink)
    target.attach(sink2)
    server = socket.socket()
    conns: list[Conn] = []
    restored: list[socket.socket] = []
    try:
        source.start()
        forward = source.listening_sockets()[0]
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_RCVBUF)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, PEER_MSS)
        server.bind(("127.0.0.1", server_port))
        server.listen(1024)
        conns = open_conns(n, server, forward, busy=busy, rcvq=args.rcvq, sndq=args.sndq)
        for conn in conns:
            source.restore_tcp_flow(flow_record(conn, server_port, fwd), conn.ours)
        # The source stack pushes what it holds to the guest (peeking); the guest acks nothing.
        if not loop.run(until=lambda: in_flight(source) == [len(c.rcvq) for c in conns],
                        timeout=20):
            raise RuntimeError("the source stack did not push the receive queues to the guest")
        if busy and not all(ioctl_int(c.ours, SIOCOUTQ) > 0 for c in conns):
            raise RuntimeError("a busy connection has an empty send queue")
        if control:  # the same connections, not migrated: what the checks cost without
            source.forget_tcp_flows()
            took = check_all([(c, c.ours) for c in conns], CHECK_TIMEOUT)
            return Result(n, busy, 0, 0, 0, 0, 0, n, 0, took,
                          sum(total_retrans(c.ours) for c in conns), migrated=False)
        src = Handover(source, helpers.clients[0], require_repair=True, linger=args.linger,
                       listeners=source.listening_sockets)
        dst = Handover(target, helpers.clients[1], require_repair=True)

        gc.collect()
        unheld_before = HOLD_FAILURES.count
        t0 = time.perf_counter()
        data = src.save_state()
        t1 = time.perf_counter()
        if args.linger:
            src.front_end_gone()  # one host: the source's sockets must go before the target's
        gc.collect()
        t2 = time.perf_counter()
        dst.load_state(data)
        t3 = time.perf_counter()
        dst.rings_started()
        t4 = time.perf_counter()
        if not args.linger:
            src.front_end_gone()
        if dst.last_result != f"resumed {n} of {n} TCP connections":
            raise RuntimeError(f"target: {dst.last_result!r}")
        before = sink2.frames
        loop2.run_once(0)  # the stack's resume: a duplicate ACK to the guest per flow
        if sink2.frames < before + n or target.internal_errors:
            raise RuntimeError(f"target stack: {sink2.frames - before} frames to the guest for "
                               f"{n} flows, {target.internal_errors} internal errors")
        flows = target.dump_tcp_flows()
        if in_flight(target) != [len(c.rcvq) for c in conns]:
            raise RuntimeError("the target's flows lost track of the data in flight")
        by_ends = {(c.peer.getsockname(), c.peer.getpeername()): c for c in conns}
        restored = target.forget_tcp_flows()
        picks = range(n) if args.check == 0 else sorted({0, n // 2, n - 1})[:args.check]
        socks = {by_ends[sock.getpeername(), sock.getsockname()].index: sock for _, sock in flows}
        took = check_all([(conns[i], socks[i]) for i in picks], CHECK_TIMEOUT)
        retrans = sum(total_retrans(sock) for sock in restored)
        flows_sent: list[TcpFlow] = parse(TETHER_FORMAT, data).value("tcp flows") or []
        if len(flows_sent) != n:
            raise RuntimeError(f"{len(flows_sent)} flows in the state, {n} expected")
        queued = sum(len(f.socket.send_queue) + len(f.socket.recv_queue) for f in flows_sent)
        if busy and not all(f.socket.send_queue and f.socket.recv_queue for f in flows_sent):
            raise RuntimeError("a busy connection was dumped with an empty queue")
        return Result(n, busy, t1 - t0, t3 - t2, t4 - t3, len(data), queued, len(picks),
                      HOLD_FAILURES.count - unheld_before, took, retrans)
    finally:
        for sock in restored:
            sock.close()
        for conn in conns:
            conn.ours.close()
            conn.peer.close()
        server.close()
        source.close()
        target.close()
        loop.close()
        loop2.close()


class CountHoldFailures(logging.Handler):
    """Handover's warning when it cannot keep a silent listener on a moving address."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "cannot hold" in record.getMessage():
            self.count += 1


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
    from tests.vm import pattern  # noqa: PLC0415  (QEMU and the guest only with --vm)
    from tests.vm.guest import DHCP_ARG, build_tstream, ensure_guest  # noqa: PLC0415
    from tests.vm.harness import Vm, qemu_missing_reason, wait_for  # noqa: PLC0415
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
    logging.getLogger("tether.handover").addHandler(HOLD_FAILURES)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.vm_only:
        vm_migration(args.vm_rate, args.vm_seconds)
        return
    counts = [int(c) for c in args.counts.split(",")]
    loads = [False] if args.idle_only else [False, True]
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp, private_netns() as ns:
        helpers = Helpers(tmp)
        try:
            print(f"namespace {ns}; two tether-repair helpers; linger={args.linger}; busy = "
                  f"{args.rcvq} B receive queue + {args.sndq} B send queue per connection")
            for rep in range(args.repeat):
                for n in counts:
                    for busy in loads:
                        r = scenario(n, busy, args, helpers)
                        results.append(r)
                        print(f"  run {rep + 1}: {n:>5} {'busy' if busy else 'idle'}: save "
                              f"{r.save * 1e3:.2f} load {r.load * 1e3:.2f} thaw "
                              f"{r.thaw * 1e3:.2f} ms, {r.size} B; {r.checked} checked both "
                              f"ways in {r.check_s:.2f} s, {r.retrans} retransmissions, "
                              f"{r.unheld} addresses not held", flush=True)
                        if busy and args.control:
                            c = scenario(n, busy, args, helpers, control=True)
                            print(f"  run {rep + 1}: {n:>5} busy, not migrated (control): "
                                  f"checked in {c.check_s:.2f} s, {c.retrans} "
                                  "retransmissions", flush=True)
        finally:
            helpers.close()
    report(results, empty_state_size(), args)
    if args.vm:
        vm_migration(args.vm_rate, args.vm_seconds)


if __name__ == "__main__":
    main()
