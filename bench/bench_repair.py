"""Freeze + dump + restore + thaw of idle TCP connections, per connection.

    python bench/bench_repair.py [--counts 1,100,1000,10000] [--kernel]

Needs root: it makes a private network namespace and talks to a real
tether-repair helper (or, with --kernel, switches repair mode itself).
Source side = freeze (filter + repair on, batched) + dump + encode + close.
Target side = decode + restore (batched repair on) + thaw (batched repair off).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

from tether.repair import tcp
from tether.repair.client import RepairHelper
from tether.repair.record import FIXED_SIZE, decode


def enter_private_netns() -> str:
    name = f"trepair-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    return name


def connections(n: int) -> tuple[list[socket.socket], int]:
    """n connected sockets; their peers live in a child process (its own fd
    table), which exits when the returned pipe end is closed."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(4096)
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the peers
        os.close(done_w)
        held = [lst.accept()[0] for _ in range(n)]
        os.read(done_r, 1)
        del held
        os._exit(0)
    os.close(done_r)
    ours = [socket.create_connection(lst.getsockname()) for _ in range(n)]
    lst.close()
    return ours, done_w


def run(n: int, switch: tcp.RepairSwitch) -> tuple[float, float, int]:
    ours, peers_done = connections(n)
    t0 = time.perf_counter()
    tcp.freeze(ours, switch)
    blob = bytearray()
    for s in ours:
        blob += tcp.dump(s).encode()
        s.close()
    t1 = time.perf_counter()
    states = []
    pos = 0
    while pos < len(blob):
        state, pos = decode(blob, pos)
        states.append(state)
    restored = tcp.restore_many(states, switch)
    socks = [s for s in restored if isinstance(s, socket.socket)]
    errors = tcp.thaw_many(list(zip(socks, states, strict=True)), switch)
    t2 = time.perf_counter()
    assert len(socks) == n and not any(errors), "restore failed"
    for s in socks:
        s.close()
    os.close(peers_done)
    os.wait()
    return (t1 - t0) / n, (t2 - t1) / n, len(blob) // n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", default="1,100,1000,10000")
    ap.add_argument("--kernel", action="store_true", help="no helper: setsockopt in-process")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_repair: needs root (network namespace, TCP_REPAIR)")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    name = enter_private_netns()
    helper_proc = None
    try:
        if args.kernel:
            switch: tcp.RepairSwitch = tcp.KernelSwitch()
            how = "in-process setsockopt"
        else:
            path = os.path.join(tempfile.mkdtemp(), "bench.repair")
            helper = RepairHelper(path)
            helper_proc = subprocess.Popen([sys.executable, "-m", "tether.repair.helper", path])
            helper.wait(10)
            switch = helper
            how = "tether-repair helper"
        print(f"repair mode via {how}; fixed record {FIXED_SIZE} bytes")
        print(f"{'conns':>7} {'source us/conn':>15} {'target us/conn':>15} {'bytes/conn':>11}")
        for n in (int(c) for c in args.counts.split(",")):
            src, dst, size = run(n, switch)
            print(f"{n:>7} {src * 1e6:>15.1f} {dst * 1e6:>15.1f} {size:>11}")
        if helper_proc is not None:
            helper.close()
            helper_proc.wait(5)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    main()
