"""A running VM moves between passt and tether, both ways, with its TCP connections.

The lab is tests/vm/migration_lab.py's (one host namespace, checked streams
both ways: the guest to a host service, a host peer through the source's -t
port into the guest), with a real passt (tests/vm/reference.py, built by
./dev setup from Debian's source package) on one side.  That passt
(0.0~git20250503) closes its migrated sockets and exits once a migration as
source completes (later passt does so with `--migrate-exit
--migrate-no-linger`); tether runs with `--migrate-no-linger`, as two
back-ends on one host must.
Each back-end has its own helper, or the other's: the helper protocol is
the same.

Half-closed connections cross too (migration_lab.HalfClosed).  That passt
does not carry one state: a connection the host peer half-closed
(CLOSE_WAIT) with data still queued for the guest.  As a source it leaves
the queue's last byte out of its stream; as a target it never resumes such
a connection (passt to passt hangs there just the same).  So the passt
source's half-closed connections have nothing queued towards the guest,
and a passt target gets only connections the guest half-closed; tether's
own tests move the rest (tests/vm/test_migration.py, tests/repair).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for

from .guest import GuestImage, build_tstream
from .migration_lab import (
    DOWN_PORT,
    Lab,
    StreamResults,
    check_half_closed,
    check_streams,
    migrate,
    run_ok,
    start_half_closed,
    start_streams,
)
from .reference import Passt, passt_dir
from .tetherlab import HOST_ADDR, PEER_ADDR, Tether, host_namespace, in_ns, two_hosts

pytestmark = pytest.mark.vm

PASST_OPTS = ("-d",)  # its log says why a migration failed
TETHER_OPTS = ("--migrate-no-linger",)


@pytest.fixture(scope="module")
def tstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tstream(tmp_path_factory.mktemp("tstream"))


@pytest.fixture
def lab(workdir: Path, guest: GuestImage, tstream: Path) -> Iterator[Lab]:
    if passt_dir() is None:
        pytest.fail("no passt build (./dev setup builds it from Debian's source package)")
    with host_namespace("tpst") as ns:
        lab = Lab(workdir, ns, tstream, guest)
        try:
            yield lab
        finally:
            lab.close()


def _report(what: str, info: dict[str, object], tether: Tether, results: StreamResults) -> None:
    """One line for the record (pytest -s shows it): what QEMU and tether measured."""
    size = re.findall(r"migration: (?:passt )?state (?:saved|loaded), (\d+) bytes", tether.text())
    print(f"\nINTEROP {what}: downtime {info.get('downtime')} ms, total "
          f"{info.get('total-time')} ms, state {size[-1] if size else '?'} bytes, checked "
          f"{results.up['bytes']} B guest->host, {results.down['bytes']} B host->guest")


def _silence_the_gap(lab: Lab, ns: str | None = None) -> None:
    """On one host, a passt source closes its sockets as it saves them, and
    holds nothing in their place (tether's source keeps silent listeners on
    those addresses, migration_lab.py): a host peer's segment that falls in
    the gap before the target has restored the socket draws a reset from the
    kernel, and the connection is lost however well the target does.  Across
    hosts the address has moved and no such reset exists, so here the
    namespace drops the kernel's resets, and the peer's retransmission finds
    the restored socket.  A reset tether sent would be dropped too, but the
    stream would then stall, and fail on its idle limit."""
    subprocess.run(in_ns(ns or lab.ns, "nft", "-f", "-"), check=True, capture_output=True,
                   text=True, timeout=30, input="table inet passt_gap {\n"
                   " chain out { type filter hook output priority 0; tcp flags rst drop; }\n}\n")


class _QuietWhilePasstDumps:
    """No TCP segment reaches a passt source's sockets from the moment the VM
    stops until that passt has exited.

    A socket in repair mode still takes in and acknowledges what arrives.
    passt-repair only switches repair mode, so a peer's segment that lands
    between passt's read of a receive queue and its read of that queue's
    sequence number is acknowledged to the peer yet missing from the stream,
    and the target's restored socket then starts that many bytes late: the
    guest reads later data in its place (one such segment cost 10 KiB in a
    run of this suite).  One arriving after the dump is acknowledged and
    lost with the closed socket.  That is passt's source, not what moves
    onto tether: tether-repair silences each socket with repair mode (the
    crossed-helper runs keep their peers talking throughout), and so does
    tether as a source whichever helper it has.  Across hosts the same
    segments would reach the source until its address moves, so a passt
    source with passt-repair needs the same quiet there."""

    TABLE = "inet passt_dump"

    def __init__(self, ns: str, passt: Passt) -> None:
        self.ns, self.passt = ns, passt

    def __call__(self) -> None:
        self._nft(f"table {self.TABLE} {{\n chain in {{ type filter hook input priority 0; "
                  "meta l4proto tcp drop; }\n}\n")

    def release(self) -> None:
        wait_for(lambda: self.passt.proc.poll() is not None, 30, "the passt source to exit")
        self._nft(f"delete table {self.TABLE}\n")

    def _nft(self, script: str) -> None:
        subprocess.run(in_ns(self.ns, "nft", "-f", "-"), check=True, capture_output=True,
                       text=True, timeout=30, input=script)


def _tether(lab: Lab, name: str, port: int, helper: str, *extra: str) -> Tether:
    t = lab.tether(name, "-t", str(port), *TETHER_OPTS, *extra, helper=False)
    lab.processes.append(lab.helper(f"{name}-helper", t.repair_path, helper))
    t.wait_log("repair helper pid \\d+ connected")
    return t


def _passt(lab: Lab, name: str, port: int, helper: str) -> Passt:
    return lab.passt(name, "-t", str(port), *PASST_OPTS, helper=helper)


@pytest.mark.parametrize("helpers", [("passt-repair", "tether-repair"),
                                     ("tether-repair", "passt-repair")],
                         ids=["own-helpers", "crossed-helpers"])
def test_vm_moves_from_passt_to_tether(lab: Lab, helpers: tuple[str, str]) -> None:
    source = _passt(lab, "p1", DOWN_PORT, helpers[0])
    target = _tether(lab, "t2", DOWN_PORT + 1, helpers[1])
    _silence_the_gap(lab)
    vm1, vm2 = lab.vm("vm1", source), lab.vm("vm2", target, incoming=True)
    streams = start_streams(lab, vm1)
    half = start_half_closed(lab, vm1, fin_in_bytes=8 << 10)
    quiet = _QuietWhilePasstDumps(lab.ns, source) if helpers[0] == "passt-repair" else None
    info = migrate(lab, vm1, vm2, at_switchover=quiet)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    if quiet is not None:
        quiet.release()
    target.wait_log("migration: passt state loaded, \\d+ bytes, 4 TCP connections")
    target.wait_log("migration: guest resumed here, resumed 4 of 4 TCP connections")
    results = check_streams(lab, streams, vm2)
    check_half_closed(lab, half, vm2)
    _report(f"passt -> tether ({'/'.join(helpers)})", info, target, results)
    run_ok(vm2, "ping -c 1 -W 5 10.200.0.1")


@pytest.mark.parametrize("helpers", [("tether-repair", "passt-repair"),
                                     ("passt-repair", "tether-repair")],
                         ids=["own-helpers", "crossed-helpers"])
def test_vm_moves_from_tether_to_passt(lab: Lab, helpers: tuple[str, str]) -> None:
    source = _tether(lab, "t1", DOWN_PORT, helpers[0], "--migrate-format", "passt")
    target = _passt(lab, "p2", DOWN_PORT + 1, helpers[1])
    vm1, vm2 = lab.vm("vm1", source), lab.vm("vm2", target, incoming=True)
    streams = start_streams(lab, vm1)
    half = start_half_closed(lab, vm1, fin_in_bytes=None)
    info = migrate(lab, vm1, vm2)
    assert info["status"] == "completed", f"{info}\n{lab.logs()}"
    source.wait_log("migration: state saved, \\d+ bytes, 3 TCP connections frozen")
    results = check_streams(lab, streams, vm2)
    check_half_closed(lab, half, vm2)
    _report(f"tether -> passt ({'/'.join(helpers)})", info, source, results)
    run_ok(vm2, "ping -c 1 -W 5 10.200.0.1")


def test_ping_pong_passt_tether_passt_keeps_the_same_connections(lab: Lab) -> None:
    """passt -> tether -> passt with the same two streams: the tether in the
    middle reads passt's stream and writes it again."""
    p1 = _passt(lab, "p1", DOWN_PORT, "passt-repair")
    t2 = _tether(lab, "t2", DOWN_PORT + 1, "tether-repair", "--migrate-format", "passt")
    p3 = _passt(lab, "p3", DOWN_PORT + 2, "passt-repair")
    _silence_the_gap(lab)
    vm1, vm2 = lab.vm("vm1", p1), lab.vm("vm2", t2, incoming=True)
    streams = start_streams(lab, vm1)
    quiet = _QuietWhilePasstDumps(lab.ns, p1)
    info = migrate(lab, vm1, vm2, at_switchover=quiet)
    assert info["status"] == "completed", f"passt -> tether: {info}\n{lab.logs()}"
    quiet.release()
    t2.wait_log("migration: guest resumed here, resumed 2 of 2 TCP connections")
    vm1.close()
    vm3 = lab.vm("vm3", p3, incoming=True)
    info = migrate(lab, vm2, vm3)
    assert info["status"] == "completed", f"tether -> passt: {info}\n{lab.logs()}"
    t2.wait_log("migration: state saved, \\d+ bytes, 2 TCP connections frozen")
    check_streams(lab, streams, vm3)


@pytest.mark.parametrize("direction", ["passt-to-tether", "tether-to-passt"])
def test_cross_host_the_address_moves_with_the_vm(workdir: Path, guest: GuestImage,
                                                  tstream: Path, direction: str) -> None:
    """Two hosts with one address behind a bridge, the peer on a third
    (tetherlab.two_hosts); the VM moves, then the address, and both streams
    carry on.  tether runs in its default (linger) mode: each is a host of its
    own."""
    if passt_dir() is None:
        pytest.fail("no passt build (./dev setup builds it from Debian's source package)")
    with two_hosts("txp") as hosts:
        lab = Lab(workdir, hosts.source, tstream, guest, peer_ns=hosts.peer,
                  service=PEER_ADDR, forward=HOST_ADDR)
        try:
            port = str(DOWN_PORT)
            if direction == "passt-to-tether":
                source: Passt | Tether = lab.passt("p1", "-t", port, *PASST_OPTS,
                                                   ns=hosts.source)
                target: Passt | Tether = lab.tether("t2", "-t", port, ns=hosts.target)
                _silence_the_gap(lab, hosts.source)
            else:
                source = lab.tether("t1", "-t", port, "--migrate-format", "passt",
                                    ns=hosts.source)
                target = lab.passt("p2", "-t", port, *PASST_OPTS, ns=hosts.target)
            vm1, vm2 = lab.vm("vm1", source), lab.vm("vm2", target, incoming=True)
            streams = start_streams(lab, vm1)
            quiet = (_QuietWhilePasstDumps(hosts.source, source) if isinstance(source, Passt)
                     else None)
            info = migrate(lab, vm1, vm2, at_switchover=quiet)
            assert info["status"] == "completed", f"{info}\n{lab.logs()}"
            if quiet is not None:
                quiet.release()
            if isinstance(target, Tether):
                target.wait_log("resumed 2 of 2 TCP connections")
            hosts.move_address()
            check_streams(lab, streams, vm2)
            resets = subprocess.run(in_ns(hosts.peer, "nstat", "-az", "TcpEstabResets"),
                                    capture_output=True, text=True, check=False).stdout
            assert re.search(r"TcpEstabResets\s+0\b", resets), resets
        finally:
            lab.close()
