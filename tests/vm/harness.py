"""Run QEMU 10 guests and tether back-ends for tests, with bounded waits only.

- `Console`: the guest's serial console on QEMU's stdin/stdout pipes, with
  an expect-like `expect()` and `run()` (command + exit status).
- `Vm`: one QEMU process (TCG here; KVM where TETHER_ACCEL says so), its
  console and its QMP monitor (qemu.qmp).
- `Backend`: one `python examples/vhost_user_responder.py` process and its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.support import readable, stop_process, wait_for

from .guest import READY_MARKER, GuestImage

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 90.0  # TCG boot is ~8 s alone; two cores shared by four engineers
GUEST_MAC = "52:54:00:12:34:56"
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1 mitigations=off"


def qemu_missing_reason() -> str | None:
    path = shutil.which(QEMU)
    if path is None:
        return f"{QEMU} not installed (./dev setup installs it from bookworm-backports)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True,
                         check=False).stdout
    if not re.search(r"version (1\d|[2-9]\d)\.", out):
        return f"{QEMU} is not QEMU >= 10: {out.splitlines()[0] if out else '?'}"
    return None


class Console:
    """Expect-style access to a serial console on a pair of pipes."""

    def __init__(self, out_fd: int, in_fd: int, name: str) -> None:
        self._out = out_fd
        self._in = in_fd
        self.name = name
        os.set_blocking(out_fd, False)
        self.text = ""  # everything seen, for failure messages
        self._pos = 0  # start of the unconsumed part of text

    def _read(self, timeout: float) -> None:
        if not readable(self._out, timeout):
            return
        try:
            data = os.read(self._out, 65536)
        except BlockingIOError:
            return
        if not data:
            raise EOFError(f"{self.name}: console closed; last output:\n{self.tail()}")
        self.text += data.decode(errors="replace").replace("\r", "")

    def tail(self, n: int = 2000) -> str:
        return self.text[-n:]

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text, self._pos)
            if match:
                self._pos = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.name}: no /{pattern}/ within {timeout:.0f} s; "
                                   f"last output:\n{self.tail()}")
            self._read(min(remaining, 0.5))

    def send(self, line: str) -> None:
        os.write(self._in, (line + "\n").encode())

    _seq = 0

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a shell command in the guest; return (exit status, output)."""
        Console._seq += 1
        tag = f"R{Console._seq}"
        self.send(f"{command}; echo ={tag}=$?=")
        # The echoed command line shows `$?`, never digits, so only the real
        # output matches.
        match = self.expect(rf"={tag}=(\d+)=", timeout)
        output = self.text[: match.start()]
        start = output.rfind(f"echo ={tag}=")  # the echoed command line
        return int(match.group(1)), output[max(start, 0):]


class Vm:
    def __init__(self, workdir: Path, name: str, socket: Path, guest: GuestImage, *,
                 incoming: str | None = None, memory_mib: int = 256,
                 kernel_args: Sequence[str] = (), netdev: str = "vhost-user",
                 prefix: Sequence[str] = ()) -> None:
        """kernel_args go after the default kernel command line, e.g.
        guest.DHCP_ARG to configure eth0 by DHCP instead of statically.
        netdev "vhost-user" (default) connects to a vhost-user back-end on
        `socket`; "stream" uses QEMU's `-netdev stream` client on that UNIX
        socket (4-byte length + frame), as tether without --vhost-user serves;
        "user" is QEMU's built-in slirp (`socket` unused), a reference point.
        prefix goes before the QEMU command, e.g. `ip netns exec NS` (it
        must exec QEMU in place, so that proc.pid stays QEMU's)."""
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        accel = os.environ.get("TETHER_ACCEL", "tcg")
        cpu = os.environ.get("TETHER_CPU", "max" if accel == "tcg" else "host")
        cmd = [
            *prefix, QEMU, "-name", name,
            "-accel", accel, "-cpu", cpu,
            "-smp", "1", "-m", f"{memory_mib}M",
            "-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on",
            "-machine", "q35,memory-backend=mem",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", " ".join([KERNEL_CMDLINE, *kernel_args]),
            *self._netdev_args(netdev, socket),
            "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},romfile=",
            "-serial", "stdio",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if incoming:
            cmd += ["-incoming", incoming]
        self.log = (workdir / f"{name}.qemu.log").open("w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.console = Console(self.proc.stdout.fileno(), self.proc.stdin.fileno(), name)
        wait_for(lambda: self.qmp_path.exists() or self.proc.poll() is not None, 30,
                 f"{name} QMP socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{name}: QEMU exited: {self.stderr()}")
        self._qmp = self._connect_qmp()

    def _connect_qmp(self) -> QEMUMonitorProtocol:
        # Seen once under load: a connection made while QEMU was still starting
        # got an event where the greeting belongs, and qemu.qmp gave up on it.
        # The monitor serves any number of connections in turn: try a fresh one.
        for attempt in range(3):
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                qmp.connect()
                return qmp
            except ConnectError:
                qmp.close()
                if attempt == 2 or self.proc.poll() is not None:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _netdev_args(netdev: str, socket: Path) -> list[str]:
        if netdev == "vhost-user":
            # reconnect-ms: QEMU reconnects when the back-end drops the socket.
            return ["-chardev", f"socket,id=c0,path={socket},reconnect-ms=500",
                    "-netdev", "vhost-user,id=n0,chardev=c0"]
        if netdev == "stream":
            return ["-netdev",
                    f"stream,id=n0,server=off,addr.type=unix,addr.path={socket}"]
        if netdev == "user":
            return ["-netdev", "user,id=n0"]
        raise ValueError(f"unknown netdev {netdev!r}: vhost-user, stream or user")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def qmp(self, command: str, **args: Any) -> Any:
        return self._qmp.cmd(command, **args)

    def wait_booted(self) -> None:
        self.console.expect(READY_MARKER, BOOT_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class Backend:
    """A vhost-user back-end process: examples/vhost_user_responder.py."""

    def __init__(self, workdir: Path, name: str, *extra: str) -> None:
        self.socket = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("w")
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root / "src"))
        self.proc = subprocess.Popen(
            [sys.executable, str(root / "examples" / "vhost_user_responder.py"),
             "--socket", str(self.socket), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 20,
                 f"{name} socket")
        if self.proc.poll() is not None:
            raise RuntimeError(f"back-end {name} exited:\n{self.text()}")

    def text(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, pattern: str, timeout: float = 30.0, count: int = 1) -> None:
        regex = re.compile(pattern)
        wait_for(lambda: len(regex.findall(self.text())) >= count, timeout,
                 f"/{pattern}/ x{count} in back-end log:\n{self.text()[-3000:]}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> str:
        """Stop it and return its whole log (ends with its stats line)."""
        stop_process(self.proc, 20)
        self._log.close()
        return self.text()

    def stats(self) -> dict[str, int]:
        """The stats line the back-end prints when it stops."""
        match = re.findall(r"stats: (.*)", self.text())
        if not match:
            raise AssertionError(f"no stats line in back-end log:\n{self.text()[-3000:]}")
        return {k: int(v) for k, v in (kv.split("=") for kv in match[-1].split())}
