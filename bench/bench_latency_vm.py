"""Latency through tether with a real TCG guest, beside passt in the same run.

    python bench/bench_latency_vm.py [--runs 3] [--conns 50] [--exchanges 2000]
                                     [--no-passt] [--no-stream] [--baseline DIR]

What a user waits for, rather than bulk throughput:
  - `ttfb g>h`, `ttfb h>g`: time to first byte of a new connection, from the
    client's connect() until its first 1-byte request is echoed back (the
    handshake and one round trip): the guest connecting to a host echo
    service through the gateway, and a host client connecting through `-t`
    to an echo service in the guest.  Median and worst of `--conns`
    connections made one after another;
  - `conn/s g>h`: those guest connections per second (each connects,
    exchanges one byte, closes);
  - `rr/s`, `rr us`: one connection, `--exchanges` 1-byte requests from the
    guest, each echoed by the host: transactions per second and the median
    round trip;
  - `cpu us/rr`: the back-end's CPU time (utime + stime of the whole process)
    per transaction of that run.

Each back-end gets its own guest, all booted first; then the runs alternate
between them, the other guests paused (QMP stop), so a change in the
machine's load hits all alike.  The ratios printed last (tether / passt,
per metric, from the medians over the runs) are the figures to quote.
Over `-netdev stream` too, unless --no-stream.  passt is the build
`./dev setup` makes from Debian's source package; without it the benchmark
says so and reports tether alone.  `--baseline DIR` adds the tether of
another checkout (e.g. `git worktree add /tmp/base <commit>`).

The lab is tests/vm/test_tether_vm.py's: a network namespace set up like a
host, the back-end in it, host peers (tstream) on the namespace's loopback,
where both back-ends map the gateway 10.200.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.vm.guest import DHCP_ARG, GuestImage, build_tstream, ensure_guest  # noqa: E402
from tests.vm.harness import Vm  # noqa: E402
from tests.vm.pattern import parse_result  # noqa: E402
from tests.vm.reference import Passt, passt_dir  # noqa: E402
from tests.vm.tetherlab import (  # noqa: E402
    GATEWAY,
    SRC,
    Peer,
    Tether,
    host_namespace,
)

ECHO_PORT = 6100  # host echo service
FWD_ECHO = 5103  # -t: the guest's echo service

METRICS = ("ttfb g>h med", "ttfb g>h max", "ttfb h>g med", "ttfb h>g max", "conn/s g>h",
           "rr/s", "rr us", "cpu us/rr")


@dataclass
class Backend:
    """One back-end in a host namespace of its own (their -t ports must not clash)."""

    label: str
    ns: str
    start: Callable[[str], Tether | Passt]
    process: Tether | Passt | None = None
    vm: Vm | None = None
    runs: list[dict[str, float]] = field(default_factory=list)


def guest(vm: Vm, command: str, timeout: float = 120.0) -> str:
    status, out = vm.console.run(command, timeout)
    if status != 0:
        raise RuntimeError(f"guest: `{command}` exited {status}:\n{out}")
    return out


def measure(work: Path, tstream: Path, backend: Backend, args: argparse.Namespace, *,
            run: int) -> dict[str, float]:
    assert backend.vm is not None and backend.process is not None
    ns = backend.ns
    vm, tag = backend.vm, f"{backend.label.replace(' ', '-')}-{run}"
    figures: dict[str, float] = {}

    # Guest -> host: new connections, one exchange each.
    server = Peer(work, f"echo-{tag}", ns, tstream, "serve", str(ECHO_PORT), "echo",
                  str(args.conns))
    server.wait_log(r"TSTREAM listening", 30)
    out = guest(vm, f"tstream rr {GATEWAY} {ECHO_PORT} {args.conns} 1")
    server.result(30)
    r = parse_result(out)
    figures["ttfb g>h med"] = float(r["first_median_us"])
    figures["ttfb g>h max"] = float(r["first_max_us"])
    figures["conn/s g>h"] = args.conns / float(r["seconds"])

    # Host -> guest through -t.
    guest(vm, f"tstream serve {FWD_ECHO} echo {args.conns} > /tmp/echo.out 2>&1 & "
              "echo $! > /tmp/echo.pid")
    guest(vm, "i=0; until grep -q listening /tmp/echo.out; do i=$((i+1)); "
              "[ $i -gt 100 ] && exit 1; sleep 0.1; done")
    client = Peer(work, f"rr-in-{tag}", ns, tstream, "rr", "127.0.0.1", str(FWD_ECHO),
                  str(args.conns), "1")
    r = client.result(120)
    guest(vm, "wait $(cat /tmp/echo.pid)")
    figures["ttfb h>g med"] = float(r["first_median_us"])
    figures["ttfb h>g max"] = float(r["first_max_us"])

    # Request/response on one connection, and the back-end's CPU per transaction.
    server = Peer(work, f"rr-{tag}", ns, tstream, "serve", str(ECHO_PORT), "echo", "1")
    server.wait_log(r"TSTREAM listening", 30)
    cpu0 = backend.process.cpu_seconds()
    out = guest(vm, f"tstream rr {GATEWAY} {ECHO_PORT} 1 {args.exchanges}", 600)
    cpu1 = backend.process.cpu_seconds()
    server.result(30)
    r = parse_result(out)
    figures["rr/s"] = (args.exchanges - 1) / float(r["rtt_seconds"])
    figures["rr us"] = float(r["rtt_median_us"])
    figures["cpu us/rr"] = (cpu1 - cpu0) * 1e6 / args.exchanges
    return figures


def run_side_by_side(work: Path, image: GuestImage, tstream: Path, backends: list[Backend],
                     args: argparse.Namespace, *, mode: str) -> None:
    try:
        for b in backends:
            b.process = b.start(b.ns)
            b.vm = Vm(work, f"vm-{b.label.replace(' ', '-')}", b.process.socket, image,
                      kernel_args=[DHCP_ARG], netdev=mode)
        for b in backends:
            assert b.vm is not None
            b.vm.wait_booted()
            b.vm.qmp("stop")
        for run in range(args.runs):
            # Each run starts with the next back-end: measured, the one that
            # goes first after the guests were paused comes out slower, and a
            # fixed order put that on tether every time.
            k = run % len(backends)
            for b in backends[k:] + backends[:k]:
                assert b.vm is not None
                b.vm.qmp("cont")
                b.runs.append(measure(work, tstream, b, args, run=run))
                print(f"{b.label:<24} " + " ".join(
                    f"{b.runs[-1][m]:>12.0f}" for m in METRICS), flush=True)
                b.vm.qmp("stop")
    finally:
        for b in backends:
            if b.vm is not None:
                b.vm.close()
            if b.process is not None:
                b.process.stop()


def _tether(work: Path, name: str, src: Path, vhost: bool) -> Callable[[str], Tether]:
    return lambda ns: Tether(work, name, ns, "-t", str(FWD_ECHO), debug=False,
                             vhost_user=vhost, src=src)


def _passt(work: Path, name: str, vhost: bool) -> Callable[[str], Passt]:
    return lambda ns: Passt(work, name, ns, "-t", str(FWD_ECHO), vhost_user=vhost)


def median_of(backend: Backend, metric: str) -> float:
    return statistics.median(r[metric] for r in backend.runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--exchanges", type=int, default=2000)
    parser.add_argument("--no-passt", action="store_true")
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout whose tether runs beside this one")
    args = parser.parse_args()
    image = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="tether-lat-"))
    tstream = build_tstream(work / "ts")
    have_passt = passt_dir() is not None and not args.no_passt
    if not have_passt and not args.no_passt:
        print("no passt build (./dev setup makes one): tether's figures alone")
    modes = ["vhost-user"] + ([] if args.no_stream else ["stream"])
    print(f"TCG guest, 1 vCPU; {args.runs} runs; {args.conns} new connections each way, "
          f"{args.exchanges} 1-byte exchanges; times in us")
    print(f"{'backend':<24} " + " ".join(f"{m:>12}" for m in METRICS))
    results: dict[str, list[Backend]] = {}
    with contextlib.ExitStack() as namespaces:
        for mode in modes:
            vhost = mode == "vhost-user"
            backends = [Backend(f"tether {mode}", namespaces.enter_context(host_namespace("tlat")),
                                _tether(work, f"tether-{mode}", SRC, vhost))]
            if args.baseline is not None:
                backends.append(Backend(
                    f"baseline {mode}", namespaces.enter_context(host_namespace("tlat")),
                    _tether(work, f"baseline-{mode}", args.baseline.resolve() / "src", vhost)))
            if have_passt:
                backends.append(Backend(f"passt {mode}",
                                        namespaces.enter_context(host_namespace("tlat")),
                                        _passt(work, f"passt-{mode}", vhost)))
            run_side_by_side(work, image, tstream, backends, args, mode=mode)
            results[mode] = backends
    print("medians over the runs:")
    for backends in results.values():
        for b in backends:
            print(f"{b.label:<24} " + " ".join(f"{median_of(b, m):>12.0f}" for m in METRICS))
    print("ratios (x = tether / other; below 1 is better for times and CPU, above 1 for rates):")
    for backends in results.values():
        ours = backends[0]
        for other in backends[1:]:
            print(f"{ours.label + ' / ' + other.label.split()[0]:<24} " + " ".join(
                f"{median_of(ours, m) / max(median_of(other, m), 1e-9):>11.2f}x"
                for m in METRICS))
    print(f"logs: {work}")


if __name__ == "__main__":
    main()
