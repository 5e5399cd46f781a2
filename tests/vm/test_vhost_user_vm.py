"""A real Linux guest on QEMU 10 talks to tether's vhost-user back-end.

The back-end is examples/vhost_user_responder.py (ARP + ping for 10.0.2.2),
tether's vhost-user library with a toy stack; the guest is the busybox
initramfs of guest.py.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for

from .guest import GATEWAY_IP, GuestImage
from .harness import GUEST_MAC, Backend, Vm

pytestmark = pytest.mark.vm


@pytest.fixture
def backend(workdir: Path) -> Iterator[Backend]:
    b = Backend(workdir, "be1")
    yield b
    b.stop()


def ping(vm: Vm, *args: str, count: int = 3) -> None:
    status, out = vm.console.run(f"ping -c {count} -W 3 {' '.join(args)} {GATEWAY_IP}", 60)
    assert status == 0 and f"{count} packets received" in out, out


def test_guest_pings_gateway_with_frames_larger_than_one_buffer(
        workdir: Path, guest: GuestImage, backend: Backend) -> None:
    vm = Vm(workdir, "vm1", backend.socket, guest)
    try:
        vm.wait_booted()
        ping(vm)
        # 8042-byte frames each way: TX chains and RX frames merged over
        # several of the guest's receive buffers (MRG_RXBUF).
        status, out = vm.console.run("ip link set eth0 mtu 9000", 20)
        assert status == 0, out
        ping(vm, "-s", "8000", count=2)
    finally:
        vm.close()
    backend.stop()
    stats = backend.stats()
    assert stats["rx_multi_buffer"] >= 2
    assert stats["bad_chains"] == 0
    assert "responder: guest MAC 52:54:00:12:34:56" in backend.text()


def test_reconnect_after_backend_drop_and_after_qemu_restart(
        workdir: Path, guest: GuestImage, backend: Backend) -> None:
    vm = Vm(workdir, "vm1", backend.socket, guest)
    try:
        vm.wait_booted()
        ping(vm, count=1)
        # The back-end drops the connection (as a crash would); QEMU
        # reconnects and restarts the rings on a clean device.
        backend.signal(signal.SIGUSR1)
        backend.wait_log(r"front-end disconnected: SIGUSR1")
        backend.wait_log(r"queue 1 started", count=2)
        ping(vm, count=2)
    finally:
        vm.kill()  # QEMU goes away without a goodbye
        vm.close()
    backend.wait_log(r"front-end disconnected: end of stream", count=1)
    # A new QEMU on the same back-end process starts from scratch.
    vm2 = Vm(workdir, "vm2", backend.socket, guest)
    try:
        vm2.wait_booted()
        ping(vm2, count=2)
    finally:
        vm2.close()
    backend.stop()
    assert backend.stats()["connections"] == 3
    assert "Traceback" not in backend.text()


def udp_counters(vm: Vm) -> dict[str, int]:
    status, out = vm.console.run("grep Udp: /proc/net/snmp", 20)
    assert status == 0, out
    names, values = (line.split()[1:] for line in out.splitlines() if line.startswith("Udp:"))
    return dict(zip(names, map(int, values), strict=True))


def test_live_migration_carries_state_and_dirty_pages(
        workdir: Path, guest: GuestImage) -> None:
    """An idle VM (but for a checked stream) moves between two back-ends.

    While RAM migrates, the source back-end writes a UDP stream into guest
    buffers with dirty logging on; the guest kernel checks every datagram's
    checksum, so a page the log missed would show as InCsumErrors.
    """
    source_be = Backend(workdir, "src")
    target_be = Backend(workdir, "dst")
    migrate = workdir / "migrate.sock"
    source = Vm(workdir, "vm1", source_be.socket, guest)
    target = None
    try:
        source.wait_booted()
        ping(source, count=2)
        target = Vm(workdir, "vm2", target_be.socket, guest, incoming=f"unix:{migrate}")
        wait_for(migrate.exists, 30, "the target's migration socket")
        # Frames keep arriving while RAM migrates with dirty logging on.
        status, out = source.console.run(f"(ping -i 0.2 {GATEWAY_IP} >/dev/null 2>&1 &)", 20)
        assert status == 0, out
        before = udp_counters(source)
        source_be.signal(signal.SIGUSR2)
        source_be.wait_log(r"responder: streaming")
        source.qmp("migrate", uri=f"unix:{migrate}")

        def completed() -> bool:
            state = source.qmp("query-migrate").get("status")
            assert state not in ("failed", "cancelled"), source.qmp("query-migrate")
            return bool(state == "completed")

        wait_for(completed, 120, "migration to complete", interval=0.2)
        assert source.qmp("query-status")["status"] == "postmigrate"
        wait_for(lambda: target.qmp("query-status")["status"] == "running", 30,
                 "target running")
        # Source: logging was on, state saved after the rings stopped.
        source_be.wait_log(r"features 0x\w+ \(logging on\)")
        source_be.wait_log(r"device state save started")
        source_be.wait_log(r"CHECK_DEVICE_STATE: success")
        # Target: the guest's MAC arrived in the state, kept until the rings started.
        target_be.wait_log(r"loaded state: guest MAC " + GUEST_MAC)
        target_be.wait_log(r"applied state: guest MAC " + GUEST_MAC)
        text = target_be.text()
        assert text.index("loaded state") < text.index("memory table")
        # The guest keeps working on the target, and every datagram that
        # reached it was intact.
        status, out = target.console.run("killall ping", 20)
        assert status == 0, out
        ping(target, count=3)
        after = udp_counters(target)
        assert after["InCsumErrors"] == before["InCsumErrors"] == 0, after
        assert after["InErrors"] == before["InErrors"], after
        assert after["NoPorts"] - before["NoPorts"] >= 50, (before, after)
    finally:
        source.close()
        if target is not None:
            target.close()
        source_be.stop()
        target_be.stop()
    assert target_be.stats()["bad_chains"] == 0
    assert source_be.stats()["logged_pages"] > 0
    assert "Traceback" not in source_be.text() + target_be.text()


def test_failed_migration_leaves_the_source_working(
        workdir: Path, guest: GuestImage) -> None:
    """The target refuses the state: QEMU fails the migration and restarts the
    source's rings; the source back-end notices and the guest keeps working."""
    source_be = Backend(workdir, "src")
    target_be = Backend(workdir, "dst", "--reject-state")
    migrate = workdir / "migrate.sock"
    source = Vm(workdir, "vm1", source_be.socket, guest)
    target = None
    try:
        source.wait_booted()
        ping(source, count=1)
        target = Vm(workdir, "vm2", target_be.socket, guest, incoming=f"unix:{migrate}")
        wait_for(migrate.exists, 30, "the target's migration socket")
        # With a return path the source learns that the target failed to load.
        for vm in (source, target):
            vm.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": "return-path", "state": True}])
        source.qmp("migrate", uri=f"unix:{migrate}")

        def failed() -> bool:
            info = source.qmp("query-migrate")
            assert info.get("status") != "completed", info
            return bool(info.get("status") == "failed")

        wait_for(failed, 120, "migration to fail", interval=0.2)
        target_be.wait_log(r"CHECK_DEVICE_STATE: Operation not permitted")
        wait_for(lambda: source.qmp("query-status")["status"] == "running", 30,
                 "source running again")
        source_be.wait_log(r"device state save started")
        source_be.wait_log(r"responder: rings started", count=2)
        ping(source, count=2)
    finally:
        source.close()
        if target is not None:
            target.close()
        source_be.stop()
        target_be.stop()
    assert "Traceback" not in source_be.text() + target_be.text()
