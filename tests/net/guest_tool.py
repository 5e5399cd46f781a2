"""Run inside the guest namespace by the tests: small, dependency-free network clients.

    tcp-client HOST PORT SEND RECV [DELAY]   send SEND pattern bytes, half-close, expect
                                             RECV bytes back; DELAY s before reading
    tcp-server PORT SEND                     accept one, read to EOF, send SEND bytes
    tcp-many HOST PORT N                     N concurrent connections, each echoes a line
    tcp-expect-refused HOST PORT
    tcp-expect-reset HOST PORT
    udp-echo HOST PORT
    udp-server PORT                          echo one datagram back
Exit status 0 and a one-line summary on success.
"""

from __future__ import annotations

import hashlib
import resource
import socket
import sys
import threading
import time

_BLOCK = bytes((i * 7 + 3) % 251 for i in range(1 << 16))


def pattern(n: int) -> bytes:
    reps = n // len(_BLOCK) + 1
    return (_BLOCK * reps)[:n]


def send_pattern(sock: socket.socket, n: int) -> None:
    view = memoryview(pattern(n))
    while view:
        sent = sock.send(view[:1 << 20])
        view = view[sent:]


def recv_all(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def check(data: bytes, n: int, what: str) -> None:
    if len(data) != n or data != pattern(n):
        digest = hashlib.sha256(data).hexdigest()
        raise SystemExit(f"{what}: got {len(data)} bytes (sha256 {digest}), want {n}")


def tcp_client(host: str, port: int, send: int, recv: int, delay: float) -> None:
    sock = socket.create_connection((host, port), timeout=60)
    got: list[bytes] = []

    def reader() -> None:
        time.sleep(delay)  # load shaping: lets the sender fill every window first
        got.append(recv_all(sock))

    t = threading.Thread(target=reader)
    t.start()
    send_pattern(sock, send)
    sock.shutdown(socket.SHUT_WR)
    t.join()
    check(got[0], recv, "guest received")
    print(f"ok sent {send} received {recv}")


def plain(addr: str) -> str:
    return addr.removeprefix("::ffff:")


def tcp_server(port: int, send: int) -> None:
    srv = socket.socket(socket.AF_INET6)  # dual-stack: IPv4 peers arrive as ::ffff:a.b.c.d
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(1)
    print("listening", flush=True)
    conn, peer = srv.accept()
    conn.settimeout(60)
    data = recv_all(conn)
    send_pattern(conn, send)
    conn.close()
    print(f"ok peer {plain(peer[0])} received {len(data)} "
          f"sha {hashlib.sha256(data).hexdigest()}")


def tcp_many(host: str, port: int, n: int) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # n sockets open at once
    socks = [socket.create_connection((host, port), timeout=60) for _ in range(n)]
    for i, s in enumerate(socks):
        s.sendall(f"{i}\n".encode())
    for i, s in enumerate(socks):
        line = b""
        while not line.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                break
            line += chunk
        if line != f"{i}\n".encode():
            raise SystemExit(f"connection {i}: got {line!r}")
    for s in socks:
        s.close()
    print(f"ok {n}")


def expect_error(host: str, port: int, exc_type: type[OSError]) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=20)
        sock.settimeout(20)
        sock.sendall(b"x")
        data = sock.recv(10)
        raise SystemExit(f"no error: got {data!r}")
    except exc_type as exc:
        print(f"ok {exc}")


def udp_echo(host: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    for i in range(3):
        msg = f"datagram {i}".encode() * 50
        sock.sendto(msg, (host, port))
        data, peer = sock.recvfrom(65535)
        if data != msg[::-1]:
            raise SystemExit(f"bad echo {data[:20]!r}")
    print(f"ok from {peer[0]}:{peer[1]}")


def udp_server(port: int) -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::", port))
    sock.settimeout(30)
    print("listening", flush=True)
    data, peer = sock.recvfrom(65535)
    sock.sendto(data[::-1], peer)
    print(f"ok peer {plain(peer[0])}")


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "tcp-client":
        tcp_client(args[0], int(args[1]), int(args[2]), int(args[3]),
                   float(args[4]) if len(args) > 4 else 0.0)
    elif cmd == "tcp-server":
        tcp_server(int(args[0]), int(args[1]))
    elif cmd == "tcp-many":
        tcp_many(args[0], int(args[1]), int(args[2]))
    elif cmd == "tcp-expect-refused":
        expect_error(args[0], int(args[1]), ConnectionRefusedError)
    elif cmd == "tcp-expect-reset":
        expect_error(args[0], int(args[1]), ConnectionResetError)
    elif cmd == "udp-echo":
        udp_echo(args[0], int(args[1]))
    elif cmd == "udp-server":
        udp_server(int(args[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
