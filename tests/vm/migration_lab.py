"""A live-migration lab on one host: two tethers with their helpers, VMs,
and checked streams both ways.  Used by tests/vm/test_migration.py and by
the demo (demo/migrate_vm.py).

One host namespace holds both tethers, each with its tether-repair helper;
the source VM runs on one, the target VM waits with -incoming on the other.
Two checked streams run while QEMU migrates: guest -> host (the guest
connects to the gateway, i.e. the namespace's loopback) and host -> guest (a
host peer connects to the source tether's -t port).  tstream on both ends
checks every byte against its pattern and reports a reset as an error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import wait_for

from . import pattern
from .guest import DHCP_ARG, GuestImage
from .harness import Vm
from .reference import Passt, PasstRepair
from .tetherlab import Helper, Peer, Process, Tether

STREAM_SECONDS = 12
RATE = "512K"  # per stream: slow enough to outlast the migration under TCG
IDLE_LIMIT = "8"  # a stream that stalls this long fails: lost connections fail fast
UP_PORT = 6000  # host service the guest connects to
DOWN_PORT = 5001  # tether 1's -t port, where a host peer reaches the guest
# Two tethers in one namespace: distinct -t ports, sockets closed as soon as saved.
SOURCE = ("-t", str(DOWN_PORT), "--migrate-no-linger")
TARGET = ("-t", str(DOWN_PORT + 1), "--migrate-no-linger")
UP_SEED = 7
DOWN_SEED = 9


@dataclass
class Lab:
    work: Path
    ns: str
    tstream: Path
    guest: GuestImage
    processes: list[Process] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)

    peer_ns: str | None = None
    """Where host-side peers run, if not in `ns` (the cross-host topology)."""
    service: str = "10.200.0.1"
    """The address the guest reaches the host service at."""
    forward: str = "127.0.0.1"
    """The address a host peer reaches the source tether's -t port at."""

    def tether(self, name: str, *extra: str, helper: bool = True,
               ns: str | None = None) -> Tether:
        t = Tether(self.work, name, ns or self.ns, *extra)
        self.processes.append(t)
        if helper:
            h = Helper(self.work, f"{name}-helper", t)
            self.processes.append(h)
            t.wait_log("repair helper pid \\d+ connected")
        return t

    def passt(self, name: str, *extra: str, helper: str | None = "passt-repair",
              ns: str | None = None) -> Passt:
        """passt in vhost-user mode; helper "passt-repair", "tether-repair" or None."""
        p = Passt(self.work, name, ns or self.ns, *extra)
        self.processes.append(p)
        if helper is not None:
            self._attach_helper(p, name, helper)
        return p

    def _attach_helper(self, passt: Passt, name: str, kind: str) -> None:
        """A helper connected to passt, or AssertionError.

        passt logs its repair socket as bound before it listens on it: a
        helper started in between is refused and exits, and passt would then
        migrate with no helper (no connection moves).  So the helper is
        started again until passt says it accepted one."""
        accepted = "Accepted TCP_REPAIR helper"
        for attempt in range(1, 11):
            h = self.helper(f"{name}-helper" + (f"-{attempt}" if attempt > 1 else ""),
                            passt.repair_path, kind)
            self.processes.append(h)
            wait_for(lambda h=h: accepted in passt.text() or not h.alive(), 30,  # type: ignore[misc]
                     f"{name} to accept its {kind}")
            if accepted in passt.text():
                return
        raise AssertionError(f"{name} never accepted a {kind}:\n{passt.text()[-2000:]}")

    def helper(self, name: str, repair_path: Path, kind: str) -> Process:
        if kind == "passt-repair":
            return PasstRepair(self.work, name, repair_path)
        if kind == "tether-repair":
            return Helper(self.work, name, _Path(repair_path))
        raise ValueError(f"unknown helper {kind!r}")

    def vm(self, name: str, tether: Tether | Passt, incoming: bool = False) -> Vm:
        vm = Vm(self.work, name, tether.socket, self.guest, kernel_args=[DHCP_ARG],
                incoming=f"unix:{self.work}/{name}.migrate" if incoming else None)
        self.vms.append(vm)
        return vm

    def pair(self, source: Sequence[str], target: Sequence[str], *,
             source_helper: bool = True, target_helper: bool = True,
             source_ns: str | None = None,
             target_ns: str | None = None) -> tuple[Tether, Tether, Vm, Vm]:
        """Tether t1 serving vm1, and tether t2 with vm2 waiting to receive it."""
        t1 = self.tether("t1", *source, helper=source_helper, ns=source_ns)
        t2 = self.tether("t2", *target, helper=target_helper, ns=target_ns)
        return t1, t2, self.vm("vm1", t1), self.vm("vm2", t2, incoming=True)

    def peer(self, name: str, *args: str) -> Peer:
        p = Peer(self.work, name, self.peer_ns or self.ns, self.tstream, *args)
        self.processes.append(p)
        return p

    def close(self) -> None:
        """Stop every VM, then every process, newest first."""
        for vm in self.vms:
            vm.close()
        for p in reversed(self.processes):
            p.stop()

    def logs(self) -> str:
        out = []
        for p in self.processes:
            if isinstance(p, Tether | Passt):
                lines = [line for line in p.text().splitlines() if "flags=" not in line]
                out.append(f"--- {p.log_path.name}\n" + "\n".join(lines[-40:]))
        return "\n".join(out)


@dataclass
class _Path:
    repair_path: Path


@dataclass
class Streams:
    up: Peer
    down: Peer
    progress: Path

    def bytes_so_far(self) -> tuple[int, int]:
        """(guest -> host bytes received, host -> guest bytes sent) by the host peers."""
        return (_progress(self.progress), _progress(self.progress.with_name("down.progress")))


def _progress(path: Path) -> int:
    try:
        return int(path.read_text().split("bytes=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def run_ok(vm: Vm, command: str, timeout: float = 60.0) -> str:
    status, out = vm.console.run(command, timeout)
    assert status == 0, out
    return out


def start_streams(lab: Lab, vm: Vm) -> Streams:
    """One stream each way, flowing for STREAM_SECONDS at RATE."""
    vm.wait_booted()
    run_ok(vm, f"ping -c 1 -W 5 {lab.service}")
    progress = lab.work / "up.progress"
    up = lab.peer("up", "-t", IDLE_LIMIT, "-p", str(progress), "serve", str(UP_PORT), "recv",
                  str(UP_SEED))
    up.wait_log("TSTREAM listening")
    run_ok(vm, f"tstream -r {RATE} -d {STREAM_SECONDS} -t {IDLE_LIMIT} send {lab.service} "
               f"{UP_PORT} 0 {UP_SEED} >/tmp/up.out 2>&1 & true")
    run_ok(vm, f"tstream -t {IDLE_LIMIT} serve {DOWN_PORT} recv {DOWN_SEED} "
               ">/tmp/down.out 2>/tmp/down.err & true")
    run_ok(vm, "until grep -q listening /tmp/down.err; do usleep 20000; done")
    down = lab.peer("down", "-p", str(lab.work / "down.progress"), "-r", RATE,
                    "-d", str(STREAM_SECONDS), "-t", IDLE_LIMIT, "send",
                    lab.forward, str(DOWN_PORT), "0", str(DOWN_SEED))
    # Both streams carry data before anything else happens.
    wait_for(lambda: _progress(progress) > 256 * 1024, 30, "the guest->host stream to get going")
    return Streams(up, down, progress)


@dataclass
class StreamResults:
    up: dict[str, str]
    """The host's end of the guest -> host stream."""
    guest_up: dict[str, str]
    down: dict[str, str]
    """The host's end of the host -> guest stream."""
    guest_down: dict[str, str]


def stream_results(streams: Streams, vm: Vm) -> StreamResults:
    """Both streams' final lines, from both ends, once they have ended."""
    up = streams.up.result(STREAM_SECONDS * 4)
    down = streams.down.result(STREAM_SECONDS * 4)
    run_ok(vm, "wait; true", STREAM_SECONDS * 4)  # the results are in the files
    return StreamResults(up, pattern.parse_result(run_ok(vm, "cat /tmp/up.out")), down,
                         pattern.parse_result(run_ok(vm, "cat /tmp/down.out")))


def check_streams(lab: Lab, streams: Streams, vm: Vm) -> StreamResults:
    """Both ends of both streams saw every byte, once, in order, and no reset."""
    try:
        r = stream_results(streams, vm)
    except TimeoutError as exc:
        # The guest's own ends fail on their idle limit within seconds, so a
        # console that stays silent means a guest that stopped running: say
        # what QEMU and the back-ends saw, for a failure that may not repeat.
        status = vm.qmp("query-status")
        qemu_log = (lab.work / f"{vm.name}.qemu.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"{exc}\nQEMU {vm.name}: {status}\n{qemu_log}\n"
                             f"{lab.logs()}") from exc
    up, guest_up, down, guest_down = r.up, r.guest_up, r.down, r.guest_down
    context = f"\nup {up} / {guest_up}\ndown {down} / {guest_down}\n{lab.logs()}"
    assert up["result"] == "ok" and guest_up["result"] == "sent", context
    assert up["bytes"] == guest_up["bytes"], context
    assert down["result"] == "sent" and guest_down["result"] == "ok", context
    assert down["bytes"] == guest_down["bytes"], context
    assert int(up["bytes"]) > 1 << 20 and int(down["bytes"]) > 1 << 20, context
    return r


def migrate(lab: Lab, source: Vm, target: Vm, *,
            at_switchover: Callable[[], None] | None = None) -> dict[str, object]:
    """Migrate source to target; at_switchover runs once the source VM has
    stopped and before any device state (the back-end's) is sent."""
    # With a return path the source hears of a target that failed to load,
    # and resumes the VM itself (libvirt enables it too).
    for vm in (source, target):
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": "return-path", "state": True}])
    if at_switchover is not None:
        source.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": "pause-before-switchover", "state": True}])
    source.qmp("migrate", uri=f"unix:{lab.work}/{target.name}.migrate")
    ended = ("completed", "failed", "cancelled")
    if at_switchover is not None:
        wait_for(lambda: source.qmp("query-migrate").get("status") in ("pre-switchover", *ended),
                 120, "the source to pause before its switch-over")
        if source.qmp("query-migrate").get("status") == "pre-switchover":
            at_switchover()
            source.qmp("migrate-continue", state="pre-switchover")
    wait_for(lambda: source.qmp("query-migrate").get("status") in ended,
             120, "the migration to end")
    info: dict[str, object] = source.qmp("query-migrate")
    return info


HALF_CLOSED_DELAY = "10"  # seconds the late readers wait: longer than the migration
FIN_IN_PORT, FIN_OUT_PORT = 6010, 6011
FIN_OUT_BYTES = 100 << 10


@dataclass
class HalfClosed:
    """Connections that are half-closed while the VM moves.

    fin_out: the guest sends 100 KiB and its FIN; the host peer reads only
             after HALF_CLOSED_DELAY, so the back-end's socket has sent its
             FIN (FIN_WAIT1/2) with the data in the peer's queues.
    fin_in:  the host peer sends `fin_in_bytes` and its FIN at once; the guest
             reads only after the delay, so the back-end's socket is in
             CLOSE_WAIT, with in its receive queue what the guest's window
             did not take (100 KiB leave about a third there; 8 KiB, none).
    """

    fin_out: Peer
    fin_in: Peer | None
    fin_in_bytes: int


def start_half_closed(lab: Lab, vm: Vm, fin_in_bytes: int | None = 100 << 10) -> HalfClosed:
    """Call it on a booted guest (after start_streams); fin_in_bytes None: no fin_in."""
    fin_out = lab.peer("fin-out", "-w", HALF_CLOSED_DELAY, "-t", "60", "serve",
                       str(FIN_OUT_PORT), "recv", "22")
    fin_out.wait_log("TSTREAM listening")
    run_ok(vm, f"tstream -t 60 send {lab.service} {FIN_OUT_PORT} {FIN_OUT_BYTES} 22 "
               ">/tmp/fin-out.out 2>&1 & true")
    if fin_in_bytes is None:
        return HalfClosed(fin_out, None, 0)
    progress = lab.work / "fin-in.progress"
    fin_in = lab.peer("fin-in", "-t", "60", "-p", str(progress), "serve", str(FIN_IN_PORT),
                      "send", str(fin_in_bytes), "21")
    fin_in.wait_log("TSTREAM listening")
    run_ok(vm, f"tstream -w {HALF_CLOSED_DELAY} -t 60 recv {lab.service} {FIN_IN_PORT} 21 "
               ">/tmp/fin-in.out 2>&1 & true")
    # Half-closed before anything else happens: the host peer has written
    # everything, and shut its side down right after.
    wait_for(lambda: _progress(progress) == fin_in_bytes, 30, "the host peer to send all")
    return HalfClosed(fin_out, fin_in, fin_in_bytes)


def check_half_closed(lab: Lab, half: HalfClosed, vm: Vm) -> None:
    """Every byte arrived after the move, and each end saw the other's FIN."""
    fin_out = half.fin_out.result(120)
    run_ok(vm, "wait; true", 120)
    guest_out = pattern.parse_result(run_ok(vm, "cat /tmp/fin-out.out"))
    context = f"\nfin-out {fin_out} / {guest_out}\n"
    if half.fin_in is not None:
        fin_in = half.fin_in.result(120)
        guest_in = pattern.parse_result(run_ok(vm, "cat /tmp/fin-in.out"))
        context += f"fin-in {fin_in} / {guest_in}\n"
        assert fin_in == {"result": "sent", "bytes": str(half.fin_in_bytes)}, \
            context + lab.logs()
        assert guest_in == {"result": "ok", "bytes": str(half.fin_in_bytes)}, \
            context + lab.logs()
    assert fin_out == {"result": "ok", "bytes": str(FIN_OUT_BYTES)}, context + lab.logs()
    assert guest_out == {"result": "sent", "bytes": str(FIN_OUT_BYTES)}, context + lab.logs()
