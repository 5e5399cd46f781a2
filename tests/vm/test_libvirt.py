"""libvirt 11.3 runs tether as its passt, with QEMU 10 and the test guest.

A libvirtd of the test's own (libvirtlab.Libvirtd) runs in a host namespace
set up like tetherlab's; `passt` in its PATH is tether.  The domains are what a
libvirt user writes: `<interface type='vhostuser'><backend type='passt'/>` with
memfd shared memory, and `<interface type='user'><backend type='passt'/>`
(QEMU's -netdev stream).  libvirt builds tether's command line, waits for it to
return, reads its pid file and lets QEMU connect; tether must then serve the
guest, and go away when the domain is destroyed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import wait_for

from .guest import DHCP_ARG, GuestImage, build_tstream
from .libvirtlab import Domain, Libvirtd, libvirt_missing_reason
from .tetherlab import GATEWAY, HOST_ADDR, Peer, Process, host_namespace, in_ns

pytestmark = pytest.mark.vm

GATEWAY6 = "fd00:200::1"  # the host namespace's IPv6 default gateway: tether maps it to ::1
FWD_HOST, FWD_GUEST = 5111, 5112  # <range start='5111' to='5112'/>
MIB = 1024 * 1024
# Two daemons on one machine: libvirt refuses to migrate to a host with its own UUID.
SOURCE_UUID = "7e7e7e7e-0000-4000-8000-000000000001"
TARGET_UUID = "7e7e7e7e-0000-4000-8000-000000000002"
ROOT_SOURCE_UUID = "7e7e7e7e-0000-4000-8000-000000000003"
ROOT_TARGET_UUID = "7e7e7e7e-0000-4000-8000-000000000004"

VHOSTUSER = """<interface type='vhostuser'>
      <mac address='{mac}'/>
      <backend type='passt' logFile='{log}'/>
      <portForward proto='tcp'>
        <range start='5111' to='5112'/>
      </portForward>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"""

MIGRATING = """<interface type='vhostuser'>
      <mac address='{mac}'/>
      <backend type='passt' logFile='{log}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"""

USER = """<interface type='user'>
      <mac address='{mac}'/>
      <backend type='passt' logFile='{log}'/>
      <portForward proto='tcp'>
        <range start='5111' to='5112'/>
      </portForward>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"""


@dataclass
class Lab:
    ns: str
    daemon: Libvirtd
    tstream: Path
    workdir: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, guest: GuestImage) -> Iterator[Lab]:
    reason = libvirt_missing_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"libvirt test prerequisite missing under CI: {reason}", pytrace=False)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("tlv", numbered=True)
    tstream = build_tstream(workdir / "ts")
    with host_namespace("tlv") as ns:
        daemon = Libvirtd(ns, guest, host_uuid=SOURCE_UUID)
        try:
            yield Lab(ns, daemon, tstream, workdir)
        finally:
            daemon.close()


def guest_run(domain: Domain, command: str, timeout: float = 60.0) -> str:
    assert domain.console is not None
    status, out = domain.console.run(command, timeout)
    assert status == 0, f"guest: `{command}` exited {status}:\n{out}{domain.diag()}"
    return out


def host_peer(lab: Lab, name: str, *args: str) -> Peer:
    peer = Peer(lab.workdir, name, lab.ns, lab.tstream, *args)
    if "serve" in args:
        peer.wait_log(r"TSTREAM listening", 30)
    return peer


def check_lease(domain: Domain) -> None:
    assert domain.console is not None
    m = re.search(r"udhcpc: eth0 (\S+) router (\S+) mtu (\S+)", domain.console.text)
    assert m, f"no DHCP lease on the console{domain.diag()}"
    assert m.groups() == (f"{HOST_ADDR}/24", GATEWAY, "65520"), m.group(0)


def check_upload(lab: Lab, domain: Domain, target: str, port: int, seed: int) -> None:
    """guest -> host service through the gateway, 8 MiB checked byte by byte."""
    peer = host_peer(lab, f"{domain.name}-up{port}", "-t", "30", "serve", str(port), "recv",
                     str(seed))
    out = guest_run(domain, f"tstream -t 30 send {target} {port} 8M {seed}", 180)
    assert f"TSTREAM sent={8 * MIB}" in out, out + domain.diag()
    result = peer.result(60)
    assert (result.get("result"), result.get("bytes")) == ("ok", str(8 * MIB)), \
        f"{result}\n{peer.text()}{domain.diag()}"


def check_ipv6_upload(lab: Lab, domain: Domain, port: int, seed: int) -> None:
    # SLAAC from tether's RA; a tentative address cannot be used yet (bounded wait).
    out = guest_run(domain, "i=0; until ip -6 addr show dev eth0 | grep 'inet6 fd00:200::' | "
                            "grep -qv tentative; do i=$((i+1)); [ $i -gt 150 ] && break; "
                            "sleep 0.1; done; ip -6 addr show dev eth0", 40)
    assert re.search(r"inet6 fd00:200::[0-9a-f:]+/64 scope global (?!tentative)", out), \
        out + domain.diag()
    check_upload(lab, domain, GATEWAY6, port, seed)


def check_forwarded(lab: Lab, domain: Domain, seed: int) -> None:
    """host 127.0.0.1:5111 -> tether -> guest :5112, 4 MiB checked by the guest."""
    tag = f"fwd{seed}"
    guest_run(domain, f"tstream -t 30 serve {FWD_GUEST} recv {seed} > /tmp/{tag}.out 2>&1 & "
                      f"echo $! > /tmp/{tag}.pid")
    guest_run(domain, f"i=0; until grep -q listening /tmp/{tag}.out; do i=$((i+1)); "
                      f"[ $i -gt 100 ] && break; sleep 0.1; done; grep -q listening /tmp/{tag}.out",
              30)
    sender = host_peer(lab, f"{domain.name}-fwd", "-t", "30", "send", "127.0.0.1",
                       str(FWD_HOST), "4M", str(seed))
    assert sender.result(120).get("result") == "sent", sender.text() + domain.diag()
    out = guest_run(domain, f"wait $(cat /tmp/{tag}.pid); cat /tmp/{tag}.out", 60)
    assert f"TSTREAM ok bytes={4 * MIB}" in out, out + domain.diag()


def check_destroy_leaves_nothing(lab: Lab, domain: Domain) -> None:
    pid = int(domain.passt_pid_file().read_text())
    sock = domain.passt_socket()
    assert Path(f"/proc/{pid}").exists() and sock in lab.daemon.unix_listeners()
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^CapEff:\s+0+$", status, re.M), status  # libvirt cleared them
    domain.destroy()
    # libvirt does not stop a vhost-user back-end; --one-off must end it.
    wait_for(lambda: not _alive(pid), 10, f"tether (pid {pid}) to exit after virsh destroy")
    assert sock not in lab.daemon.unix_listeners()
    assert "Traceback" not in domain.passt_log.read_text(), domain.passt_log.read_text()


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


@pytest.fixture(scope="module")
def vhost(lab: Lab) -> Iterator[Domain]:
    domain = Domain(lab.daemon, "tlvhost", VHOSTUSER, DHCP_ARG)
    try:
        domain.start()
        domain.wait_booted()
        yield domain
    finally:
        domain.undefine()


def test_vhost_user_command_line_and_dhcp(vhost: Domain) -> None:
    cmdline = Path(f"/proc/{int(vhost.passt_pid_file().read_text())}/cmdline").read_bytes()
    argv = cmdline.decode().split("\0")
    assert argv[2:5] == ["tether.cli", "--vhost-user", "--one-off"], argv
    assert "--tcp-ports" in argv and "5111:5112" in argv, argv
    check_lease(vhost)


def test_vhost_user_ipv4_to_the_hosts_127_0_0_1(lab: Lab, vhost: Domain) -> None:
    check_upload(lab, vhost, GATEWAY, 6101, 61)


def test_vhost_user_ipv6_gateway_to_the_hosts_ipv6_loopback(lab: Lab, vhost: Domain) -> None:
    check_ipv6_upload(lab, vhost, 6102, 62)


def test_vhost_user_forwarded_connection(lab: Lab, vhost: Domain) -> None:
    check_forwarded(lab, vhost, 63)


def test_vhost_user_destroy_ends_tether_and_start_works_again(lab: Lab, vhost: Domain) -> None:
    check_destroy_leaves_nothing(lab, vhost)
    vhost.start()
    vhost.wait_booted()
    check_lease(vhost)
    check_upload(lab, vhost, GATEWAY, 6104, 64)
    check_destroy_leaves_nothing(lab, vhost)


def test_stream_domain_basics(lab: Lab) -> None:
    domain = Domain(lab.daemon, "tlvstream", USER, DHCP_ARG, shared_memory=False)
    try:
        domain.start()
        domain.wait_booted()
        argv = Path(f"/proc/{int(domain.passt_pid_file().read_text())}/cmdline"
                    ).read_bytes().decode().split("\0")
        assert "--vhost-user" not in argv and "--one-off" in argv, argv
        check_lease(domain)
        check_upload(lab, domain, GATEWAY, 6111, 71)
        check_ipv6_upload(lab, domain, 6112, 72)
        check_forwarded(lab, domain, 73)
        check_destroy_leaves_nothing(lab, domain)
    finally:
        domain.undefine()


def test_virsh_migrate_live_between_two_daemons(lab: Lab, guest: GuestImage) -> None:
    """libvirt moves a vhost-user domain from one libvirtd to another on this machine,
    with tether-repair beside each tether as KubeVirt runs passt-repair: the
    target's tether takes over the guest's network; the source's tether stays, as
    passt(1) says --one-off does after a completed migration as source."""
    domain = Domain(lab.daemon, "tlvmig", MIGRATING, DHCP_ARG)
    target = Libvirtd(lab.ns, guest, host_uuid=TARGET_UUID)
    source_pid = None
    helpers: list[Process] = []
    try:
        domain.start()
        domain.wait_booted()
        source_pid = int(domain.passt_pid_file().read_text())
        # As KubeVirt's virt-handler does: passt-repair (here tether-repair, as root)
        # given the source's SOCKET.repair, and the target's socket directory, where
        # it waits for the repair socket to appear.
        source_repair = lab.daemon.host_path(domain.passt_socket() + ".repair")
        target_dir = target.host_path("/run/libvirt/qemu/passt")
        target_dir.mkdir(parents=True, exist_ok=True)
        for side, path in (("source", source_repair), ("target", target_dir)):
            helpers.append(Process([sys.executable, "-m", "tether.repair.helper", str(path)],
                                   lab.workdir / f"repair-{side}.log"))
        wait_for(lambda: "repair helper pid" in domain.passt_log.read_text(), 30,
                 "tether-repair to connect to the source's tether")
        # The target's QEMU needs its own console socket; its tether its own log.
        xml = lab.daemon.virsh("dumpxml", "--migratable", domain.name).stdout
        for path in (domain.console_path, domain.passt_log):
            xml = xml.replace(str(path), str(target.root / "rw" / path.name))
        target_xml = lab.daemon.root / "tlvmig-target.xml"
        target_xml.write_text(xml)
        lab.daemon.virsh("migrate", "--live", "--xml", str(target_xml), domain.name,
                         target.uri.replace("qemu:///", "qemu+unix:///"),
                         "tcp://127.0.0.1:49152", timeout=600)
        assert target.virsh("domstate", domain.name).stdout.strip() == "running"
        assert lab.daemon.virsh("domstate", domain.name).stdout.strip() == "shut off"
        domain.daemon = target  # the domain lives on the target now
        domain.attach_console(target.root / "rw" / domain.console_path.name)
        target_pid = int(domain.passt_pid_file().read_text())
        assert target_pid != source_pid and _alive(target_pid)
        target_log = (target.root / "rw" / domain.passt_log.name).read_text()
        assert "front-end connected" in target_log, target_log
        assert "repair helper pid" in target_log, target_log
        # The guest, running on the target, reaches the host through the target's tether.
        check_upload(lab, domain, GATEWAY, 6121, 81)
        assert _alive(source_pid)  # see the docstring
        source_log = domain.passt_log.read_text()
        assert "migration complete: staying" in source_log, source_log
        target.virsh("destroy", domain.name)
        wait_for(lambda: not _alive(target_pid), 10, "the target's tether to exit")
    finally:
        for helper in helpers:
            helper.stop()
        if source_pid is not None and _alive(source_pid):
            os.kill(source_pid, signal.SIGTERM)
        domain.daemon = lab.daemon
        target.close()
        domain.undefine()


def _established(ns: str, port: int) -> bool:
    out = subprocess.run(in_ns(ns, "ss", "-Htn", "state", "established", f"( sport = :{port} )"),
                         capture_output=True, text=True, check=False, timeout=30).stdout
    return bool(out.strip())


def test_virsh_migrate_live_carries_a_tcp_connection(lab: Lab, guest: GuestImage) -> None:
    """An open guest -> host connection crosses a libvirt live migration, checked
    byte by byte, with tether-repair on both sides as virt-handler runs it.

    Two things keep the default lab from it, so this pair of daemons differs:
    - freezing a connection attaches a socket filter, which this machine's kernel
      (6.18-fc, unprivileged BPF off) allows only with CAP_NET_ADMIN, and libvirt
      runs passt with none: here QEMU and passt run as root, and `passt` says
      --runas root;
    - on one host the source's lingering sockets hold the connections' addresses
      (the target's restore fails with EADDRNOTAVAIL, and the migration with it):
      `passt` adds --migrate-no-linger, as a wrapper can (README.md).
    """
    args = ("--runas", "root", "--migrate-no-linger")
    source = Libvirtd(lab.ns, guest, ROOT_SOURCE_UUID, qemu_user="root", passt_args=args)
    target: Libvirtd | None = None
    domain: Domain | None = None
    helpers: list[Process] = []
    source_pid = None
    try:
        target = Libvirtd(lab.ns, guest, ROOT_TARGET_UUID, qemu_user="root", passt_args=args)
        domain = Domain(source, "tlvtcp", MIGRATING, DHCP_ARG)
        domain.start()
        domain.wait_booted()
        source_pid = int(domain.passt_pid_file().read_text())
        helpers = [
            Process([sys.executable, "-m", "tether.repair.helper",
                     str(source.host_path(domain.passt_socket() + ".repair"))],
                    lab.workdir / "tcp-repair-source.log"),
            Process([sys.executable, "-m", "tether.repair.helper",
                     str(target.host_path("/run/libvirt/qemu/passt"))],
                    lab.workdir / "tcp-repair-target.log")]
        wait_for(lambda: "repair helper pid" in domain.passt_log.read_text(), 30,
                 "tether-repair to connect to the source's tether")
        # 200 kB/s for 20 s: the connection is busy before, during and after.
        peer = host_peer(lab, "tcp-mig", "-t", "60", "serve", "6141", "recv", "91")
        guest_run(domain, f"tstream -r 200000 -d 20 -t 60 send {GATEWAY} 6141 1G 91 "
                          "> /tmp/mig.out 2>&1 & echo $! > /tmp/mig.pid")
        wait_for(lambda: _established(lab.ns, 6141), 30, "the guest's connection")
        target.host_path("/run/libvirt/qemu/passt").mkdir(parents=True, exist_ok=True)
        xml = source.virsh("dumpxml", "--migratable", domain.name).stdout
        for path in (domain.console_path, domain.passt_log):
            xml = xml.replace(str(path), str(target.root / "rw" / path.name))
        target_xml = source.root / "tlvtcp-target.xml"
        target_xml.write_text(xml)
        source.virsh("migrate", "--live", "--xml", str(target_xml), domain.name,
                     target.uri.replace("qemu:///", "qemu+unix:///"), "tcp://127.0.0.1:49153",
                     timeout=600)
        target_log = (target.root / "rw" / domain.passt_log.name).read_text()
        assert "resumed 1 of 1 TCP connections" in target_log, target_log + domain.diag()
        result = peer.result(180)
        assert result.get("result") == "ok" and int(result.get("bytes", "0")) >= 3 * MIB, \
            f"{result}\n{peer.text()}{domain.diag()}"
        assert target.virsh("domstate", domain.name).stdout.strip() == "running"
    finally:
        for helper in helpers:
            helper.stop()
        if source_pid is not None and _alive(source_pid):
            os.kill(source_pid, signal.SIGTERM)
        if target is not None:
            target.close()
        source.close()
