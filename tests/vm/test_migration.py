"""Live migration of a running VM between two tether instances, with open TCP
connections in both directions, and every way it can fail.

Topology (same host): one host namespace holds both tethers, each with its
tether-repair helper; vm1 runs on tether 1, vm2 waits with -incoming on
tether 2.  Two checked streams run while QEMU migrates: guest -> host (the
guest connects to the gateway, i.e. the namespace's loopback) and host ->
guest (a host peer connects to tether 1's -t port).  tstream on both ends
checks every byte against its pattern and reports a reset as an error.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import pattern
from .guest import DHCP_ARG, GuestImage, build_tstream
from .harness import Vm, wait_for
from .tetherlab import Helper, Peer, Tether, host_namespace

STREAM_SECONDS = 12
RATE = "512K"  # per stream: slow enough to outlast the migration under TCG
IDLE_LIMIT = "8"  # a stream that stalls this long fails: lost connections fail fast
UP_PORT = 6000  # host service the guest connects to
DOWN_PORT = 5001  # tether 1's -t port, where a host peer reaches the guest
UP_SEED = 7
DOWN_SEED = 9


@pytest.fixture(scope="module")
def tstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tstream(tmp_path_factory.mktemp("tstream"))


@dataclass
class Lab:
    work: Path
    ns: str
    tstream: Path
    guest: GuestImage
    processes: list[Tether | Helper | Peer] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)

    def tether(self, name: str, *extra: str, helper: bool = True) -> Tether:
        t = Tether(self.work, name, self.ns, *extra)
        self.processes.append(t)
        if helper:
            h = Helper(self.work, f"{name}-helper", t)
            self.processes.append(h)
            t.wait_log("repair helper pid \\d+ connected")
        return t

    def vm(self, name: str, tether: Tether, incoming: bool = False) -> Vm:
        vm = Vm(self.work, name, tether.socket, self.guest, kernel_args=[DHCP_ARG],
                incoming=f"unix:{self.work}/{name}.migrate" if incoming else None)
        self.vms.append(vm)
        return vm

    def peer(self, name: str, *args: str) -> Peer:
        p = Peer(self.work, name, self.ns, self.tstream, *args)
        self.processes.append(p)
        return p

    def logs(self) -> str:
        out = []
        for p in self.processes:
            if isinstance(p, Tether):
                lines = [line for line in p.text().splitlines() if "flags=" not in line]
                out.append(f"--- {p.log_path.name}\n" + "\n".join(lines[-40:]))
        return "\n".join(out)


@pytest.fixture
def lab(workdir: Path, guest: GuestImage, tstream: Path) -> Iterator[Lab]:
    with host_namespace("tmig") as ns:
        lab = Lab(workdir, ns, tstream, guest)
        try:
            yield lab
        finally:
            for vm in lab.vms:
                vm.close()
            for p in reversed(lab.processes):
                p.stop()


@dataclass
class Streams:
    up: Peer
    down: Peer
    progress: Path


def run_ok(vm: Vm, command: str, timeout: float = 60.0) -> str:
    status, out = vm.console.run(command, timeout)
    assert status == 0, out
    return out


def start_streams(lab: Lab, vm: Vm) -> Streams:
    """One stream each way, flowing for STREAM_SECONDS at RATE."""
    vm.wait_booted()
    run_ok(vm, "ping -c 1 -W 5 10.200.0.1")
    progress = lab.work / "up.progress"
    up = lab.peer("up", "-t", IDLE_LIMIT, "-p", str(progress), "serve", str(UP_PORT), "recv",
                  str(UP_SEED))
    up.wait_log("TSTREAM listening")
    run_ok(vm, f"tstream -r {RATE} -d {STREAM_SECONDS} -t {IDLE_LIMIT} send 10.200.0.1 "
               f"{UP_PORT} 0 {UP_SEED} >/tmp/up.out 2>&1 & true")
    run_ok(vm, f"tstream -t {IDLE_LIMIT} serve {DOWN_PORT} recv {DOWN_SEED} "
               ">/tmp/down.out 2>/tmp/down.err & true")
    run_ok(vm, "until grep -q listening /tmp/down.err; do usleep 20000; done")
    down = lab.peer("down", "-r", RATE, "-d", str(STREAM_SECONDS), "-t", IDLE_LIMIT, "send",
                    "127.0.0.1", str(DOWN_PORT), "0", str(DOWN_SEED))
    # Both streams carry data before anything else happens.
    wait_for(lambda: progress.exists() and "bytes=" in progress.read_text()
             and int(progress.read_text().split("bytes=")[1].split()[0]) > 256 * 1024,
             30, "the guest->host stream to get going")
    return Streams(up, down, progress)


def check_streams(lab: Lab, streams: Streams, vm: Vm) -> None:
    """Both ends of both streams saw every byte, once, in order, and no reset."""
    up = streams.up.result(STREAM_SECONDS * 4)
    down = streams.down.result(STREAM_SECONDS * 4)
    run_ok(vm, "wait; true", STREAM_SECONDS * 4)  # the results are in the files
    guest_up = pattern.parse_result(run_ok(vm, "cat /tmp/up.out"))
    guest_down = pattern.parse_result(run_ok(vm, "cat /tmp/down.out"))
    context = f"\nup {up} / {guest_up}\ndown {down} / {guest_down}\n{lab.logs()}"
    assert up["result"] == "ok" and guest_up["result"] == "sent", context
    assert up["bytes"] == guest_up["bytes"], context
    assert down["result"] == "sent" and guest_down["result"] == "ok", context
    assert down["bytes"] == guest_down["bytes"], context
    assert int(up["bytes"]) > 1 << 20 and int(down["bytes"]) > 1 << 20, context


def migrate(lab: Lab, source: Vm, target: Vm) -> dict[str, object]:
    # With a return path the source hears of a target that failed to load,
    # and resumes the VM itself (libvirt enables it too).
    for vm in (source, target):
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": "return-path", "state": True}])
    source.qmp("migrate", uri=f"unix:{lab.work}/{target.name}.migrate")
    wait_for(lambda: source.qmp("query-migrate").get("status") in ("completed", "failed",
                                                                   "cancelled"),
             120, "the migration to end")
    info: dict[str, object] = source.qmp("query-migrate")
    return info


@pytest.mark.vm
def test_same_host_migration_keeps_streams_both_ways(lab: Lab) -> None:
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger")
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t2.wait_log("migration: guest resumed here, resumed 2 of 2 TCP connections")
    check_streams(lab, streams, vm2)
    # The guest works on the new host.
    run_ok(vm2, "ping -c 1 -W 5 10.200.0.1")
    # The source learns of success when its QEMU, done, goes away.
    vm1.close()
    t1.wait_log("migration complete: migrated 2 TCP connections")


@pytest.mark.vm
def test_target_refusing_the_state_leaves_the_source_running(lab: Lab) -> None:
    """The target's CHECK_DEVICE_STATE fails (the state is over its size limit):
    the migration fails after the source froze and dumped its sockets, QEMU
    restarts the source's rings, and every connection carries on there."""
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger", "--max-state", "100")
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"refusing incoming state, nothing applied: .*\[EFBIG\]")
    t1.wait_log("migration failed .*: resuming on this side")
    check_streams(lab, streams, vm1)
    assert not re.search(r"connection .* lost", t1.text()), lab.logs()


@pytest.mark.vm
def test_target_tether_dead_leaves_the_source_running(lab: Lab) -> None:
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger")
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    t2.stop(signal.SIGKILL)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    check_streams(lab, streams, vm1)


@pytest.mark.vm
def test_without_a_helper_on_the_target_connections_reset_but_the_guest_moves(
        lab: Lab) -> None:
    """As with passt: no tether-repair, no connections; the VM still migrates."""
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger", helper=False)
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"no tether-repair helper: 2 TCP connection\(s\) cannot be restored")
    run_ok(vm2, "ping -c 1 -W 5 10.200.0.1")


@pytest.mark.vm
def test_require_repair_on_the_target_fails_the_migration_instead(lab: Lab) -> None:
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger", "--require-repair",
                    helper=False)
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"no tether-repair helper connected")
    check_streams(lab, streams, vm1)


@pytest.mark.vm
def test_cancelled_migration_leaves_the_source_running(lab: Lab) -> None:
    """migrate_cancel while RAM is still being copied: the source never froze."""
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger")
    vm1 = lab.vm("vm1", t1)
    vm2 = lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    vm1.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 20})  # minutes for the RAM
    vm1.qmp("migrate", uri=f"unix:{lab.work}/{vm2.name}.migrate")
    wait_for(lambda: vm1.qmp("query-migrate").get("ram", {}).get("transferred", 0) > 0, 30,
             "RAM to start moving")
    vm1.qmp("migrate_cancel")
    wait_for(lambda: vm1.qmp("query-migrate").get("status") == "cancelled", 30,
             "the cancel to take effect")
    check_streams(lab, streams, vm1)
    assert "migration: state saved" not in t1.text(), lab.logs()


@pytest.mark.vm
def test_ping_pong_keeps_the_same_connections(lab: Lab) -> None:
    """A -> B -> A -> B with the same two streams, each tether a target again."""
    t1 = lab.tether("t1", "-t", str(DOWN_PORT), "--migrate-no-linger")
    t2 = lab.tether("t2", "-t", str(DOWN_PORT + 1), "--migrate-no-linger")
    vms = [lab.vm("vm1", t1), lab.vm("vm2", t2, incoming=True)]
    streams = start_streams(lab, vms[0])
    tethers = [t1, t2]
    for hop in range(3):
        source, target = vms[-2], vms[-1]
        info = migrate(lab, source, target)
        assert info["status"] == "completed", f"hop {hop}: {info}\n{lab.logs()}"
        source.close()  # as libvirt does: the source tether commits, and can serve again
        tethers[hop % 2].wait_log("migration complete: migrated 2 TCP connections",
                                  count=hop // 2 + 1)
        if hop < 2:
            vms.append(lab.vm(f"vm{hop + 3}", tethers[hop % 2], incoming=True))
    check_streams(lab, streams, vms[-1])
    assert len(re.findall("resumed 2 of 2 TCP connections", t1.text() + t2.text())) == 3
