"""Peers on the host's loopback for the guest to talk to (threads in the test process)."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time

from tests.net.guest_tool import pattern, recv_all, send_pattern


class TcpPeer:
    """Accepts connections on 127.0.0.1; `handler` runs per connection in a thread."""

    def __init__(self, handler: str, send: int = 0, delay: float = 0.0,
                 family: socket.AddressFamily = socket.AF_INET) -> None:
        self.sock = socket.socket(family)
        self.sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.send = send
        self.delay = delay
        self.received: list[bytes] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(60)
            if self.handler == "transfer":
                self._transfer(conn)
            elif self.handler == "echo-line":
                line = b""
                while not line.endswith(b"\n"):
                    chunk = conn.recv(100)
                    if not chunk:
                        break
                    line += chunk
                conn.sendall(line)
                recv_all(conn)
            elif self.handler == "reset":
                conn.recv(10)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()
            self.done.set()

    def _transfer(self, conn: socket.socket) -> None:
        got: list[bytes] = []

        def reader() -> None:
            time.sleep(self.delay)  # load shaping: the guest's sends fill every buffer first
            got.append(recv_all(conn))

        t = threading.Thread(target=reader)
        t.start()
        send_pattern(conn, self.send)
        conn.shutdown(socket.SHUT_WR)
        t.join()
        self.received.append(got[0])

    def close(self) -> None:
        self.sock.close()


class LineEchoPeer:
    """Echoes one line per connection, for many connections at once, in one thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        buffers: dict[socket.socket, bytes] = {}
        try:
            self._loop(buffers)
        finally:
            # Every connection the peers had not closed yet, the listener and
            # the selector: a thousand of them would outlive the test.
            for conn in buffers:
                conn.close()
            self._sel.close()
            self.sock.close()

    def _loop(self, buffers: dict[socket.socket, bytes]) -> None:
        while not self._stop:
            for key, _ in self._sel.select(0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is self.sock:
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = s.accept()
                        conn.setblocking(False)
                        buffers[conn] = b""
                        self._sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(100)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._sel.unregister(s)
                    s.close()
                    buffers.pop(s, None)
                    continue
                buffers[s] += data
                if buffers[s].endswith(b"\n"):
                    s.sendall(buffers[s])
                    self.served += 1

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)


class UdpEchoPeer:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.sock.sendto(data[::-1], peer)

    def close(self) -> None:
        self.sock.close()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


__all__ = ["LineEchoPeer", "TcpPeer", "UdpEchoPeer", "free_port", "pattern"]
