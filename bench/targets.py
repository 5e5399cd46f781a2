"""The performance targets, each measured beside its reference in one run.

    sudo .venv/bin/python bench/targets.py [--quick] [--only SECTIONS] [--skip SECTIONS]

Sections (in the order they run; --only / --skip take a comma-separated list):
  namespace  a network namespace as the guest, tether and pasta each attached
             to one (bench_net.Setup), both up at once, runs alternating:
             1-byte TCP and UDP request/response on one flow (median round
             trip, back-end CPU per transaction from /proc), and sequential
             new connections per second;
  migration  10,000 connections migrated in-process (bench_migration's
             scenario: peers, source and target stacks in three processes,
             real tether-repair helpers), idle and busy in tether's default
             mode, and idle as on one host (--migrate-no-linger);
  flows      the default flow-table capacity from the real code, and tether's
             memory per established TCP flow with 100,000 flows in one Stack
             (bench_flow_memory: real sockets up to the fd limit, stand-ins
             beyond);
  vhost      a TCG guest over vhost-user on tether and another on passt, the
             runs alternating (bench_tether_vm): iperf3 each way, the
             back-end's CPU seconds per GB and the guest's rate.

Prints one table: target, tether's figure, the reference's figure (pasta's
or passt's from the same run, or the issue's absolute bound), the ratio
tether / reference, the bound on that ratio, and whether it is met.  A
section that fails prints its error in the table and the rest still run.
The machine is shared: a ratio from one run carries the noise of that run;
--quick shortens every run, which widens it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import resource
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# The other benchmarks, whose functions do the measuring; tests.vm for the guest.
# Kept together, to follow moves in src/ and tests/ in one place.
import bench_flow_memory
import bench_migration
import bench_net
import bench_tether_vm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm.guest import ensure_guest
from tests.vm.reference import passt_dir

SECTIONS = ("namespace", "migration", "flows", "vhost")
PASST_FLOW_MAX = (1 << 17) - 1  # passt's flow table (FLOW_MAX), the capacity target
UDP_FALLBACK_SIZE = 12
"""The smallest datagram whose reply tether's tap path delivers: its sink gives
frames under 54 bytes no checksum offload header, while the stack left only the
pseudo-header sum in them, so a guest drops a shorter reply as corrupt."""


@dataclasses.dataclass
class Row:
    target: str
    tether: str
    reference: str
    ratio: float | None
    bound: str
    met: bool | None
    """None: reported, no bound (or not measured)."""
    note: str = ""
    """Printed under the table: how it was measured, or what went wrong."""


@dataclasses.dataclass
class Plan:
    """How much of each measurement: --quick or the full run."""

    reps: int  # namespace: alternating runs per back-end, medians taken
    rr: int  # namespace: transactions per request/response run
    conns: int  # namespace: connections per setup-rate run
    migration_repeat: int
    migration_n: int
    busy_rcvq: int
    busy_sndq: int
    migration_check: int  # 0: every connection checked byte for byte after the thaw
    flows: int
    vhost_seconds: float
    vhost_runs: int


QUICK = Plan(reps=3, rr=2000, conns=300, migration_repeat=1, migration_n=10_000,
             busy_rcvq=4096, busy_sndq=64 << 10, migration_check=3, flows=100_000,
             vhost_seconds=3, vhost_runs=1)
FULL = Plan(reps=5, rr=5000, conns=1000, migration_repeat=3, migration_n=10_000,
            busy_rcvq=4096, busy_sndq=64 << 10, migration_check=0, flows=100_000,
            vhost_seconds=10, vhost_runs=2)


def ratio_row(target: str, ours: float, ref: float, *, unit: str, ref_name: str,
              bound: float, at_most: bool = True, fmt: str = "{:.1f}") -> Row:
    """tether / reference against a bound on the ratio (at most, or at least)."""
    ratio = ours / ref if ref else None
    met = None if ratio is None else (ratio <= bound if at_most else ratio >= bound)
    return Row(target, f"{fmt.format(ours)} {unit}".strip(),
               f"{ref_name} {fmt.format(ref)} {unit}".strip(), ratio,
               f"{'<=' if at_most else '>='} {bound:g}x", met)


def tether_build() -> str:
    """Which tether ran: the compiled build (./dev compile) is used wherever it
    is present, by the daemons and the in-process stacks alike."""
    stamp = Path(__file__).resolve().parents[1] / "src" / "tether" / "_compiled.json"
    return "tether's compiled build (mypyc)" if stamp.exists() else "pure-Python tether"


def failed(target: str, why: str) -> Row:
    return Row(target, "error", "", None, "", False, why)


# -- namespace mode: tether vs pasta ----------------------------------------------


def namespace_rows(plan: Plan) -> list[Row]:
    if not bench_net.PASTA.is_file():
        return [failed("namespace mode", f"no pasta at {bench_net.PASTA} (./dev setup)")]
    kinds = ("tether", "pasta")
    figures: dict[str, dict[str, list[float]]] = {kind: {} for kind in kinds}
    udp_errors: dict[str, str] = {}
    setups: dict[str, bench_net.Setup] = {}

    def put(kind: str, key: str, value: float) -> None:
        figures[kind].setdefault(key, []).append(value)

    def udp(size: int) -> None:
        for kind, setup in setups.items():
            try:
                u = setup.small("udprr", plan.rr, size)
            except RuntimeError as exc:
                if size != 1:
                    raise
                udp_errors[kind] = str(exc)
                continue
            put(kind, f"udp{size}_us", u["median_us"])
            put(kind, f"udp{size}_cpu", u["cpu_us"])

    try:
        for kind in kinds:
            setups[kind] = bench_net.Setup(kind, 65520)
        for rep in range(plan.reps):
            # Alternating, each rep starting with the other: the machine's load
            # hits both, and neither always goes first.
            order = list(setups.items())
            for kind, setup in order[rep % 2:] + order[:rep % 2]:
                rr = setup.small("rr", plan.rr)
                put(kind, "tcp_us", rr["median_us"])
                put(kind, "tcp_cpu", rr["cpu_us"])
                c = setup.small("connect", plan.conns)
                put(kind, "conn_rate", c["rate"])
                put(kind, "conn_cpu", c["cpu_us"])
                put(kind, "conn_user_s", c["user_s"])
                put(kind, "conn_sys_s", c["sys_s"])
            udp(1)
            if udp_errors:  # and, both alike, the smallest datagram both answer
                udp(UDP_FALLBACK_SIZE)
    finally:
        for setup in setups.values():
            setup.close()
    t = {k: statistics.median(v) for k, v in figures["tether"].items()}
    p = {k: statistics.median(v) for k, v in figures["pasta"].items()}
    rows = [
        ratio_row("TCP RR 1-byte: CPU per transaction", t["tcp_cpu"], p["tcp_cpu"],
                  unit="us", ref_name="pasta", bound=1.5),
        ratio_row("TCP RR 1-byte: median latency", t["tcp_us"], p["tcp_us"], unit="us",
                  ref_name="pasta", bound=2),
    ]
    for size in (1, UDP_FALLBACK_SIZE):
        name = f"UDP RR {size}-byte"
        if f"udp{size}_us" in t and f"udp{size}_us" in p:
            rows += [
                ratio_row(f"{name}: CPU per transaction", t[f"udp{size}_cpu"],
                          p[f"udp{size}_cpu"], unit="us", ref_name="pasta", bound=1.5),
                ratio_row(f"{name}: median latency", t[f"udp{size}_us"], p[f"udp{size}_us"],
                          unit="us", ref_name="pasta", bound=2),
            ]
        elif size == 1:
            def shown(figs: dict[str, float], kind: str) -> str:
                return "no reply" if kind in udp_errors else f"{figs['udp1_us']:.1f} us median"

            why = "; ".join(udp_errors.values())
            if "tether" in udp_errors:
                why += (": tether's tap sink sends frames under 54 bytes without the "
                        "checksum-offload header while the stack left only the pseudo-header "
                        "sum in them, so the guest drops each reply (UdpInCsumErrors)")
            rows.append(Row(name, shown(t, "tether"), "pasta " + shown(p, "pasta"), None, "",
                            False, f"{why}; measured again, both back-ends, with "
                                   f"{UDP_FALLBACK_SIZE}-byte datagrams below"))
    row = ratio_row("connection setup rate (sequential)", t["conn_rate"], p["conn_rate"],
                    unit="/s", ref_name="pasta", bound=1, at_most=False, fmt="{:.0f}")

    def per_conn(kind: str) -> str:
        # The split from clock ticks summed over every run: one run's are too few.
        user, system = (sum(figures[kind][f"conn_{k}_s"]) for k in ("user", "sys"))
        share = user / (user + system) if user + system else 0.0
        cpu = statistics.median(figures[kind]["conn_cpu"])
        return f"{kind} {cpu:.0f} us ({share * cpu:.0f} user + {(1 - share) * cpu:.0f} kernel)"

    # The connects are sequential and client, server and back-end share the
    # machine: the rate follows the back-end's CPU per connection.
    row.note = f"back-end CPU per connection: {per_conn('tether')}, {per_conn('pasta')}"
    rows.append(row)
    return rows


# -- migration at 10,000 connections ----------------------------------------------------


# tether's default mode (cross-host, as KubeVirt moves a VM): the source keeps
# its frozen sockets until the front-end goes.  On one host (--migrate-no-linger)
# the source also closes them and holds each outbound one's address inside
# save, before the target may bind it.
MIGRATION_RUNS = (("idle", False, True), ("busy", True, True), ("idle, one host", False, False))


def migration_rows(plan: Plan) -> list[Row]:
    n = plan.migration_n
    # In a worker of its own: the lab moves its process into a private namespace.
    lab = bench_migration.Worker("migration lab", bench_migration.MigrationLab)
    results: dict[str, list[bench_migration.Result]] = {name: [] for name, _, _ in
                                                         MIGRATION_RUNS}
    try:
        for _ in range(plan.migration_repeat):
            for name, busy, linger in MIGRATION_RUNS:
                results[name].append(lab.call("run", n, busy, (plan.busy_rcvq, plan.busy_sndq),
                                              plan.migration_check, linger))
    finally:
        lab.close()
    rows = []
    for name, busy, linger in MIGRATION_RUNS:
        rs = results[name]
        total = statistics.median(r.save + r.load + r.thaw for r in rs)
        r = rs[0]
        parts = (f"save {statistics.median(x.save for x in rs) * 1e3:.0f} + load "
                 f"{statistics.median(x.load for x in rs) * 1e3:.0f} + thaw "
                 f"{statistics.median(x.thaw for x in rs) * 1e3:.0f} ms")
        load = (f"busy, {plan.busy_rcvq} B to tether + {plan.busy_sndq} B from it queued per "
                f"conn ({r.queued / n:.0f} B in the state)" if busy else "idle")
        unheld = max(x.unheld for x in rs)
        mode = ("default (linger) mode" if linger else
                "--migrate-no-linger: save also closes the sockets and holds the addresses"
                + (f" ({unheld} of {n} not held at most: another socket of the namespace "
                   "shared the port)" if unheld else ""))
        note = (f"{load}, {mode}: {parts}, median of {len(rs)}; state {r.size} B; "
                f"{r.checked} connections checked byte-exact both ways after the thaw; "
                "peers, source and target in three processes, at most "
                f"{r.max_fds} descriptors in one (hard limit "
                f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]})")
        label = f"migration {n} {name}: save+load+thaw"
        if name == "idle":
            rows.append(Row(label, f"{total * 1e3:.0f} ms", "bound 1000 ms", total / 1.0,
                            "< 1x", total < 1.0, note))
        else:
            rows.append(Row(label, f"{total * 1e3:.0f} ms", "", None, "report", None, note))
    return rows


# -- flow table ------------------------------------------------------------------------


def flow_rows(plan: Plan) -> list[Row]:
    m = bench_flow_memory.measure(plan.flows)
    capacity_ok = m.capacity_cli == m.capacity_stack == PASST_FLOW_MAX
    per_flow = m.total_per_flow
    stand_ins = m.flows - m.real
    how = (f"{m.real} real sockets + {stand_ins} stand-ins" if stand_ins else
           f"{m.real} real sockets")
    return [
        Row("flow-table capacity (default)", f"{m.capacity_stack}",
            f"passt FLOW_MAX {PASST_FLOW_MAX}", m.capacity_stack / PASST_FLOW_MAX, "= 1x",
            capacity_ok),
        Row(f"memory per TCP flow, {m.flows} flows", f"{per_flow:.0f} B", "bound 1024 B",
            per_flow / 1024, "<= 1x", per_flow <= 1024,
            f"{how} in one Stack, tracemalloc: flow objects {m.per_flow:.0f} B + socket object "
            f"{m.socket_object:.0f} B per flow; the {m.real} real ones alone "
            f"{m.real_per_flow + m.socket_object:.0f} B; the kernel's socket and epoll item "
            "not counted"),
    ]


# -- vhost-user bulk: tether vs passt ---------------------------------------------------


def vhost_rows(plan: Plan) -> list[Row]:
    if passt_dir() is None:
        return [failed("vhost-user bulk", "no passt build (./dev setup)")]
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="tether-targets-"))
    rows = bench_tether_vm.vhost_bulk(work, guest, plan.vhost_seconds, plan.vhost_runs)
    out = []
    for direction, short in (("guest -> host", "g>h"), ("host -> guest", "h>g")):
        def total(variant: str, pick: Callable[[bench_tether_vm.Row], float],
                  direction: str = direction) -> float:
            return sum(pick(r) for r in rows
                       if r.variant.startswith(variant) and r.direction == direction)

        gb = {v: total(v, lambda r: r.moved) / 1e9 for v in ("tether", "passt")}
        cpu = {v: total(v, lambda r: r.backend_cpu) / gb[v] for v in ("tether", "passt")}
        user = {v: total(v, lambda r: r.backend_user) / gb[v] for v in ("tether", "passt")}
        gbit = {v: total(v, lambda r: r.gbit) / plan.vhost_runs for v in ("tether", "passt")}
        row = ratio_row(f"vhost-user bulk {short}: CPU-s/GB", cpu["tether"], cpu["passt"],
                        unit="s/GB", ref_name="passt", bound=1, fmt="{:.2f}")
        # Where the time goes, user space against the kernel: the kernel's
        # share is the same work (the copies, TCP) for both back-ends.
        row.note = "user + kernel s/GB: " + ", ".join(
            f"{v} {user[v]:.2f} + {cpu[v] - user[v]:.2f}" for v in ("tether", "passt"))
        out.append(row)
        out.append(Row(f"vhost-user bulk {short}: guest rate", f"{gbit['tether']:.2f} Gbit/s",
                       f"passt {gbit['passt']:.2f} Gbit/s", gbit["tether"] / gbit["passt"],
                       "report", None,
                       "the TCG guest's vCPU bounds both rates; \"unchanged or better\" is "
                       "against tether's own earlier figure: bench_tether_vm.py --baseline"
                       if short == "g>h" else ""))
    return out


# -- the table ------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    head = ("target", "tether", "reference", "ratio", "bound", "result")
    notes: list[str] = []
    cells = []
    for r in rows:
        target = r.target
        if r.note:
            notes.append(r.note)
            target += f" [{len(notes)}]"
        cells.append((target, r.tether, r.reference,
                      "" if r.ratio is None else f"{r.ratio:.2f}x", r.bound,
                      "-" if r.met is None else ("met" if r.met else "NOT MET")))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head).rstrip())
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print(line.format(*c).rstrip())
    for i, note in enumerate(notes, 1):
        print(textwrap.fill(note, 100, initial_indent=f"[{i}] ", subsequent_indent="    "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Sections: " + ", ".join(SECTIONS))
    parser.add_argument("--quick", action="store_true",
                        help="short runs, one of each (about 3 min instead of about 10)")
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--skip", default="")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("targets: needs root (network namespaces, TCP_REPAIR)")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    chosen = [s for s in args.only.split(",") if s and s not in args.skip.split(",")]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"targets: unknown sections {sorted(unknown)}; known: {SECTIONS}")
    plan = QUICK if args.quick else FULL
    runners: dict[str, Callable[[Plan], list[Row]]] = {
        "namespace": namespace_rows, "migration": migration_rows, "flows": flow_rows,
        "vhost": vhost_rows}
    rows: list[Row] = []
    errors = 0
    started = time.monotonic()
    for section in SECTIONS:
        if section not in chosen:
            continue
        t0 = time.monotonic()
        print(f"== {section}", flush=True)
        try:
            rows += runners[section](plan)
        except Exception as exc:
            traceback.print_exc()
            errors += 1
            # The innermost error (a worker's traceback ends with it) says the most.
            lines = str(exc).strip().splitlines() or [""]
            rows.append(failed(section, f"{type(exc).__name__}: {lines[-1]}"))
        print(f"   {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\nperformance targets ({'--quick' if args.quick else 'full'} run of {tether_build()}, "
          f"{time.monotonic() - started:.0f} s; each ratio from this run, side by side; "
          "a shared machine's noise included)")
    print_table(rows)
    # A target not met is a figure, not a failure of the harness: only errors fail.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
