"""libvirt 11 starting tether as its `passt`: a libvirtd of the test's own.

The daemon runs inside the host namespace of tetherlab.host_namespace(), in a
mount namespace of its own where /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt and /etc/libvirt are directories of the
test: nothing of the machine's own libvirt (if any) is used or changed, and the
daemon's socket is reachable from outside at ROOT/run/libvirt-sock.  Its PATH
starts with ROOT/bin, where `passt` runs tether: the way README.md's "Under
libvirt and KubeVirt" makes libvirt's passt resolve to tether.

libvirt runs passt as its QEMU user (libvirt-qemu) with no capabilities, so
tether runs from /usr/bin/python3 with PYTHONPATH at this tree's src/ (a venv's
interpreter may live where only root can read), and everything the QEMU user
needs (kernel, initrd, the console socket, passt's log) is under ROOT, which is
world-readable, with a world-writable ROOT/rw.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tests.support import wait_for

from .guest import READY_MARKER, GuestImage
from .harness import BOOT_TIMEOUT, KERNEL_CMDLINE, Console
from .tetherlab import SRC, in_ns

LIBVIRTD = "libvirtd"
VIRSH = "virsh"
QEMU_USER = "libvirt-qemu"
SYSTEM_PYTHON = "/usr/bin/python3"
GUEST_MAC = "52:54:00:12:34:56"
# The daemon's own directories, each replaced by one of the test's.
BOUND = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
         "log": "/var/log/libvirt", "etc": "/etc/libvirt"}

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")

QEMU_CONF = """\
user = "{user}"
group = "{user}"
# No private /dev, no cgroups, no confinement: a container may allow none of them.
namespaces = [ ]
cgroup_controllers = [ ]
security_driver = "none"
stdio_handler = "file"
remember_owner = 0
"""

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_filters = "1:qemu.qemu_passt 1:qemu.qemu_extdevice"
log_outputs = "2:file:/var/log/libvirt/libvirtd.log"
"""

PASST = f"""\
#!/bin/sh
# libvirt's passt is tether (README.md, "Under libvirt and KubeVirt").
export PYTHONPATH={SRC}
exec {SYSTEM_PYTHON} -m tether.cli {{extra}}"$@"
"""


def libvirt_missing_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the lab's libvirtd runs in namespaces of its own"
    for tool in (LIBVIRTD, VIRSH, "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (./dev setup installs libvirt 11 from bookworm-backports)"
    out = subprocess.run([VIRSH, "--version"], capture_output=True, text=True,
                         check=False).stdout.strip()
    if not re.match(r"(1[1-9]|[2-9]\d)\.", out):
        return f"libvirt is not 11 or newer: virsh --version says {out!r}"
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        return f"no {QEMU_USER} user (libvirt-daemon-driver-qemu creates it)"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"no {SYSTEM_PYTHON} for libvirt's QEMU user to run tether with"
    return None


class Libvirtd:
    """One libvirtd in network namespace `ns`, its state under a fresh ROOT."""

    def __init__(self, ns: str, guest: GuestImage, host_uuid: str | None = None,
                 qemu_user: str = QEMU_USER, passt_args: tuple[str, ...] = ()) -> None:
        """host_uuid: two daemons on one machine must differ for libvirt to migrate.
        qemu_user: who runs QEMU and passt; passt_args: what the `passt` script adds
        to libvirt's command line (as README.md's wrapper for --migrate-format does)."""
        self.ns = ns
        self.host_uuid = host_uuid
        self.qemu_user = qemu_user
        self.passt_args = passt_args
        self.root = Path(tempfile.mkdtemp(prefix="tlv-", dir="/tmp"))  # short socket paths
        self.root.chmod(0o755)
        try:
            self._prepare(guest)
            self._start()
        except BaseException:
            self.close()
            raise

    def _prepare(self, guest: GuestImage) -> None:
        r = self.root
        for sub in ("run", "log", "bin", "guest", "rw"):
            (r / sub).mkdir()
        (r / "rw").chmod(0o1777)
        # The packages' directories with their owners (lib/qemu belongs to the QEMU user).
        for sub in ("lib", "cache", "etc"):
            shutil.copytree(BOUND[sub], r / sub, symlinks=True)
            shutil.copystat(BOUND[sub], r / sub)
        for sub in ("lib", "cache"):
            for path in [r / sub, *(r / sub).rglob("*")]:
                real = Path(BOUND[sub]) / path.relative_to(r / sub)
                with contextlib.suppress(FileNotFoundError):
                    st = real.stat()
                    os.chown(path, st.st_uid, st.st_gid)
        (r / "etc" / "qemu.conf").write_text(QEMU_CONF.format(user=self.qemu_user))
        conf = LIBVIRTD_CONF
        if self.host_uuid is not None:
            conf += f'host_uuid = "{self.host_uuid}"\n'
        (r / "etc" / "libvirtd.conf").write_text(conf)
        passt = r / "bin" / "passt"
        passt.write_text(PASST.format(extra="".join(f"{a} " for a in self.passt_args)))
        passt.chmod(0o755)
        for part in (guest.kernel, guest.initrd):
            shutil.copyfile(part, r / "guest" / part.name)
            (r / "guest" / part.name).chmod(0o644)
        self.kernel, self.initrd = r / "guest" / guest.kernel.name, r / "guest" / guest.initrd.name

    def _start(self) -> None:
        r = self.root
        mounts = []
        for sub, target in BOUND.items():
            # The mount points must exist; an empty directory is what the packages make.
            Path(target).mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount --bind {r / sub} {target}")
        if Path("/dev/kvm").exists():
            # Here /dev/kvm opens but runs no stock kernel (nested PVM), so libvirt's
            # probe finds no KVM while its cache check sees /dev/kvm usable: it
            # re-probes QEMU on every lookup, a minute per migration. The domains are
            # TCG: the daemon gets a /dev of its own with the few nodes it and QEMU
            # use and no kvm (a QEMU user of root would see through file modes).
            (r / "hostdev").mkdir()
            mounts += [f"mount --rbind /dev {r / 'hostdev'}", "mount -t tmpfs -o mode=755 dev /dev"]
            for node in DEV_NODES:
                mounts += [f"touch /dev/{node}", f"mount --bind {r / 'hostdev' / node} /dev/{node}"]
            mounts += ["mkdir /dev/pts /dev/shm", f"mount --rbind {r / 'hostdev' / 'pts'} /dev/pts",
                       "mount -t tmpfs -o mode=1777 shm /dev/shm"]
        path = f"{r / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        script = " && ".join([*mounts, f"exec env PATH={path} {LIBVIRTD} "
                              "--pid-file /run/libvirt/libvirtd.pid"])
        self.out = (r / "libvirtd.out").open("w")
        # `ip netns exec` and `unshare` exec in place: proc.pid is libvirtd's.
        self.proc = subprocess.Popen(
            in_ns(self.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                  script), stdout=self.out, stderr=subprocess.STDOUT)
        self.uri = f"qemu:///system?socket={r / 'run' / 'libvirt-sock'}"
        wait_for(lambda: (r / "run" / "libvirt-sock").exists() or self.proc.poll() is not None,
                 60, "libvirtd's socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"libvirtd exited {self.proc.returncode}: {self.diag()}")
        # The QEMU driver probes QEMU's capabilities before it serves anything.
        self.virsh("version", timeout=180)

    def virsh(self, *args: str, timeout: float = 120, check: bool = True,
              ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([VIRSH, "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {done.returncode}\n{done.stdout}"
                                 f"{done.stderr}{self.diag()}")
        return done

    def host_path(self, inside: str) -> Path:
        """Where a path under one of the daemon's directories is, seen from outside."""
        for sub, target in BOUND.items():
            if inside.startswith(target + "/"):
                return self.root / sub / inside[len(target) + 1:]
        raise ValueError(f"{inside} is not under the daemon's directories")

    def unix_listeners(self) -> set[str]:
        """Paths of the listening UNIX sockets in the daemon's network namespace."""
        found = set()
        with open(f"/proc/{self.proc.pid}/net/unix") as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 8 and cols[5] == "01" and cols[3] == "00010000":
                    found.add(cols[7])
        return found

    def diag(self) -> str:
        parts = []
        for p in (self.root / "libvirtd.out", self.root / "log" / "libvirtd.log"):
            with contextlib.suppress(OSError):
                parts.append(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}")
        for log in sorted((self.root / "rw").glob("*.log")):
            parts.append(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-2500:]}")
        for log in sorted((self.root / "log" / "qemu").glob("*.log")):
            parts.append(f"\n--- {log.name} ---\n{log.read_text(errors='replace')[-1500:]}")
        return "".join(parts)

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            for name in self.virsh("list", "--name", check=False).stdout.split():
                self.virsh("destroy", name, check=False)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._end_leftover_backends()
        out = getattr(self, "out", None)
        if out is not None:
            out.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _end_leftover_backends(self) -> None:
        """tethers this daemon started that are still there: a migration's source
        stays by design (--one-off), and libvirt does not stop it. Found by their
        log file, which is under ROOT."""
        mine = str(self.root).encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"tether.cli" in cmdline and mine in cmdline:
                    os.kill(int(proc.name), signal.SIGTERM)


class Domain:
    """A guest defined on a Libvirtd, with its serial console on a UNIX socket."""

    def __init__(self, daemon: Libvirtd, name: str, interface_xml: str,
                 kernel_args: str = "", shared_memory: bool = True) -> None:
        self.daemon = daemon
        self.name = name
        self.console_path = daemon.root / "rw" / f"{name}.console"
        self.passt_log = daemon.root / "rw" / f"{name}-passt.log"
        memory = ("<memoryBacking><source type='memfd'/><access mode='shared'/>"
                  "</memoryBacking>" if shared_memory else "")
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  {memory}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{daemon.kernel}</kernel>
    <initrd>{daemon.initrd}</initrd>
    <cmdline>{KERNEL_CMDLINE} {kernel_args}</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {interface_xml.format(mac=GUEST_MAC, log=self.passt_log)}
    <serial type='unix'>
      <source mode='bind' path='{self.console_path}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""
        xml_path = daemon.root / f"{name}.xml"
        xml_path.write_text(xml)
        daemon.virsh("define", str(xml_path))
        self.console: Console | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """virsh start, paused until the console is attached, so no output is lost."""
        self.daemon.virsh("start", self.name, "--paused")
        self._close_console()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(self.console_path))
        self.console = Console(self._sock.fileno(), self._sock.fileno(), self.name)
        self.daemon.virsh("resume", self.name)

    def attach_console(self, path: Path) -> Console:
        """Follow the domain to another console socket (its QEMU after a migration)."""
        self._close_console()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self.console = Console(self._sock.fileno(), self._sock.fileno(), self.name)
        return self.console

    def wait_booted(self) -> Console:
        assert self.console is not None
        self.console.expect(READY_MARKER, BOOT_TIMEOUT)
        return self.console

    def passt_pid_file(self) -> Path:
        domid = self.daemon.virsh("domid", self.name).stdout.strip()
        return self.daemon.host_path(f"/run/libvirt/qemu/passt/{domid}-{self.name}-net0-passt.pid")

    def passt_socket(self) -> str:
        """The back-end's socket as libvirt and QEMU name it (inside the daemon's view)."""
        domid = self.daemon.virsh("domid", self.name).stdout.strip()
        return f"/run/libvirt/qemu/passt/{domid}-{self.name}-net0.socket"

    def destroy(self) -> None:
        self.daemon.virsh("destroy", self.name)
        self._close_console()

    def _close_console(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.console = None

    def diag(self) -> str:
        console = self.console.tail(1500) if self.console is not None else "(not attached)"
        return f"\n--- {self.name} console ---\n{console}{self.daemon.diag()}"

    def undefine(self) -> None:
        self.daemon.virsh("destroy", self.name, check=False)
        self.daemon.virsh("undefine", self.name, check=False)
        self._close_console()
