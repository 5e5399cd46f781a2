"""A test process that holds one end of a TCP stream (run as a script).

    agent.py peer ADDR PORT MSS      listen, accept one connection, stream
    agent.py source ADDR PORT        connect, stream, then freeze on command
    agent.py target                  restore on command, then stream on

Both directions carry a byte pattern that is a function of the stream offset,
so each receiver checks every byte it gets, in order.  The agent reads one
command per line on stdin and answers one JSON object per line on stdout.
Commands: "status", "freeze PATH OUT" (source), "release" (source),
"hold IN" and "restore PATH IN SENT RECEIVED" (target), "finish" (peer,
target), "quit".
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import threading
import time
from typing import Any

from tether.repair import kernel as k
from tether.repair import tcp
from tether.repair.client import RepairHelper
from tether.repair.record import decode

PERIOD_UP = 251  # source/target -> peer
PERIOD_DOWN = 241  # peer -> source/target
CHUNK = 16384


def _tile(period: int, mult: int) -> bytes:
    base = bytes((i * mult + 7) % 256 for i in range(period))
    return base * (CHUNK // period + 2)


TILES = {PERIOD_UP: _tile(PERIOD_UP, 3), PERIOD_DOWN: _tile(PERIOD_DOWN, 5)}


def pattern(period: int, offset: int, length: int) -> bytes:
    start = offset % period
    return TILES[period][start : start + length]


class Stream:
    """Sends the pattern and checks what arrives, on a thread, until stopped."""

    def __init__(self, sock: socket.socket, send_period: int, recv_period: int,
                 sent: int = 0, received: int = 0) -> None:
        self.sock = sock
        self.send_period = send_period
        self.recv_period = recv_period
        self.sent = sent
        self.received = received
        self.sending = True
        self.receiving = True
        self.eof = False
        self.error: str | None = None
        self._stop = threading.Event()
        # Set by the thread once it has seen receiving False at the top of
        # its loop: from then on it reads nothing (a recv it had started
        # before the flag changed is over).
        self.reading_paused = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        sock.setblocking(False)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        buf = bytearray(CHUNK * 4)
        while not self._stop.is_set() and self.error is None:
            want_w = [self.sock] if self.sending else []
            want_r = [self.sock] if self.receiving and not self.eof else []
            if not self.receiving:
                self.reading_paused.set()
            r, w, _ = select.select(want_r, want_w, [], 0.05)
            try:
                if w:
                    n = self.sock.send(pattern(self.send_period, self.sent, CHUNK))
                    self.sent += n
                if r:
                    n = self.sock.recv_into(buf, CHUNK)
                    if n == 0:
                        self.eof = True
                    elif buf[:n] != pattern(self.recv_period, self.received, n):
                        self.error = f"wrong bytes at offset {self.received}"
                    else:
                        self.received += n
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                self.error = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e}"

    def status(self) -> dict[str, Any]:
        return {"sent": self.sent, "received": self.received, "eof": self.eof,
                "error": self.error}

    def finish(self, timeout: float) -> dict[str, Any]:
        """Stop sending, send FIN, take everything until the peer's FIN."""
        self.sending = False
        deadline = time.monotonic() + timeout
        # The thread may be inside a send; stop it, then finish inline.
        self.stop()
        self.sock.setblocking(True)
        self.sock.shutdown(socket.SHUT_WR)
        buf = bytearray(CHUNK * 4)
        while not self.eof and self.error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.error = "no end of stream in time"
                break
            self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(buf, CHUNK)
            except OSError as e:
                self.error = f"{errno.errorcode.get(e.errno or 0, e.errno)}: {e}"
                break
            if n == 0:
                self.eof = True
            elif buf[:n] != pattern(self.recv_period, self.received, n):
                self.error = f"wrong bytes at offset {self.received}"
            else:
                self.received += n
        return self.status()


def info(sock: socket.socket) -> dict[str, int]:
    state, options, snd_ws, rcv_ws, snd_mss = k.tcp_info(sock)
    return {"state": state, "options": options, "snd_wscale": snd_ws, "rcv_wscale": rcv_ws,
            "snd_mss": snd_mss}


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def in_flight(sock: socket.socket) -> Any:
    return lambda: k.ioctl_int(sock, k.SIOCOUTQ) > k.ioctl_int(sock, k.SIOCOUTQNSD)


def run_peer(addr: str, port: int, mss: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.setsockopt(k.SOL_TCP, k.TCP_MAXSEG, mss)
    lst.bind((addr, port))
    lst.listen(1)
    reply({"listening": True})
    conn, _ = lst.accept()
    lst.close()
    stream = Stream(conn, PERIOD_DOWN, PERIOD_UP)
    stream.start()
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "status":
            reply(stream.status() | {"info": info(conn)})
        elif cmd[0] == "finish":
            reply(stream.finish(20.0))
        elif cmd[0] == "quit":
            return


def run_source(addr: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.create_connection((addr, port))
    assert sock.family == family
    stream = Stream(sock, PERIOD_UP, PERIOD_DOWN)
    stream.start()
    reply({"connected": sock.getsockname()[:2]})
    guard: socket.socket | None = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "status":
            reply(stream.status() | {"info": info(sock)})
        elif cmd[0] == "freeze":
            helper = RepairHelper(cmd[1])
            reply({"listening": cmd[1]})
            helper.wait(10.0)
            # Stop reading while the peer keeps sending: unread data piles up.
            stream.receiving = False
            stream.reading_paused.wait(5.0)
            unread = wait_until(lambda: k.ioctl_int(sock, k.SIOCINQ) > 0, 5.0)
            # Silence the socket while data is in flight: the peer's ACKs for
            # it are dropped, so it is provably sent and unacknowledged when
            # we dump.  (An ACK may just beat us to it: try again.)
            unacked = False
            for _ in range(100):
                wait_until(in_flight(sock), 1.0)
                k.silence(sock)
                if in_flight(sock)():
                    unacked = True
                    break
                k.unsilence(sock)
            stream.stop()
            before = info(sock)
            tcp.freeze([sock], helper)
            state = tcp.dump(sock)
            guard = tcp.hold_address(state)
            sock.close()  # in repair mode: nothing reaches the peer
            helper.close()
            with open(cmd[2], "wb") as f:
                f.write(state.encode())
            reply(stream.status() | {"info": before, "unacked_seen": unacked, "unread_seen": unread,
                                     "sent_len": state.sent_len, "unsent_len": state.unsent_len,
                                     "rcvq_len": len(state.recv_queue),
                                     "mss": state.mss})
        elif cmd[0] == "release":
            if guard is not None:
                guard.close()
            reply({"released": True})
        elif cmd[0] == "quit":
            return


def run_target() -> None:
    stream: Stream | None = None
    sock: socket.socket | None = None
    guard: socket.socket | None = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "hold":
            # Before the address comes up here: segments that arrive before
            # the restore are dropped, not answered with a reset.
            with open(cmd[1], "rb") as f:
                guard = tcp.hold_address(decode(f.read())[0])
            reply({"holding": True})
        elif cmd[0] == "restore":
            helper = RepairHelper(cmd[1])
            reply({"listening": cmd[1]})
            helper.wait(10.0)
            with open(cmd[2], "rb") as f:
                state, _ = decode(f.read())
            sent, received = int(cmd[3]), int(cmd[4])
            sock = tcp.restore(state, helper)
            tcp.thaw(sock, state, helper)
            helper.close()
            if guard is not None:
                guard.close()
            # The restored queues continue the stream where the source's
            # application left it: unread bytes first, then new ones.
            stream = Stream(sock, PERIOD_UP, PERIOD_DOWN, sent=sent, received=received)
            stream.start()
            reply({"restored": True, "info": info(sock)})
        elif cmd[0] == "status" and stream is not None and sock is not None:
            reply(stream.status() | {"info": info(sock)})
        elif cmd[0] == "finish" and stream is not None:
            reply(stream.finish(20.0))
        elif cmd[0] == "quit":
            return


def main() -> None:
    role = sys.argv[1]
    try:
        if role == "peer":
            run_peer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        elif role == "source":
            run_source(sys.argv[2], int(sys.argv[3]))
        elif role == "target":
            run_target()
    except Exception as e:
        reply({"fatal": f"{type(e).__name__}: {e}"})
        raise
    os._exit(0)


if __name__ == "__main__":
    main()
