"""tether's stack against the kernel's own ceiling, in one run, side by side.

A network namespace is the guest.  Each figure is measured for each of:
  tether  guest namespace --tap--> tether (this machine's initial namespace) --> 127.0.0.1
  pasta   the same, with pasta in tether's place (the build ./dev setup makes)
  veth    guest namespace --veth--> a second namespace (the kernel forwarding alone)
The last column is tether's figure over pasta's (over veth's without pasta).
pasta gives the small-packet figures only (connections, time to first byte,
request/response): attached this way to a namespace it did not create, its
guest -> host bulk rate falls to about 0.1 Gbit/s, which is not what pasta
does with its own namespace, so its iperf3 figures would mislead.
Figures: iperf3 TCP throughput both ways at MTU 65520 and 1500, connection setup
rate and time to first byte (connect until the server's first byte), TCP and
UDP request/response latency (1 byte each way, median) and the back-end's CPU
per transaction, tether CPU seconds per GB moved.

    python bench/bench_net.py [--time SECONDS] [--baseline DIR]   (root; needs iperf3)

--baseline DIR runs the tether of another checkout as a fourth column, and
adds this tree's figure over the baseline's: the ratio to quote for a change.
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
PASTA = Path.home() / ".cache" / "tether" / "passt" / "pasta"  # ./dev setup builds it

CLIENT = r"""
import json, socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
size = int(sys.argv[5]) if len(sys.argv) > 5 else 1
if mode == "connect":
    firsts = []
    t = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection((host, port)); s.recv(1)
        firsts.append(time.perf_counter() - t0)
        s.close()
    firsts.sort()
    # connections/s, then time to first byte (connect until the server's byte): median, max
    print(json.dumps({"rate": n / (time.perf_counter() - t), "median_us": firsts[n // 2] * 1e6,
                      "worst_us": firsts[-1] * 1e6}))
else:
    udp = mode == "udprr"
    if udp:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.settimeout(0.2)  # a datagram lost either way: send the request again
    else:
        s = socket.create_connection((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    lost = 0
    request = b"x" * size
    t = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        while True:
            s.send(request)
            try:
                s.recv(size)
                break
            except TimeoutError:
                lost += 1
                if lost > 20 and not times:  # no reply comes back at all
                    print(json.dumps({"failed": f"no reply to {lost} datagrams of {size} B"}))
                    sys.exit(0)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - t
    times.sort()
    print(json.dumps({"rate": n / total, "median_us": times[n // 2] * 1e6,
                      "mean_us": total / n * 1e6, "lost": lost}))
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
import socket, sys
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "udprr":
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((host, port))
    print("ready", flush=True)
    while True:
        d, peer = srv.recvfrom(2048)
        srv.sendto(d, peer)
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


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of pid so far, from /proc/PID/stat: clock ticks
    (10 ms), so only a sum over many runs splits a small figure well."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of every thread of pid so far.

    /proc/PID/task/*/sched's sum_exec_runtime has sub-microsecond resolution,
    where /proc/PID/stat counts clock ticks (10 ms): a request/response run
    costs pasta well under a second, so ticks alone would blur the ratio.
    Kernels without the scheduler's debug files fall back to the ticks.
    """
    total = 0.0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "sched").read_text().splitlines():
                if line.startswith("se.sum_exec_runtime"):
                    total += float(line.split(":")[1]) / 1e3  # milliseconds
                    break
            else:
                raise FileNotFoundError("no sum_exec_runtime")
        return total
    except FileNotFoundError:
        return sum(cpu_split(pid))


class Setup:
    """A guest namespace and where its peer lives (server_ns None: the initial one)."""

    def __init__(self, kind: str, mtu: int, src: Path | None = None) -> None:
        """kind "tether" runs this tree's tether, or the one under src (a checkout's
        src/, for kind "baseline")."""
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
        if kind == "pasta":
            # As root, --runas 0: pasta joins the namespace, which as nobody it may not.
            # No port forwarding, as tether here: pasta's default ("auto") scans
            # /proc/net/tcp* every second to follow bound ports, which with the
            # host's TIME_WAIT sockets of a connection-rate run stalls pasta for
            # ~0.2 s each second (perf: established_get_first, vsnprintf).
            self.tether = subprocess.Popen(
                [str(PASTA), "-f", "-q", "--runas", "0", "--netns", f"/run/netns/{self.guest}",
                 "-I", "tap0", "-a", GUEST, "-n", "24", "-g", GATEWAY, "-m", str(mtu),
                 "-t", "none", "-u", "none", "-T", "none", "-U", "none"],
                stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while sh("ip", "-n", self.guest, "link").stdout.count("tap0") == 0:
                if time.monotonic() > deadline or self.tether.poll() is not None:
                    raise SystemExit("pasta did not start")
                time.sleep(0.05)
            dev = "tap0"
        elif kind in ("tether", "baseline"):
            log = f"/tmp/bench-net-{tag}.log"
            Path(log).unlink(missing_ok=True)  # a stale "running" would pass the wait below
            env = os.environ | ({"PYTHONPATH": str(src)} if src is not None else {})
            self.tether = subprocess.Popen(
                [sys.executable, "-m", "tether.cli", "-f", "-l", log, "--netns", self.guest,
                 "-a", GUEST, "-n", "24", "-g", GATEWAY, "-m", str(mtu)],
                cwd=ROOT, env=env)
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

    def small(self, mode: str, n: int, size: int = 1) -> dict[str, float]:
        """One client run in the guest against a server on the host side:
        mode "connect" (n new connections), "rr" (n 1-byte TCP exchanges on one
        connection) or "udprr" (n UDP datagrams of size bytes, echoed).  The
        client's figures plus "cpu_us": the back-end's CPU per connection or
        transaction, read from /proc before and after the client ran (its
        start-up included, which costs the back-end nothing but a flow), and
        "user_s"/"sys_s", its user and system CPU seconds in clock ticks.
        RuntimeError if no reply came back at all."""
        port = free_port()
        server = subprocess.Popen(ns_cmd(self.server_ns, sys.executable, "-c", SERVER, mode,
                                         self.server_addr, str(port)),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            server.stdout.readline()
            assert self.tether is not None
            split0 = cpu_split(self.tether.pid)
            cpu0 = self.cpu()
            out = sh(*ns_cmd(self.guest, sys.executable, "-c", CLIENT, mode, self.target,
                             str(port), str(n), str(size))).stdout
            figures: dict[str, float] = json.loads(out)
            if "failed" in figures:
                raise RuntimeError(f"{self.kind} {mode}: {figures['failed']}")
            figures["cpu_us"] = (self.cpu() - cpu0) * 1e6 / n
            split1 = cpu_split(self.tether.pid)
            figures["user_s"] = split1[0] - split0[0]
            figures["sys_s"] = split1[1] - split0[1]
            return figures
        finally:
            server.kill()
            server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--time", type=float, default=5.0, help="seconds per iperf3 run")
    p.add_argument("--baseline", type=Path,
                   help="also run the tether of this checkout (e.g. `git worktree add "
                        "/tmp/base COMMIT`) beside this tree's, runs alternating")
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
    kinds = ["tether"] + (["baseline"] if args.baseline else []) + \
        (["pasta"] if PASTA.is_file() else []) + ["veth"]
    if "pasta" not in kinds:
        print("no pasta build (./dev setup makes one): tether against veth only")
    # figure -> kind -> (value, unit, lower is better)
    rows: dict[str, dict[str, tuple[float, str, bool]]] = {}

    def put(figure: str, kind: str, value: float, unit: str, lower: bool) -> None:
        rows.setdefault(figure, {})[kind] = (value, unit, lower)

    for mtu in (65520, 1500):
        setups = {kind: Setup(kind, mtu, args.baseline / "src" if kind == "baseline" and
                              args.baseline else None) for kind in kinds}
        try:
            for reverse, label in ((False, "guest->host"), (True, "host->guest")):
                for kind, setup in setups.items():
                    if kind == "pasta":
                        continue  # see the module's docstring
                    gbps, cpu = setup.iperf(args.time, reverse)
                    put(f"iperf3 {label} MTU {mtu}", kind, gbps, "Gbit/s", False)
                    if kind != "veth":
                        put(f"  CPU-s/GB {label} MTU {mtu}", kind, cpu, "", True)
            if mtu == 65520:
                for kind, setup in setups.items():
                    c = setup.small("connect", 1000)
                    put("TCP connections/s (sequential)", kind, c["rate"], "", False)
                    put("time to first byte, median", kind, c["median_us"], "us", True)
                    put("time to first byte, worst of 1000", kind, c["worst_us"], "us", True)
                for mode, name in (("rr", "TCP_RR"), ("udprr", "UDP_RR")):
                    for kind, setup in setups.items():
                        try:
                            r = setup.small(mode, 5000)
                        except RuntimeError as exc:  # no reply at all: say so, carry on
                            print(f"{name} 1-byte: {exc}")
                            continue
                        put(f"{name} round trip, median", kind, r["median_us"], "us", True)
                        if kind != "veth":
                            put(f"  {name} back-end CPU per transaction", kind, r["cpu_us"],
                                "us", True)
        finally:
            for s in setups.values():
                s.close()
    reference = "pasta" if "pasta" in kinds else "veth"
    width = max(len(r) for r in rows)
    print(f"{'figure':<{width}}  " + "  ".join(f"{k:>14}" for k in kinds) +
          f"  tether / {reference}")
    for figure, values in rows.items():
        cells = [f"{values[k][0]:.2f} {values[k][1]}".strip() if k in values else "-"
                 for k in kinds]
        ratio = ""
        if "tether" in values and reference in values and values[reference][0]:
            ratio = f"{values['tether'][0] / values[reference][0]:.2f}x"
        if "tether" in values and values.get("baseline", (0.0,))[0]:
            ratio += f"  (/ baseline {values['tether'][0] / values['baseline'][0]:.2f}x)"
        print(f"{figure:<{width}}  " + "  ".join(f"{c:>14}" for c in cells) + f"  {ratio}")


if __name__ == "__main__":
    main()
