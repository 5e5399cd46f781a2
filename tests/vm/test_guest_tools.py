"""The guest's traffic tools: iperf3, tstream, DHCP; and pattern.py on the host.

Host-side tests run tstream compiled for the host (the same source and
flags as the image's) against pattern.py over loopback.  The guest tests
boot the real image on the test-aid back-end: tstream against itself on
the guest's loopback, a pattern file checked byte for byte against
pattern.py, the udhcpc script, and a boot with tether.net=dhcp.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import pattern
from .conftest import _unavailable
from .guest import (
    DHCP_ARG,
    GATEWAY_IP,
    GUEST_IP,
    READY_MARKER,
    UDHCPC_SCRIPT_PATH,
    GuestImage,
    build_tstream,
)
from .harness import Backend, Vm

TIMEOUT = 30.0


# -- pattern.py ----------------------------------------------------------


def test_pattern_known_answer() -> None:
    # key(0) = 0x9E3779B97F4A7C15: word 0 is the key, word 1 the key ^ 1, LE.
    assert pattern.generate(0, 0, 16).hex() == "157c4a7fb979379e147c4a7fb979379e"
    assert pattern.key(1) == (2 * 0x9E3779B97F4A7C15) % 2**64


def test_pattern_blocks_agree_with_the_definition() -> None:
    for seed in (0, 1, 2**64 - 2):
        for offset, length in ((0, 20), (3, 9), (pattern.BLOCK - 5, 17),
                               (7 * pattern.BLOCK + 1, 3 * pattern.BLOCK + 2), (2**40 + 3, 11)):
            data = pattern.generate(seed, offset, length)
            assert len(data) == length
            picks = range(0, length, max(1, length // 64))
            assert all(data[j] == pattern.byte_at(seed, offset + j) for j in picks)
            assert data[-1] == pattern.byte_at(seed, offset + length - 1)


def test_checker_finds_the_first_damaged_byte() -> None:
    good = pattern.generate(4, 0, 300_000)
    pieces = [good[i:i + 1447] for i in range(0, len(good), 1447)]
    checker = pattern.Checker(4)
    assert all(checker.feed(p) for p in pieces)
    assert checker.result() == "ok bytes=300000"
    damaged = {
        "corrupt": good[:123_457] + bytes([good[123_457] ^ 0x40]) + good[123_458:],
        "lost": good[:100_000] + good[101_448:],
        "duplicated": good[:100_000] + good[98_552:],
        "reordered": good[:100_000] + good[101_448:102_896] + good[100_000:101_448],
    }
    for what, data in damaged.items():
        bad = pattern.first_mismatch(data, 4)
        assert bad is not None, what
        expected_at = 123_457 if what == "corrupt" else 100_000
        assert expected_at <= bad.offset < expected_at + 8, (what, bad)
        assert bad.expected == pattern.byte_at(4, bad.offset) != bad.found
    assert pattern.first_mismatch(good, 5) == pattern.Mismatch(
        0, pattern.key(5) & 0xFF, pattern.key(4) & 0xFF)


def test_pattern_is_fast_enough_for_hundreds_of_mib() -> None:
    start = time.monotonic()
    checker = pattern.Checker(9)
    source = pattern.Source(9)
    for _ in range(32):
        assert checker.feed(source.read(1 << 20))
    rate = 32 / (time.monotonic() - start)
    assert rate > 40, f"{rate:.0f} MiB/s generated and checked"


def test_parse_result() -> None:
    assert pattern.parse_result("x\nTSTREAM sent=12\n") == {"result": "sent", "bytes": "12"}
    assert pattern.parse_result("TSTREAM error reset after=5") == {
        "result": "error", "kind": "reset", "after": "5"}
    assert pattern.parse_result("TSTREAM bad offset=3 expected=0x01 found=0x02")["offset"] == "3"


# -- tstream on the host, against pattern.py -----------------------------


@pytest.fixture(scope="module")
def tstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_tstream(tmp_path_factory.mktemp("tstream"))
    except Exception as e:
        _unavailable(f"cannot build tstream: {e}")
        raise


def _listener() -> socket.socket:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(TIMEOUT)
    return lsock


def _spawn(tstream: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([str(tstream), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, dict[str, str], str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, pattern.parse_result(out), err


def _accept(lsock: socket.socket) -> socket.socket:
    conn, _ = lsock.accept()
    conn.settimeout(TIMEOUT)
    return conn


def _send_all_in_odd_pieces(conn: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(data), 7001):
        conn.sendall(view[i:i + 7001])


def _reset(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def test_tstream_recv_checks_what_pattern_py_sends(tstream: Path) -> None:
    with _listener() as lsock:
        proc = _spawn(tstream, "recv", "127.0.0.1", str(lsock.getsockname()[1]), "7")
        with _accept(lsock) as conn:
            _send_all_in_odd_pieces(conn, pattern.generate(7, 0, 3 * 2**20 + 5))
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""  # tstream closes once it has it all
    status, result, err = _finish(proc)
    assert (status, result) == (0, {"result": "ok", "bytes": str(3 * 2**20 + 5)}), err


def test_tstream_send_is_the_pattern_py_stream(tstream: Path, tmp_path: Path) -> None:
    progress = tmp_path / "progress"
    with _listener() as lsock:
        proc = _spawn(tstream, "-p", str(progress), "send", "127.0.0.1",
                      str(lsock.getsockname()[1]), "2M", "9")
        checker = pattern.Checker(9)
        with _accept(lsock) as conn:
            while data := conn.recv(65536):
                assert checker.feed(data), checker.bad
    status, result, err = _finish(proc)
    assert (status, result) == (0, {"result": "sent", "bytes": str(2 * 2**20)}), err
    assert checker.result() == f"ok bytes={2 * 2**20}"
    assert progress.read_text().startswith(f"TSTREAM progress bytes={2 * 2**20} ")


def test_tstream_reports_the_offset_of_a_corrupt_byte(tstream: Path) -> None:
    data = bytearray(pattern.generate(3, 0, 500_000))
    data[100_003] ^= 0x5A
    with _listener() as lsock:
        proc = _spawn(tstream, "recv", "127.0.0.1", str(lsock.getsockname()[1]), "3")
        # tstream may stop reading (and reset) once it has seen the damage.
        with _accept(lsock) as conn, contextlib.suppress(ConnectionError):
            _send_all_in_odd_pieces(conn, bytes(data))
    status, result, err = _finish(proc)
    assert status == 1, (result, err)
    assert result == {"result": "bad", "offset": "100003",
                      "expected": f"0x{pattern.byte_at(3, 100_003):02x}",
                      "found": f"0x{data[100_003]:02x}"}


def test_tstream_reports_a_reset_in_either_direction(tstream: Path) -> None:
    with _listener() as lsock:
        proc = _spawn(tstream, "recv", "127.0.0.1", str(lsock.getsockname()[1]))
        with _accept(lsock) as conn:
            conn.sendall(pattern.generate(0, 0, 1000))
            _reset(conn)
    status, result, err = _finish(proc)
    assert status == 3 and result["result"] == "error" and result["kind"] == "reset", err
    assert int(result["after"]) <= 1000
    assert "Connection reset" in err
    with _listener() as lsock:
        proc = _spawn(tstream, "send", "127.0.0.1", str(lsock.getsockname()[1]), "1G")
        with _accept(lsock) as conn:
            assert conn.recv(1000)
            _reset(conn)
    status, result, err = _finish(proc)
    assert status == 3 and result["kind"] == "reset", (result, err)


def test_tstream_rate_limit_and_duration(tstream: Path) -> None:
    with _listener() as lsock:
        start = time.monotonic()
        proc = _spawn(tstream, "-r", "200K", "-d", "1.5", "send", "127.0.0.1",
                      str(lsock.getsockname()[1]), "0", "2")
        checker = pattern.Checker(2)
        with _accept(lsock) as conn:
            while data := conn.recv(65536):
                assert checker.feed(data), checker.bad
    status, result, err = _finish(proc)
    elapsed = time.monotonic() - start
    assert status == 0, err
    sent = int(result["bytes"])
    assert checker.offset == sent
    assert elapsed > 1.4 and 200 * 1024 * 1.2 < sent < 200 * 1024 * 1.6 + 65536, (elapsed, sent)


def test_tstream_idle_limit(tstream: Path, tmp_path: Path) -> None:
    """-t: a stream that stops moving fails instead of hanging (a migration
    that lost the connection must not hang the test until its timeout)."""
    progress = tmp_path / "progress"
    with _listener() as lsock:
        proc = _spawn(tstream, "-t", "0.5", "-p", str(progress), "recv", "127.0.0.1",
                      str(lsock.getsockname()[1]), "6")
        with _accept(lsock) as conn:
            conn.sendall(pattern.generate(6, 0, 5000))
            status, result, err = _finish(proc)  # the connection stays open, silent
    assert status == 3 and result == {"result": "error", "kind": "idle", "after": "5000"}, err
    assert progress.read_text().startswith("TSTREAM progress bytes=5000 ")


def test_tstream_serve_both_ways(tstream: Path) -> None:
    def listening_port(proc: subprocess.Popen[str]) -> int:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # bounded: tstream prints it or exits
        match = re.match(r"TSTREAM listening port=(\d+)", line)
        assert match, line
        return int(match.group(1))

    proc = _spawn(tstream, "serve", "0", "send", "1000001", "11")
    checker = pattern.Checker(11)
    with socket.create_connection(("127.0.0.1", listening_port(proc)), TIMEOUT) as conn:
        while data := conn.recv(65536):
            assert checker.feed(data), checker.bad
    assert (_finish(proc)[:2]) == (0, {"result": "sent", "bytes": "1000001"})
    assert checker.result() == "ok bytes=1000001"

    proc = _spawn(tstream, "serve", "0", "recv", "12")
    with socket.create_connection(("::1", listening_port(proc)), TIMEOUT) as conn:
        conn.sendall(pattern.generate(12, 0, 77_777))
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b""
    assert (_finish(proc)[:2]) == (0, {"result": "ok", "bytes": "77777"})


def test_tstream_usage_errors(tstream: Path) -> None:
    for args in ([], ["send", "127.0.0.1", "1"], ["send", "localhost", "1", "10"],
                 ["send", "127.0.0.1", "1", "0"], ["recv", "127.0.0.1", "1", "x"]):
        result = subprocess.run([str(tstream), *args], capture_output=True, text=True,
                                timeout=TIMEOUT, check=False)
        assert result.returncode == 2 and result.stderr, (args, result)
    result = subprocess.run([str(tstream), "recv", "127.0.0.1", "1"], capture_output=True,
                            text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 3
    assert pattern.parse_result(result.stdout) == {"result": "error", "kind": "connect",
                                                   "after": "0"}


# -- in the guest ----------------------------------------------------------


@pytest.fixture
def backend(workdir: Path) -> Iterator[Backend]:
    b = Backend(workdir, "be1")
    yield b
    b.stop()


def run_ok(vm: Vm, command: str, timeout: float = TIMEOUT) -> str:
    status, out = vm.console.run(command, timeout)
    assert status == 0, out
    return out


def start_server(vm: Vm, name: str, args: str) -> None:
    """`tstream serve ...` in the background, once it listens."""
    run_ok(vm, f"tstream serve {args} >/tmp/{name}.out 2>/tmp/{name}.err & true")
    # Bounded by run()'s timeout: waits for the real listening line.
    run_ok(vm, f"until grep -q listening /tmp/{name}.err; do usleep 20000; done")


def server_result(vm: Vm, name: str) -> dict[str, str]:
    run_ok(vm, "wait")  # the background server has finished
    return pattern.parse_result(run_ok(vm, f"cat /tmp/{name}.out"))


def guest_result(vm: Vm, command: str, status: int = 0) -> dict[str, str]:
    got, out = vm.console.run(command, 60)
    assert got == status, out
    return pattern.parse_result(out)


@pytest.mark.vm
def test_guest_has_iperf3_tstream_and_the_dhcp_script(
        workdir: Path, guest: GuestImage, backend: Backend) -> None:
    vm = Vm(workdir, "vm1", backend.socket, guest)
    try:
        vm.wait_booted()
        out = run_ok(vm, "iperf3 --version")
        assert re.search(r"iperf 3\.\d+", out), out
        # A real (loopback) iperf3 transfer: its libraries all load.
        run_ok(vm, "iperf3 -s -1 >/tmp/iperf-s.out 2>&1 & true")
        run_ok(vm, "until netstat -ltn | grep -q ':5201 '; do usleep 20000; done")
        out = run_ok(vm, "iperf3 -c 127.0.0.1 -n 4M -f m", 60)
        assert re.search(r"receiver", out), out
        run_ok(vm, "wait")

        # Guest to guest over loopback, both directions, with a progress file.
        start_server(vm, "s1", "5001 recv 7")
        nbytes = 4 * 2**20 + 3
        assert guest_result(vm, f"tstream -p /tmp/p1 send 127.0.0.1 5001 {nbytes} 7") == {
            "result": "sent", "bytes": str(nbytes)}
        assert server_result(vm, "s1") == {"result": "ok", "bytes": str(nbytes)}
        assert f"TSTREAM progress bytes={nbytes} " in run_ok(vm, "cat /tmp/p1")
        start_server(vm, "s2", "5002 send 1M 3")
        assert guest_result(vm, "tstream recv 127.0.0.1 5002 3") == {
            "result": "ok", "bytes": str(2**20)}
        assert server_result(vm, "s2") == {"result": "sent", "bytes": str(2**20)}

        # The wrong seed: the very first byte is wrong, and says so.
        start_server(vm, "s3", "5003 send 64K 1")
        assert guest_result(vm, "tstream recv 127.0.0.1 5003 2", status=1) == {
            "result": "bad", "offset": "0", "expected": f"0x{pattern.key(2) & 0xFF:02x}",
            "found": f"0x{pattern.key(1) & 0xFF:02x}"}
        run_ok(vm, "wait")

        # The guest's C pattern is pattern.py's, byte for byte (odd length and
        # seed, crossing several words).
        start_server(vm, "s4", "5004 send 203 123456789")
        run_ok(vm, "nc 127.0.0.1 5004 </dev/null >/tmp/pat")
        assert server_result(vm, "s4") == {"result": "sent", "bytes": "203"}
        out = run_ok(vm, "od -An -tx1 -v /tmp/pat")
        dump = "".join(re.findall(r"^(?: [0-9a-f]{2})+$", out, re.M)).replace(" ", "")
        assert dump == pattern.generate(123456789, 0, 203).hex()

        # The udhcpc script, as udhcpc would call it: a renewal of the same
        # address keeps it and sets MTU, route and DNS; a new address
        # replaces it; deconfig removes it.
        script = f"/{UDHCPC_SCRIPT_PATH}"
        lease = (f"interface=eth0 mask=24 router='{GATEWAY_IP} 10.0.2.9' mtu=1400 "
                 "dns='10.0.2.3 10.0.2.4' domain=test.example")
        run_ok(vm, f"{lease} ip={GUEST_IP} {script} renew")
        assert f"inet {GUEST_IP}/24" in run_ok(vm, "ip -4 addr show dev eth0")
        assert "mtu 1400" in run_ok(vm, "ip link show dev eth0")
        assert f"default via {GATEWAY_IP} dev eth0" in run_ok(vm, "ip route")
        assert run_ok(vm, "cat /etc/resolv.conf").count("nameserver 10.0.2.") == 2
        run_ok(vm, f"{lease} ip=10.0.2.77 {script} bound")
        out = run_ok(vm, "ip -4 addr show dev eth0")
        assert "inet 10.0.2.77/24" in out and GUEST_IP not in out, out
        assert f"default via {GATEWAY_IP} dev eth0" in run_ok(vm, "ip route")
        status, out = vm.console.run(f"ping -c 1 -W 3 {GATEWAY_IP}", 30)
        assert status == 0 and "1 packets received" in out, out
        run_ok(vm, f"interface=eth0 {script} deconfig")
        assert "inet " not in run_ok(vm, "ip -4 addr show dev eth0")
    finally:
        vm.close()


@pytest.mark.vm
def test_guest_runs_udhcpc_when_asked(workdir: Path, guest: GuestImage,
                                      backend: Backend) -> None:
    """tether.net=dhcp on the kernel command line: udhcpc, no static address.
    (The test-aid back-end has no DHCP server: the lease itself is for the
    tests against tether's.)"""
    vm = Vm(workdir, "vm1", backend.socket, guest, kernel_args=[DHCP_ARG])
    try:
        vm.console.expect(r"udhcpc: (sending|broadcasting) discover", 60)
        # No server here: it gives up waiting and keeps asking in the background.
        vm.console.expect(r"udhcpc: leasefail on eth0", 60)
        vm.wait_booted()
        assert DHCP_ARG in run_ok(vm, "cat /proc/cmdline")
        assert "inet " not in run_ok(vm, "ip -4 addr show dev eth0")
        assert "udhcpc" in run_ok(vm, "ps")  # still asking, in the background
        assert READY_MARKER in vm.console.text
    finally:
        vm.close()
