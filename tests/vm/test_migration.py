"""Live migration of a running VM between two tether instances, with open TCP
connections in both directions, and every way it can fail.  The lab (two
tethers, helpers, VMs, streams both ways) is tests/vm/migration_lab.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for

from .guest import GuestImage, build_tstream
from .migration_lab import (
    SOURCE,
    TARGET,
    Lab,
    check_streams,
    migrate,
    run_ok,
    start_streams,
)
from .tetherlab import HOST_ADDR, PEER_ADDR, Process, host_namespace, in_ns, two_hosts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tstream(tmp_path_factory.mktemp("tstream"))


@pytest.fixture
def lab(workdir: Path, guest: GuestImage, tstream: Path) -> Iterator[Lab]:
    with host_namespace("tmig") as ns:
        lab = Lab(workdir, ns, tstream, guest)
        try:
            yield lab
        finally:
            lab.close()


@pytest.mark.vm
def test_same_host_migration_keeps_streams_both_ways(lab: Lab) -> None:
    t1, t2, vm1, vm2 = lab.pair(SOURCE, TARGET)
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
@pytest.mark.parametrize("linger", [False, True], ids=["no-linger", "linger"])
def test_target_refusing_the_state_leaves_the_source_running(lab: Lab, linger: bool) -> None:
    """The target's CHECK_DEVICE_STATE fails (the state is over its size limit):
    the migration fails after the source froze and dumped its sockets, QEMU
    restarts the source's rings, and every connection carries on there, whether
    the source had closed its frozen sockets (re-created from the dump) or kept
    them (thawed)."""
    t1, t2, vm1, vm2 = lab.pair(SOURCE if not linger else SOURCE[:2],
                                (*TARGET, "--max-state", "100"))
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"refusing incoming state, nothing applied: .*\[EFBIG\]")
    t1.wait_log("migration failed .*: resuming on this side")
    check_streams(lab, streams, vm1)
    assert not re.search(r"connection .* lost", t1.text()), lab.logs()


@pytest.mark.vm
def test_target_tether_dead_leaves_the_source_running(lab: Lab) -> None:
    _, t2, vm1, vm2 = lab.pair(SOURCE, TARGET)
    streams = start_streams(lab, vm1)
    t2.stop(signal.SIGKILL)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    check_streams(lab, streams, vm1)


@pytest.mark.vm
def test_without_a_helper_on_the_target_connections_reset_but_the_guest_moves(
        lab: Lab) -> None:
    """As with passt: no tether-repair, no connections; the VM still migrates."""
    _, t2, vm1, vm2 = lab.pair(SOURCE, TARGET, target_helper=False)
    start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"no tether-repair helper: 2 TCP connection\(s\) cannot be restored")
    run_ok(vm2, "ping -c 1 -W 5 10.200.0.1")


@pytest.mark.vm
def test_require_repair_on_the_target_fails_the_migration_instead(lab: Lab) -> None:
    _, t2, vm1, vm2 = lab.pair(SOURCE, (*TARGET, "--require-repair"), target_helper=False)
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "failed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"no tether-repair helper connected")
    check_streams(lab, streams, vm1)


@pytest.mark.vm
def test_cancelled_migration_leaves_the_source_running(lab: Lab) -> None:
    """migrate_cancel while RAM is still being copied: the source never froze."""
    t1, _, vm1, vm2 = lab.pair(SOURCE, TARGET)
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
    t1, t2, vm1, vm2 = lab.pair(SOURCE, TARGET)
    vms = [vm1, vm2]
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


@pytest.mark.vm
def test_udp_flow_keeps_its_port_across_the_migration(lab: Lab) -> None:
    """iperf3's UDP server answers only the client port it started with: datagrams
    keep arriving after the move only if tether 2 re-created the flow on it."""
    _, t2, vm1, vm2 = lab.pair(SOURCE[2:], TARGET[2:])
    vm1.wait_booted()
    server = Process(in_ns(lab.ns, "iperf3", "-s", "-1", "-J", "-B", "127.0.0.1"),
                     lab.work / "iperf3.log")
    lab.processes.append(server)
    wait_for(lambda: "5201" in subprocess.run(in_ns(lab.ns, "ss", "-ltn"), capture_output=True,
                                              text=True, check=False).stdout,
             20, "iperf3 to listen")
    run_ok(vm1, "iperf3 -u -c 10.200.0.1 -b 2M -l 1000 -t 10 >/tmp/iperf.out 2>&1 & true")
    wait_for(lambda: _udp_flow_open(lab.ns), 30, "the UDP flow to open")
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t2.wait_log(r"1 of 1 UDP flows re-created")
    server.proc.wait(60)
    report = json.loads(server.text()[server.text().index("{"):])
    udp = report["end"]["sum"]
    # Datagrams sent while the VM was stopped are lost, a few hundred ms worth;
    # a new client port would lose everything after the move (half of them).
    assert udp["packets"] > 1000, udp
    assert udp["lost_percent"] < 25, f"{udp}\n{lab.logs()}"


def _udp_flow_open(ns: str) -> bool:
    out = subprocess.run(in_ns(ns, "ss", "-unp"), capture_output=True, text=True,
                         check=False).stdout
    return ":5201" in out


MANY = 300


@pytest.mark.vm
def test_three_hundred_connections_move_together(lab: Lab) -> None:
    """More sockets than one helper message carries (253): batches, all of them moved."""
    _, t2, vm1, vm2 = lab.pair(SOURCE[2:], TARGET[2:])
    vm1.wait_booted()
    server = Process(in_ns(lab.ns, sys.executable, "-m", "tests.vm.manyconns", "6100", str(MANY),
                           "7"), lab.work / "many.log", cwd=ROOT)
    lab.processes.append(server)
    server.wait_log("MANY listening")
    run_ok(vm1, f"i=0; while [ $i -lt {MANY} ]; do tstream -r 2K -d 16 -t 12 send 10.200.0.1 "
                "6100 0 7 >/tmp/m$i.out 2>&1 & i=$((i+1)); done; true", 120)
    server.wait_log(f"MANY accepted={MANY}", timeout=120)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t2.wait_log(f"resumed {MANY} of {MANY} TCP connections")
    server.wait_log("MANY ok=", timeout=120)
    if f"MANY ok={MANY} bad=0 reset=0" not in server.text():
        sockets = subprocess.run(in_ns(lab.ns, "ss", "-tnio"), capture_output=True, text=True,
                                 check=False).stdout
        _, guest_side = vm2.console.run("cat /tmp/m1.out /tmp/m2.out; netstat -tn | head -20", 60)
        raise AssertionError(f"{server.text()}\n--- host sockets\n{sockets[-6000:]}\n"
                             f"--- guest\n{guest_side}\n{lab.logs()}")
    run_ok(vm2, "wait; true", 60)
    sent = run_ok(vm2, "cat /tmp/m*.out | grep -c 'TSTREAM sent='")
    assert f"\n{MANY}\n" in sent, sent


@pytest.mark.vm
def test_cross_host_migration_moves_the_address_with_the_connections(
        workdir: Path, guest: GuestImage, tstream: Path) -> None:
    """Two hosts with the same address behind a bridge, the peer on a third: the
    VM moves, then its address does (only the target's port forwards), and both
    streams carry on with no reset.  Default (linger) mode: the source keeps its
    frozen sockets, silent, until its QEMU goes away."""
    with two_hosts() as hosts:
        lab = Lab(workdir, hosts.source, tstream, guest, peer_ns=hosts.peer,
                  service=PEER_ADDR, forward=HOST_ADDR)
        try:
            # Default (linger) mode, the same -t port: each is a host of its own.
            t1, t2, vm1, vm2 = lab.pair(SOURCE[:2], SOURCE[:2], source_ns=hosts.source,
                                        target_ns=hosts.target)
            streams = start_streams(lab, vm1)
            info = migrate(lab, vm1, vm2)
            assert info["status"] == "completed", f"{info}\n{lab.logs()}"
            t2.wait_log("resumed 2 of 2 TCP connections")
            hosts.move_address()
            check_streams(lab, streams, vm2)
            vm1.close()
            t1.wait_log("migration complete: migrated 2 TCP connections")
            resets = subprocess.run(in_ns(hosts.peer, "nstat", "-az", "TcpOutRsts",
                                          "TcpExtTCPAbortOnData", "TcpEstabResets"),
                                    capture_output=True, text=True, check=False).stdout
            assert re.search(r"TcpEstabResets\s+0\b", resets), resets
        finally:
            lab.close()


@pytest.mark.vm
def test_without_a_helper_on_the_source_peers_see_a_reset_not_a_hang(lab: Lab) -> None:
    t1, _, vm1, vm2 = lab.pair(SOURCE, TARGET, source_helper=False)
    streams = start_streams(lab, vm1)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    t1.wait_log(r"no tether-repair helper: 2 TCP connection\(s\) will not move")
    vm1.close()
    t1.wait_log(r"reset 2 TCP connection\(s\) that could not move")
    up = streams.up.result(30)
    down = streams.down.result(30)
    assert (up["result"], up.get("kind")) == ("error", "reset"), up
    assert (down["result"], down.get("kind")) == ("error", "reset"), down
