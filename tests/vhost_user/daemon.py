"""A real tether daemon (`tether --vhost-user`) in its own network namespace,
and a plain-socket front-end for it, for tests that must see the process
survive (or not) what a hostile front-end sends."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.support import require_root, stop_process, wait_for
from tether.transport.vhost_user import protocol as p

SRC = Path(__file__).resolve().parents[2] / "src"


class Daemon:
    """`tether --vhost-user --socket PATH -f` under `unshare -n`."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        require_root("the daemon runs in a network namespace of its own")
        self.socket = workdir / "tether.sock"
        self.log_path = workdir / "tether.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONPATH=str(SRC))
        # --runas root: the socket lives in root's own test directory, which the
        # nobody tether would otherwise switch to cannot enter.
        self.proc = subprocess.Popen(
            ["unshare", "-n", sys.executable, "-m", "tether.cli", "--vhost-user", "--socket",
             str(self.socket), "-f", "--runas", "root", "--repair-path", "none",
             "-a", "10.0.2.15", "-n", "24",
             "-g", "10.0.2.2", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.socket.exists() or self.proc.poll() is not None, 30,
                 "the tether socket")
        assert self.proc.poll() is None, self.text()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        """Resident memory in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def peak_rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        status = stop_process(self.proc)
        self._log.close()
        assert status is not None
        return status


class Client:
    """A front-end over a real socket: messages with fds, replies with a deadline."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = p.VERSION) -> None:
        data = p.encode_request(request, payload, flags)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)

    def reply(self, request: int) -> bytes:
        req, flags, size = p.HEADER.unpack(self._recv(p.HEADER_SIZE))
        assert (req, flags) == (request, p.REPLY_FLAGS)
        return self._recv(size)

    def call_u64(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        self.send(request, payload, fds)
        return int(p.U64.unpack(self.reply(request))[0])

    def _recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("the daemon closed the connection")
            data += chunk
        return data

    def closed_by_peer(self) -> bool:
        """Whether the daemon ended this connection (waits up to the socket timeout)."""
        try:
            while self.sock.recv(4096):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def works(self) -> bool:
        """An honest request gets an honest answer."""
        return self.call_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES

    def close(self) -> None:
        self.sock.close()
