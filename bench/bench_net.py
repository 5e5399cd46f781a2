"""tether's stack against the kernel's own ceiling, in one run, side by side.

A network namespace is the guest.  Each figure is measured twice:
  tether  guest namespace --tap--> tether (this machine's initial namespace) --> 127.0.0.1
  veth    guest namespace --veth--> a second namespace (the kernel forwarding alone)
Figures: iperf3 TCP throughput both ways at MTU 65520 and 1500, connection setup
rate, TCP request/response latency, tether CPU seconds per GB moved.

    python bench/bench_net.py [--time SECONDS]      (root; needs iperf3)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

GUEST, GATEWAY = "10.77.0.2", "10.77.0.1"
ROOT = Path(__file__).resolve().parent.parent

CLIENT = r"""
import socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "connect":
    t = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection((host, port)); s.recv(1); s.close()
    print(n / (time.perf_counter() - t))
else:
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = time.perf_counter()
    for _ in range(n):
        s.send(b"x"); s.recv(1)
    print((time.perf_counter() - t) / n * 1e6)
"""

# Both ends send `total` bytes of a known stream and check what they receive
# block by block, so a 1 GiB transfer needs no 1 GiB buffer.
STREAM = r"""
import socket, sys, threading
def block(i):
    return bytes([(i * 13 + k) % 251 for k in range(256)]) * 256  # 64 KiB, varies per i
def run(s, total):
    bad = []
    def send():
        i = sent = 0
        while sent < total:
            b = block(i % 97)[:total - sent]
            s.sendall(b); sent += len(b); i += 1
        s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    i = got = 0; buf = b""
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        buf += d
        while len(buf) >= 65536 or (buf and got + len(buf) == total):
            want = block(i % 97)[:min(65536, total - got)]
            if buf[:len(want)] != want:
                bad.append(i)
            buf = buf[len(want):]; got += len(want); i += 1
    t.join()
    return got == total and not bad
"""
STREAM_CLIENT = STREAM + r"""
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("ok" if run(s, int(sys.argv[3])) else "MISMATCH")
"""

SERVER = r"""
import socket, sys, threading
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(512)
print("ready", flush=True)
while True:
    c, _ = srv.accept()
    if mode == "connect":
        c.send(b"y"); c.close()
    else:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (d := c.recv(1)):
            c.send(d)
        c.close()
"""


def sh(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def ns_cmd(ns: str | None, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Setup:
    """A guest namespace and where its peer lives (server_ns None: the initial one)."""

    def __init__(self, kind: str, mtu: int) -> None:
        self.kind = kind
        self.mtu = mtu
        tag = f"{os.getpid()}{kind[0]}{mtu}"
        self.guest = f"bng{tag}"
        self.server_ns: str | None = None
        self.server_addr = "127.0.0.1"
        self.target = GATEWAY
        self.tether: subprocess.Popen[bytes] | None = None
        self.iperf_server: subprocess.Popen[bytes] | None = None
        self.iperf_port = 0
        sh("ip", "netns", "add", self.guest)
        sh("ip", "-n", self.guest, "link", "set", "lo", "up")
        if kind == "tether":
            log = f"/tmp/bench-net-{tag}.log"
            self.tether = subprocess.Popen(
                [sys.executable, "-m", "tether.cli", "-f", "-l", log, "--netns", self.guest,
                 "-a", GUEST, "-n", "24", "-g", GATEWAY, "-m", str(mtu)],
                cwd=ROOT)
            deadline = time.monotonic() + 10
            while "running" not in (Path(log).read_text() if Path(log).exists() else ""):
                if time.monotonic() > deadline or self.tether.poll() is not None:
                    raise SystemExit("tether did not start")
                time.sleep(0.05)
            dev = "tap0"
        else:
            self.server_ns = f"bnh{tag}"
            self.server_addr = self.target = GATEWAY
            sh("ip", "netns", "add", self.server_ns)
            sh("ip", "-n", self.server_ns, "link", "set", "lo", "up")
            sh("ip", "link", "add", "bnv0", "netns", self.guest, "type", "veth", "peer",
               "name", "bnv1", "netns", self.server_ns)
            sh("ip", "-n", self.server_ns, "link", "set", "bnv1", "mtu", str(mtu), "up")
            sh("ip", "-n", self.server_ns, "addr", "add", f"{GATEWAY}/24", "dev", "bnv1")
            dev = "bnv0"
        sh("ip", "-n", self.guest, "link", "set", dev, "mtu", str(mtu), "up")
        sh("ip", "-n", self.guest, "addr", "add", f"{GUEST}/24", "dev", dev)
        sh("ip", "-n", self.guest, "route", "add", "default", "via", GATEWAY)

    def close(self) -> None:
        if self.iperf_server is not None:
            self.iperf_server.kill()
            self.iperf_server.wait()
        if self.tether is not None:
            self.tether.terminate()
            self.tether.wait()
        for ns in (self.guest, self.server_ns):
            if ns:
                subprocess.run(["ip", "netns", "del", ns], check=False)

    def cpu(self) -> float:
        return cpu_seconds(self.tether.pid) if self.tether is not None else 0.0

    def iperf(self, seconds: float, reverse: bool) -> tuple[float, float]:
        """(Gbit/s, tether CPU seconds per GB moved)."""
        if self.iperf_server is None:
            self.iperf_port = free_port()
            self.iperf_server = subprocess.Popen(
                ns_cmd(self.server_ns, "iperf3", "-s", "-B", self.server_addr, "-p",
                       str(self.iperf_port)), stdout=subprocess.DEVNULL)
        cpu0 = self.cpu()
        for _ in range(50):
            done = subprocess.run(ns_cmd(self.guest, "iperf3", "-c", self.target, "-p",
                                         str(self.iperf_port), "-t", str(seconds), "-J",
                                         *(["-R"] if reverse else [])),
                                  capture_output=True, text=True, check=False)
            try:
                end = json.loads(done.stdout)["end"]["sum_received"]
                break
            except (ValueError, KeyError):
                pass
            time.sleep(0.2)  # the server may not listen yet, or still be busy
            cpu0 = self.cpu()
        else:
            raise SystemExit(f"iperf3 failed over {self.kind}: {done.stdout[-400:]}")
        cpu = self.cpu() - cpu0
        gbytes = end["bytes"] / 1e9
        return end["bits_per_second"] / 1e9, (cpu / gbytes if gbytes else 0.0)

    def exact(self, total: int) -> tuple[bool, float]:
        """total bytes each way at once, checked byte by byte: (intact, seconds)."""
        port = free_port()
        server_code = STREAM + (
            f"\nsrv = socket.socket(); srv.bind(('127.0.0.1', {port})); srv.listen(1)"
            "\nprint('ready', flush=True); c, _ = srv.accept()"
            f"\nprint('ok' if run(c, {total}) else 'MISMATCH')")
        server = subprocess.Popen([sys.executable, "-c", server_code], stdout=subprocess.PIPE,
                                  text=True)
        assert server.stdout is not None
        server.stdout.readline()
        started = time.perf_counter()
        client = sh(*ns_cmd(self.guest, sys.executable, "-c", STREAM_CLIENT, self.target,
                            str(port),
                            str(total))).stdout.strip()
        server_said = server.stdout.readline().strip()
        server.wait()
        return client == server_said == "ok", time.perf_counter() - started

    def small(self, mode: str, n: int) -> float:
        port = free_port()
        server = subprocess.Popen(ns_cmd(self.server_ns, sys.executable, "-c", SERVER, mode,
                                         self.server_addr, str(port)),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            server.stdout.readline()
            out = sh(*ns_cmd(self.guest, sys.executable, "-c", CLIENT, mode, self.target,
                             str(port), str(n))).stdout
            return float(out)
        finally:
            server.kill()
            server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time", type=float, default=5.0, help="seconds per iperf3 run")
    p.add_argument("--gib", action="store_true",
                   help="only the 1 GiB byte-exact transfer, both ways at once, via tether")
    args = p.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_net: needs root (network namespaces)")
    if args.gib:
        setup = Setup("tether", 65520)
        try:
            intact, seconds = setup.exact(1 << 30)
        finally:
            setup.close()
        print(f"1 GiB each way at once through tether: {'byte-exact' if intact else 'CORRUPT'}"
              f", {seconds:.1f} s, {2 * 8 * (1 << 30) / seconds / 1e9:.2f} Gbit/s total")
        raise SystemExit(0 if intact else 1)
    rows: list[tuple[str, str, str, str]] = []
    for mtu in (65520, 1500):
        setups = [Setup("tether", mtu), Setup("veth", mtu)]
        try:
            for reverse, label in ((False, "guest->host"), (True, "host->guest")):
                t_gbps, t_cpu = setups[0].iperf(args.time, reverse)
                v_gbps, _ = setups[1].iperf(args.time, reverse)
                rows.append((f"iperf3 {label} MTU {mtu}", f"{t_gbps:.2f} Gbit/s",
                             f"{v_gbps:.2f} Gbit/s", f"{t_cpu:.2f} CPU-s/GB, "
                             f"{t_gbps / v_gbps:.0%} of veth"))
            if mtu == 65520:
                t = setups[0].small("connect", 1000)
                v = setups[1].small("connect", 1000)
                rows.append(("TCP connections/s (sequential)", f"{t:.0f}", f"{v:.0f}",
                             f"{t / v:.0%} of veth"))
                t = setups[0].small("rr", 5000)
                v = setups[1].small("rr", 5000)
                rows.append(("TCP_RR round trip", f"{t:.0f} us", f"{v:.0f} us",
                             f"{t / v:.1f}x veth"))
        finally:
            for s in setups:
                s.close()
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'tether':>14}  {'veth':>14}  note")
    for name, t_fig, v_fig, note in rows:
        print(f"{name:<{width}}  {t_fig:>14}  {v_fig:>14}  {note}")


if __name__ == "__main__":
    main()
