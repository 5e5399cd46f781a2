"""Soak: one VM live-migrating back and forth between two tethers, with faults.

    sudo .venv/bin/python bench/soak_migration.py [--migrations 20] [--seed 1]
        [--faults target-killed,target-refusing,cancel,helper-killed,path-dropped]

Two "hosts" with the same address and MAC behind a bridge, the peer on a
third (tests/vm/tetherlab.two_hosts), a tether on each (with its
tether-repair helper and `--require-repair`, so that a missing helper fails a
migration instead of resetting connections; default linger mode), one VM
with a checked TCP stream each way between the guest and the peer
(tests/vm/tstream.c).  The VM migrates A -> B -> A ... `--migrations` times,
and after each migration the address moves with it (only the new host's
bridge port forwards).  Before each migration, with probability --fault-rate,
one attempt fails on purpose first, and the source must carry on:

  target-killed    the target tether is SIGKILLed while the RAM is moving
  target-refusing  the target tether is one with --max-state 100 (EFBIG)
  cancel           migrate_cancel while the RAM is moving
  helper-killed    the target's tether-repair is killed (ENOTCONN at load)
  path-dropped     the target QEMU is SIGKILLed: the migration stream breaks

After a failed attempt the guest must still be running on the source and both
streams must still move; the target side is rebuilt (tether, helper, QEMU).
At the end both streams are checked byte by byte at both ends.  The report:
migrations done, faults by kind, bytes moved each way, bytes lost or
duplicated (must be 0), connections kept (must be 2 of 2).

tests/vm/test_soak.py runs 10 migrations of this in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import wait_for  # noqa: E402
from tests.vm import pattern  # noqa: E402
from tests.vm.guest import GuestImage, build_tstream, ensure_guest  # noqa: E402
from tests.vm.harness import Vm  # noqa: E402
from tests.vm.migration_lab import Lab, run_ok  # noqa: E402
from tests.vm.tetherlab import (  # noqa: E402
    HOST_ADDR,
    PEER_ADDR,
    Helper,
    Peer,
    Tether,
    _ip,
    two_hosts,
)

FAULTS = ("target-killed", "target-refusing", "cancel", "helper-killed", "path-dropped")
RATE = "256K"  # per stream
IDLE_LIMIT = "20"  # a stream stalled this long fails: a lost connection fails the soak
UP_PORT = 6000
SLOW = 1 << 20  # bytes/s of RAM while a fault is injected: minutes, the window to inject it in
FAST = 1 << 40
PER_MIGRATION_S = 6.0  # stream time budgeted per attempt (measured: 4 s under TCG)


FORWARD_PORT = 5001  # each tether's -t port, on its own host


@dataclass
class Side:
    key: str
    ns: str
    bridge_port: str
    """This host's port on the bridge: up while the address is here."""
    tether: Tether | None = None
    helper: Helper | None = None
    generation: int = 0

    def args(self, refusing: bool = False) -> tuple[str, ...]:
        extra = ("--max-state", "100") if refusing else ()
        return ("-t", str(FORWARD_PORT), "--require-repair", *extra)


@dataclass
class Report:
    migrations: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    up_bytes: int = 0
    down_bytes: int = 0
    lost_or_duplicated: int = 0
    connections_kept: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"migrations": self.migrations, "faults": dict(self.faults),
                "bytes_up": self.up_bytes, "bytes_down": self.down_bytes,
                "bytes_lost_or_duplicated": self.lost_or_duplicated,
                "connections_kept": f"{self.connections_kept} of 2",
                "problems": self.problems}


class Soak:
    def __init__(self, lab: Lab, rng: random.Random, bridge: str,
                 sides: tuple[Side, Side]) -> None:
        self.lab = lab
        self.rng = rng
        self.bridge = bridge
        self.sides = sides
        self.vms = 0

    # -- pieces -------------------------------------------------------------

    def spawn(self, side: Side, refusing: bool = False, helper: bool = True) -> Tether:
        self.retire(side)
        name = f"{side.key}{side.generation}"
        side.generation += 1
        t = Tether(self.lab.work, name, side.ns, *side.args(refusing))
        self.lab.processes.append(t)
        side.tether = t
        if helper:
            side.helper = Helper(self.lab.work, f"{name}-helper", t)
            self.lab.processes.append(side.helper)
            t.wait_log("repair helper pid \\d+ connected")
        return t

    @staticmethod
    def retire(side: Side) -> None:
        for p in (side.helper, side.tether):
            if p is not None and p.alive():
                p.stop(signal.SIGKILL)
        side.tether = side.helper = None

    def vm(self, side: Side, incoming: bool) -> Vm:
        assert side.tether is not None
        self.vms += 1
        return self.lab.vm(f"vm{self.vms}", side.tether, incoming=incoming)

    def move_address(self, to: Side) -> None:
        """The VM's host address follows it: only `to`'s bridge port forwards."""
        for side in self.sides:
            if side is not to:
                _ip("-n", self.bridge, "link", "set", side.bridge_port, "down")
        _ip("-n", self.bridge, "link", "set", to.bridge_port, "up")

    def migrate(self, source: Vm, target: Vm, bandwidth: int) -> None:
        for vm in (source, target):
            vm.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": "return-path", "state": True}])
        source.qmp("migrate-set-parameters", **{"max-bandwidth": bandwidth})
        source.qmp("migrate", uri=f"unix:{self.lab.work}/{target.name}.migrate")

    @staticmethod
    def status(vm: Vm) -> str:
        return str(vm.qmp("query-migrate").get("status", ""))

    def wait_end(self, vm: Vm) -> str:
        wait_for(lambda: self.status(vm) in ("completed", "failed", "cancelled"), 120,
                 "the migration to end")
        return self.status(vm)

    def ram_moving(self, vm: Vm) -> None:
        wait_for(lambda: vm.qmp("query-migrate").get("ram", {}).get("transferred", 0) > 0,
                 30, "RAM to start moving")

    # -- one failed attempt -----------------------------------------------------

    def fault(self, kind: str, vm: Vm, target: Side) -> None:
        """One attempt that must fail, with the source carrying on."""
        if kind == "target-refusing":
            self.spawn(target, refusing=True)
        elif kind == "helper-killed":
            assert target.helper is not None
            target.helper.stop(signal.SIGKILL)
        incoming = self.vm(target, incoming=True)
        slow = kind in ("target-killed", "cancel", "path-dropped")
        self.migrate(vm, incoming, SLOW if slow else FAST)
        if slow:
            self.ram_moving(vm)
        if kind == "target-killed":
            assert target.tether is not None
            target.tether.stop(signal.SIGKILL)
            # On to the device state, which the dead tether cannot take.
            vm.qmp("migrate-set-parameters", **{"max-bandwidth": FAST})
        elif kind == "cancel":
            vm.qmp("migrate_cancel")
        elif kind == "path-dropped":
            incoming.kill()
        outcome = self.wait_end(vm)
        if outcome == "completed":
            raise AssertionError(f"fault {kind}: the migration completed\n{self.lab.logs()}")
        wait_for(lambda: vm.qmp("query-status").get("status") == "running", 30,
                 f"the source VM to run again after {kind}")
        incoming.close()
        # The target side as it should be for the next attempt.
        if kind in ("target-killed", "target-refusing"):
            self.spawn(target)
        elif kind == "helper-killed":
            assert target.tether is not None
            target.helper = Helper(self.lab.work, f"{target.tether.log_path.stem}-helper2",
                                   target.tether)
            self.lab.processes.append(target.helper)
            target.tether.wait_log("repair helper pid \\d+ connected", count=2)

    # -- the run --------------------------------------------------------------

    def run(self, migrations: int, faults: Sequence[str], fault_rate: float,
            progress: Callable[[str], None]) -> Report:
        report = Report()
        plan = self._plan(migrations, faults, fault_rate)
        duration = 20 + PER_MIGRATION_S * (migrations + sum(1 for f in plan if f))
        for side in self.sides:
            self.spawn(side)
        here, there = self.sides
        vm = self.vm(here, incoming=False)
        streams = Streams.start(self.lab, vm, FORWARD_PORT, duration)
        for n, kind in enumerate(plan):
            moved = streams.moved()
            if kind:
                self.fault(kind, vm, there)
                report.faults[kind] += 1
                streams.wait_moving(moved, f"after fault {kind}")
                moved = streams.moved()
            target = self.vm(there, incoming=True)
            assert there.tether is not None
            resumed = here_count(there.tether)
            self.migrate(vm, target, FAST)
            outcome = self.wait_end(vm)
            if outcome != "completed":
                raise AssertionError(f"migration {n + 1}: {outcome}\n{self.lab.logs()}")
            self.move_address(there)
            vm.close()  # as libvirt does: the source commits and can serve again
            there.tether.wait_log("migration: guest resumed here, resumed 2 of 2 TCP "
                                  "connections", count=resumed + 1)
            vm = target
            here, there = there, here
            report.migrations += 1
            streams.wait_moving(moved, f"after migration {n + 1}")
            progress(f"migration {n + 1}/{migrations} done"
                     + (f" (after a {kind} fault)" if kind else ""))
        results = streams.results(vm)
        report.up_bytes = int(results["up"].get("bytes", 0))
        report.down_bytes = int(results["guest_down"].get("bytes", 0))
        for name, receiver, sender in (("up", results["up"], results["guest_up"]),
                                       ("down", results["guest_down"], results["down"])):
            ok = receiver.get("result") == "ok" and sender.get("result") == "sent"
            if ok and receiver.get("bytes") == sender.get("bytes"):
                report.connections_kept += 1
            else:
                report.problems.append(f"{name}: receiver {receiver}, sender {sender}")
                sent, got = int(sender.get("bytes", 0)), int(receiver.get("bytes", 0))
                report.lost_or_duplicated += abs(sent - got) or 1
        return report

    def _plan(self, migrations: int, faults: Sequence[str], rate: float) -> list[str]:
        """Which fault precedes each migration ('' for none); every kind at least once
        when there are enough migrations for them."""
        plan = [""] * migrations
        slots = [i for i in range(migrations) if self.rng.random() < rate]
        kinds = list(faults)
        if len(slots) < min(len(kinds), migrations):
            slots = sorted(self.rng.sample(range(migrations), min(len(kinds), migrations)))
        self.rng.shuffle(kinds)
        for i, slot in enumerate(slots):
            plan[slot] = kinds[i] if i < len(kinds) else self.rng.choice(faults)
        return plan


def here_count(t: Tether) -> int:
    """How often this tether already resumed a guest (its log keeps every line)."""
    return t.text().count("resumed 2 of 2 TCP connections")


@dataclass
class Streams:
    up: Peer
    down: Peer
    work: Path
    duration: float

    @classmethod
    def start(cls, lab: Lab, vm: Vm, forward_port: int, duration: float) -> Streams:
        """One checked stream each way for `duration` seconds (as migration_lab's, longer)."""
        vm.wait_booted()
        run_ok(vm, f"ping -c 1 -W 5 {lab.service}")
        d = f"{duration:.0f}"
        up = lab.peer("up", "-t", IDLE_LIMIT, "-p", str(lab.work / "up.progress"), "serve",
                      str(UP_PORT), "recv", "7")
        up.wait_log("TSTREAM listening")
        run_ok(vm, f"tstream -r {RATE} -d {d} -t {IDLE_LIMIT} send {lab.service} {UP_PORT} "
                   "0 7 >/tmp/up.out 2>&1 & true")
        run_ok(vm, f"tstream -t {IDLE_LIMIT} serve {forward_port} recv 9 >/tmp/down.out "
                   "2>/tmp/down.err & true")
        run_ok(vm, "until grep -q listening /tmp/down.err; do usleep 20000; done")
        down = lab.peer("down", "-p", str(lab.work / "down.progress"), "-r", RATE, "-d", d,
                        "-t", IDLE_LIMIT, "send", lab.forward, str(forward_port), "0", "9")
        streams = cls(up, down, lab.work, duration)
        streams.wait_moving((0, 0), "at the start")
        return streams

    def moved(self) -> tuple[int, int]:
        return (_progress(self.work / "up.progress"), _progress(self.work / "down.progress"))

    def wait_moving(self, since: tuple[int, int], when: str) -> None:
        """Both streams carried another 64 KiB since `since`."""
        wait_for(lambda: all(now >= then + (64 << 10)
                             for now, then in zip(self.moved(), since, strict=True)),
                 float(IDLE_LIMIT), f"both streams to move {when}")

    def results(self, vm: Vm) -> dict[str, dict[str, str]]:
        limit = self.duration + 60
        up = self.up.result(limit)
        down = self.down.result(limit)
        run_ok(vm, "wait; true", limit)
        return {"up": up, "down": down,
                "guest_up": pattern.parse_result(run_ok(vm, "cat /tmp/up.out")),
                "guest_down": pattern.parse_result(run_ok(vm, "cat /tmp/down.out"))}


def _progress(path: Path) -> int:
    try:
        return int(path.read_text().split("bytes=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def soak(work: Path, guest: GuestImage, tstream: Path, *, migrations: int, seed: int,
         faults: Sequence[str] = FAULTS, fault_rate: float = 0.5,
         progress: Callable[[str], None] = lambda _line: None) -> Report:
    with two_hosts("tsk") as hosts:
        lab = Lab(work, hosts.source, tstream, guest, peer_ns=hosts.peer, service=PEER_ADDR,
                  forward=HOST_ADDR)
        sides = (Side("a", hosts.source, "port-src"), Side("b", hosts.target, "port-dst"))
        try:
            return Soak(lab, random.Random(seed), hosts.bridge, sides).run(
                migrations, faults, fault_rate, progress)
        finally:
            lab.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--migrations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fault-rate", type=float, default=0.5)
    parser.add_argument("--faults", default=",".join(FAULTS))
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    guest = ensure_guest()
    # Kept when the soak fails: the tethers', helpers' and QEMUs' logs say why.
    work = Path(tempfile.mkdtemp(prefix="soak"))
    (work / "tstream").mkdir()
    tstream = build_tstream(work / "tstream")
    try:
        report = soak(work, guest, tstream, migrations=args.migrations, seed=args.seed,
                      faults=faults, fault_rate=args.fault_rate,
                      progress=lambda line: print(line, flush=True))
    except BaseException:
        print(f"soak failed; logs in {work}", file=sys.stderr)
        raise
    print(json.dumps(report.as_dict(), indent=2))
    ok = report.lost_or_duplicated == 0 and report.connections_kept == 2
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
