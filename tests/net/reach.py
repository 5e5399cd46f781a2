"""Who reaches whom: a host-side echo server that counts, and a guest-side client.

    serve tcp|udp ADDR PORT     echo every connection / datagram back; prints
                                "listening", "accepted" and "peer ADDR" for each,
                                and "served N" on SIGTERM
    try tcp|udp ADDR PORT       one echo exchange (64 KiB over TCP, one datagram
                                over UDP), 5 s at most: "echoed N" (status 0) or
                                "failed: ERROR" (status 1)
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

DATA = bytes((i * 13 + 7) % 256 for i in range(1 << 16))


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def serve(kind: str, addr: str, port: int) -> None:
    served = 0
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    srv = socket.socket(_family(addr), stype)
    if srv.family == socket.AF_INET6:
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if kind == "tcp":
        srv.listen(8)
    srv.settimeout(0.1)
    print("listening", flush=True)
    while not stop.is_set():
        try:
            if kind == "tcp":
                conn, peer = srv.accept()
            else:
                data, peer = srv.recvfrom(65535)
        except TimeoutError:
            continue
        served += 1
        print("accepted", flush=True)
        print(f"peer {peer[0]}", flush=True)
        if kind == "udp":
            srv.sendto(data, peer)
            continue
        with conn:
            conn.settimeout(10)
            chunks = []
            with contextlib.suppress(OSError):
                while chunk := conn.recv(1 << 16):
                    chunks.append(chunk)
                conn.sendall(b"".join(chunks))
    # What arrived but was not served yet counts too: a test stops this server only
    # after something that arrived later elsewhere.
    srv.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            srv.accept() if kind == "tcp" else srv.recvfrom(65535)
            served += 1
    print(f"served {served}", flush=True)


def attempt(kind: str, addr: str, port: int) -> int:
    try:
        if kind == "tcp":
            with socket.create_connection((addr, port), timeout=5) as s:
                s.sendall(DATA)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(1 << 16):
                    got += chunk
        else:
            with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
                s.settimeout(5)
                s.sendto(DATA[:1000], (addr, port))
                got, _ = s.recvfrom(65535)
                got += DATA[1000:]  # only the datagram went; compare what did
    except OSError as exc:
        print(f"failed: {exc!r}")
        return 1
    if got != DATA:
        print(f"failed: {len(got)} bytes came back, not the {len(DATA)} sent")
        return 1
    print(f"echoed {len(DATA)}")
    return 0


if __name__ == "__main__":
    cmd, kind, host, portno = sys.argv[1:5]
    if cmd == "serve":
        serve(kind, host, int(portno))
    else:
        sys.exit(attempt(kind, host, int(portno)))
