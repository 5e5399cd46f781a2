"""iperf3 between a real TCG guest and a host service, through tether and passt.

    python bench/bench_tether_vm.py [--seconds 10] [--runs 1] [--no-passt] [--no-slirp]
                                    [--no-stream] [--baseline DIR]

Over vhost-user, passt (the build ./dev setup makes) runs beside tether by
default, on a guest of its own, the runs alternating as with --baseline.

`--baseline DIR` also runs the tether of DIR (a checkout, e.g.
`git worktree add /tmp/base <commit>`) over vhost-user, on a second guest
booted beside the first, alternating runs with this tree's: the ratio of
the two is the figure to quote for a change, since the machine is shared.

The same lab as tests/vm/test_tether_vm.py: a network namespace set up like
a host, `tether --vhost-user` in it (no -d: debug logging costs CPU per
event), the busybox guest configured by tether's DHCP, `iperf3 -s` on the
namespace's loopback (where tether maps the gateway 10.200.0.1).  The guest
runs `iperf3 -c 10.200.0.1` (guest -> host) and `-R` (host -> guest).

Reported per run: the guest's iperf3 receiver rate, and CPU seconds per GB
(1e9 bytes) moved, from /proc/PID/stat utime+stime before and after:
  - tether: the whole tether process (over vhost-user, and over
    `-netdev stream`, where QEMU copies every frame through a UNIX socket);
  - QEMU: the whole QEMU process (mostly the TCG vCPU, the real bottleneck);
  - for the reference, QEMU's built-in `-netdev user` (libslirp) on the same
    guest, run inside the same namespace (10.0.2.2 is QEMU's view of the
    namespace's loopback): slirp runs in QEMU's main thread, so its "backend"
    column is that thread's CPU.
slirp's DHCP announces no MTU, so that guest runs at 1500 while tether's
announces 65520 (as passt): a fair reference of what a user gets by default.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.vm.guest import DHCP_ARG, GuestImage, ensure_guest  # noqa: E402
from tests.vm.harness import Vm  # noqa: E402
from tests.vm.reference import Passt, passt_dir  # noqa: E402
from tests.vm.tetherlab import (  # noqa: E402
    GATEWAY,
    SRC,
    Process,
    Tether,
    host_namespace,
    in_ns,
)

IPERF_PORT = 5201
CpuClock = Callable[[], float]
Starter = Callable[[str], Tether | Passt]
"""Starts one back-end in the lab's namespace, given its process name."""
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
RATE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
# [  5]   0.00-10.00  sec   412 MBytes   345 Mbits/sec                  receiver
SUMMARY = re.compile(r"([\d.]+) ([KMG]?)Bytes\s+([\d.]+) ([KMG]?)bits/sec\s.*receiver")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    stat = Path(path).read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    backend: str
    direction: str
    gbit: float
    moved: int
    backend_cpu: float
    qemu_cpu: float
    variant: str = ""
    """The back-end's label without the MTU ("tether vhost-user", "passt vhost-user")."""
    backend_user: float = -1.0
    """Of backend_cpu, the user-space part (-1: not known)."""

    @property
    def cpu_per_gb(self) -> float:
        return self.backend_cpu / (self.moved / 1e9) if self.moved else float("inf")

    def line(self) -> str:
        gb = self.moved / 1e9
        return (f"{self.backend:<32} {self.direction:<14} {self.gbit:7.3f} "
                f"{self.moved / 1e6:9.0f} {self.backend_cpu / gb:12.2f} "
                f"{self.qemu_cpu / gb:10.2f}")


HEADER = (f"{'backend':<32} {'direction':<14} {'Gbit/s':>7} {'MB moved':>9} "
          f"{'backend s/GB':>12} {'QEMU s/GB':>10}")


def iperf(vm: Vm, server: str, seconds: float, reverse: bool) -> tuple[float, int]:
    """(receiver Gbit/s, bytes received) of one guest iperf3 run."""
    status, out = vm.console.run(
        f"iperf3 -c {server} -p {IPERF_PORT} -t {seconds:g}{' -R' if reverse else ''}",
        seconds + 60)
    m = SUMMARY.findall(out)
    if status != 0 or not m:
        raise RuntimeError(f"iperf3 failed ({status}):\n{out}")
    size, unit, rate, runit = m[-1]
    return float(rate) * RATE_UNITS[runit] / 1e9, int(float(size) * UNITS[unit])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-passt", action="store_true",
                        help="skip passt beside tether over vhost-user")
    parser.add_argument("--no-slirp", action="store_true",
                        help="skip the QEMU -netdev user reference")
    parser.add_argument("--no-stream", action="store_true",
                        help="skip tether over -netdev stream")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout whose tether runs beside this one, alternating")
    args = parser.parse_args()
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    rows: list[Row] = []
    with iperf_lab(work) as ns:
        variants = [("tether", tether_starter(work, ns, SRC, "vhost-user"))]
        if args.baseline is not None:
            variants.append(("baseline", tether_starter(work, ns,
                                                        args.baseline.resolve() / "src",
                                                        "vhost-user")))
        if not args.no_passt:
            if passt_dir() is None:
                print("no passt build (./dev setup makes one): tether without passt")
            else:
                variants.append(("passt", passt_starter(work, ns, "vhost-user")))
        rows += side_by_side(work, guest, variants, args)
        if not args.no_stream:
            rows += side_by_side(work, guest,
                                 [("tether", tether_starter(work, ns, SRC, "stream"))],
                                 args, mode="stream")
        if not args.no_slirp:
            vm = Vm(work, "vm-user", work / "unused", guest, kernel_args=[DHCP_ARG],
                    netdev="user", prefix=in_ns(ns))
            try:
                vm.wait_booted()
                pid = vm.proc.pid
                label = "QEMU -netdev user"
                for _ in range(args.runs):
                    rows += runs_on(vm, label, "10.0.2.2", args,
                                    lambda: cpu_seconds(pid, pid))
            finally:
                vm.close()
    print(f"iperf3 3.12, {args.seconds:g} s per run, TCP, 1 stream; TCG guest, 1 vCPU; "
          f"CPU s/GB = CPU seconds per 1e9 bytes received by iperf3")
    print(HEADER)
    for row in rows:
        print(row.line())
    if args.runs > 1:
        print(f"means of {args.runs} runs:")
        groups: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            groups.setdefault((row.backend, row.direction), []).append(row)
        for (backend, direction), group in groups.items():
            print(Row(backend, direction, sum(r.gbit for r in group) / len(group),
                      sum(r.moved for r in group), sum(r.backend_cpu for r in group),
                      sum(r.qemu_cpu for r in group)).line())


@contextlib.contextmanager
def iperf_lab(work: Path) -> Iterator[str]:
    """A host namespace with `iperf3 -s` on its loopback, where the back-ends map the
    gateway; yields the namespace's name."""
    with host_namespace("tbench") as ns:
        server = Process(in_ns(ns, "iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF_PORT),
                               "--forceflush"), work / "iperf3-s.log")
        try:
            server.wait_log(r"Server listening", 30)
            yield ns
        finally:
            server.stop()


def vhost_bulk(work: Path, guest: GuestImage, seconds: float, runs: int) -> list[Row]:
    """tether and passt over vhost-user, side by side: `runs` iperf3 runs each way."""
    with iperf_lab(work) as ns:
        variants = [("tether", tether_starter(work, ns, SRC, "vhost-user")),
                    ("passt", passt_starter(work, ns, "vhost-user"))]
        return side_by_side(work, guest, variants,
                            argparse.Namespace(seconds=seconds, runs=runs))


def tether_starter(work: Path, ns: str, src: Path, mode: str) -> Starter:
    """tether from the tree at src (no -d: debug logging costs CPU per event)."""
    return lambda name: Tether(work, name, ns, debug=False, vhost_user=mode == "vhost-user",
                               src=src)


def passt_starter(work: Path, ns: str, mode: str) -> Starter:
    return lambda name: Passt(work, name, ns, vhost_user=mode == "vhost-user")


def side_by_side(work: Path, guest: GuestImage, variants: list[tuple[str, Starter]],
                 args: argparse.Namespace, *, mode: str = "vhost-user") -> list[Row]:
    """One back-end and guest per variant, all booted first; then the runs
    alternate between them, each run starting with the next, so a change in
    the machine's load hits both and neither always goes first.
    The guests not measuring are paused (QMP stop): an idle TCG guest
    still burns CPU.  A run whose guest broke (iperf3 failed) is reported,
    the guest rebooted on the same tether, and the run done again."""
    tethers: list[Tether | Passt] = []
    vms: list[Vm] = []
    boots = 0

    def boot(name: str, tether: Tether | Passt) -> Vm:
        nonlocal boots
        boots += 1
        return Vm(work, f"vm-{name}-{mode}-{boots}", tether.socket, guest,
                  kernel_args=[DHCP_ARG], netdev=mode)

    try:
        for name, start in variants:
            tethers.append(start(f"t-{name}-{mode}"))
            vms.append(boot(name, tethers[-1]))
        for vm in vms:
            vm.wait_booted()
            vm.qmp("stop")
        labels = [f"{name} {mode}" for name, _ in variants]
        rows = []
        for run in range(args.runs):
            k = run % len(tethers)  # each run starts with the next back-end (bench_latency_vm)
            for i in list(range(k, len(tethers))) + list(range(k)):
                label, tether = labels[i], tethers[i]
                vms[i].qmp("cont")
                for reverse in (False, True):
                    for _attempt in range(3):
                        try:
                            rows.append(one_run(vms[i], label, GATEWAY, args,
                                                reverse=reverse,
                                                backend_cpu=tether.cpu_seconds,
                                                backend_user=tether.cpu_user,
                                                variant=label))
                            break
                        except (RuntimeError, TimeoutError) as e:  # a guest that hung, too
                            print(f"{label}: run failed, guest rebooted: "
                                  f"{str(e).splitlines()[-1]}\n{broken_guest(vms[i])}",
                                  flush=True)
                            vms[i].close()
                            vms[i] = boot(variants[i][0], tether)
                            vms[i].wait_booted()
                vms[i].qmp("stop")
        return rows
    finally:
        for vm in vms:
            vm.close()
        for tether in tethers:
            log = tether.stop()
            if "Traceback" in log:
                print(log[-3000:], file=sys.stderr)


def broken_guest(vm: Vm) -> str:
    """The guest kernel's complaints, if any (e.g. a virtqueue it declared broken)."""
    return "\n".join(line for line in vm.console.tail(20000).splitlines()
                     if "virtio" in line or "BUG" in line or "watchdog" in line)


def guest_mtu(vm: Vm) -> str:
    _, out = vm.console.run("ip link show eth0", 30)
    mtu = re.search(r"mtu (\d+)", out)
    return mtu.group(1) if mtu else "?"


def one_run(vm: Vm, label: str, server: str, args: argparse.Namespace, *, reverse: bool,
            backend_cpu: CpuClock, variant: str = "",
            backend_user: CpuClock | None = None) -> Row:
    u0 = backend_user() if backend_user is not None else 0.0
    b0, q0 = backend_cpu(), cpu_seconds(vm.proc.pid)
    gbit, moved = iperf(vm, server, args.seconds, reverse)
    b1, q1 = backend_cpu(), cpu_seconds(vm.proc.pid)
    user = backend_user() - u0 if backend_user is not None else -1.0
    row = Row(f"{label} (mtu {guest_mtu(vm)})", "host -> guest" if reverse else "guest -> host",
              gbit, moved, b1 - b0, q1 - q0, variant or label, user)
    print(row.line(), flush=True)
    return row


def runs_on(vm: Vm, label: str, server: str, args: argparse.Namespace,
            backend_cpu: CpuClock) -> list[Row]:
    """One run each way."""
    return [one_run(vm, label, server, args, reverse=reverse, backend_cpu=backend_cpu)
            for reverse in (False, True)]


if __name__ == "__main__":
    main()
