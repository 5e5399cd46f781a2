"""tether-repair and the back-end side of its protocol, with the real helper.

Scripted fake helpers appear only for replies the real one never gives
(garbage, silence, death between two messages at a chosen point), and to
mimic passt-repair's control-buffer defect.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.repair.conftest import HELPER, recv_exactly, start_helper, tcp_pairs
from tests.support import Netns, wait_for
from tether.loop import Loop
from tether.repair import helper, tcp
from tether.repair import kernel as k
from tether.repair.client import RepairHelper, RepairHelperError
from tether.repair.protocol import ANCBUF_SIZE, SCM_MAX_FD

pytestmark = pytest.mark.root


def repair_flag(s: socket.socket) -> int:
    return s.getsockopt(k.SOL_TCP, k.TCP_REPAIR)


def test_thousand_connections_move_in_batches(
    ns: Netns, many_fds: None, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    pairs = tcp_pairs(1000)
    ours = [a for a, _ in pairs]
    tcp.freeze(ours, backend)  # 4 messages: 253, 253, 253, 241
    assert all(repair_flag(s) == 1 for s in ours)
    states = [tcp.dump(s) for s in ours]
    for s in ours:
        s.close()
    restored = tcp.restore_many(states, backend)
    socks = [s for s in restored if isinstance(s, socket.socket)]
    assert len(socks) == 1000, [e for e in restored if not isinstance(e, socket.socket)][:3]
    assert tcp.thaw_many(list(zip(socks, states, strict=True)), backend) == [None] * 1000
    assert all(repair_flag(s) == 0 for s in socks)
    # Leaving repair mode clears SO_REUSEADDR; a thawed socket's TIME-WAIT would block
    # a later SO_REUSEADDR bind of its port (a -t listener) for a minute.
    assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1 for s in socks)
    for s, (_, peer) in zip(socks, pairs, strict=True):
        s.sendall(b"x")
        peer.sendall(b"y")
    for s, (_, peer) in zip(socks, pairs, strict=True):
        assert peer.recv(1) == b"x"
        assert s.recv(1) == b"y"
    assert ns.tcp_out_rsts() == 0
    for s, (_, peer) in zip(socks, pairs, strict=True):
        s.close()
        peer.close()


def test_helper_keeps_only_cap_net_admin(
    backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    with open(f"/proc/{real_helper.pid}/status", encoding="ascii") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    net_admin = 1 << 12
    assert int(status["CapEff"], 16) == net_admin
    assert int(status["CapPrm"], 16) == net_admin
    assert int(status["CapInh"], 16) == 0
    assert int(status["CapAmb"], 16) == 0
    assert int(status["CapBnd"], 16) == net_admin
    assert status["NoNewPrivs"].strip() == "1"


def test_helper_exits_0_when_backend_hangs_up(
    backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    backend.disconnect()
    assert real_helper.wait(5) == 0


@pytest.mark.parametrize(
    "wrapper",
    [
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-all"],
    ],
    ids=["as-nobody", "root-without-net-admin"],
)
def test_helper_refuses_without_cap_net_admin(
    root: None, backend: RepairHelper, wrapper: list[str]
) -> None:
    done = subprocess.run([*wrapper, *HELPER, backend.path], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 1
    assert "CAP_NET_ADMIN" in done.stderr
    assert not backend.connected
    backend.accept_pending()
    assert not backend.connected


def test_helper_usage_errors(root: None, tmp_path: Path) -> None:
    assert subprocess.run(HELPER, capture_output=True, check=False).returncode == 2
    regular = tmp_path / "file"
    regular.write_text("")
    done = subprocess.run([*HELPER, str(regular)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "neither a socket nor a directory" in done.stderr


def _watching(pid: int) -> bool:
    """Whether the process holds an inotify descriptor with a watch on it."""
    try:
        for fd in os.listdir(f"/proc/{pid}/fdinfo"):
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as f:
                if "inotify wd:" in f.read():
                    return True
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def test_helper_waits_in_a_directory_for_the_socket(root: None, ns: Netns, tmp_path: Path) -> None:
    proc = start_helper(tmp_path)
    try:
        wait_for(lambda: _watching(proc.pid), 10, "the helper's inotify watch")
        backend = RepairHelper(str(tmp_path / "late.repair"))
        backend.wait(10)
        (a, _peer), = tcp_pairs(1)
        backend.set_repair([a], k.REPAIR_ON)
        assert repair_flag(a) == 1
        backend.set_repair([a], k.REPAIR_OFF)
        backend.close()
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()


def test_second_helper_is_turned_away(
    backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    second = start_helper(backend.path)

    def turned_away() -> bool:
        backend.accept_pending()
        return second.poll() is not None

    wait_for(turned_away, 10, "the second helper to be turned away")
    assert second.returncode == 0
    assert real_helper.poll() is None and backend.connected


def test_helper_absent_is_a_prompt_error(ns: Netns, backend: RepairHelper) -> None:
    start = time.monotonic()
    with pytest.raises(RepairHelperError) as info:
        backend.wait(0.2)
    assert info.value.errno == errno.ETIMEDOUT and "tether-repair" in str(info.value)
    assert time.monotonic() - start < 2
    (a, peer), = tcp_pairs(1)
    with pytest.raises(RepairHelperError) as info:
        tcp.freeze([a], backend)
    assert info.value.errno == errno.ENOTCONN
    k.unsilence(a)  # freeze got no further than the filter: the socket is usable
    a.sendall(b"still")
    assert peer.recv(5) == b"still"


def test_helper_killed_is_an_error_not_a_hang(
    ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    real_helper.send_signal(signal.SIGKILL)
    real_helper.wait(5)
    pairs = tcp_pairs(300)
    start = time.monotonic()
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([a for a, _ in pairs], k.REPAIR_ON)
    assert time.monotonic() - start < 2
    assert info.value.errno in (errno.ECONNRESET, errno.EPIPE)
    assert not backend.connected
    for a, peer in pairs:
        assert repair_flag(a) == 0
        a.sendall(b"ok")
        assert peer.recv(2) == b"ok"


def test_helper_rejects_a_non_tcp_descriptor(
    ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    (a, _peer), = tcp_pairs(1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([a, udp], k.REPAIR_ON)
    assert info.value.errno == errno.ECONNRESET and info.value.switched == 0
    assert real_helper.wait(5) == 1
    assert real_helper.stderr is not None
    assert "not TCP" in real_helper.stderr.read()
    assert repair_flag(a) == 0  # checked all before switching any
    udp.close()


def test_helper_checks_every_socket_before_changing_any(
    ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    fresh = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([fresh, listening], k.REPAIR_ON)
    assert info.value.switched == 0
    assert real_helper.wait(5) == 1
    assert real_helper.stderr is not None
    assert "LISTEN" in real_helper.stderr.read()
    assert repair_flag(fresh) == 0  # the kernel would take it: it was still left alone
    fresh.close()
    listening.close()


class FailingAt:
    """The kernel refusing TCP_REPAIR on the n-th socket after the checks passed,
    which real sockets cannot be made to do on cue; every other call is real."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self, s: socket.socket, value: int) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EPERM, "Operation not permitted")
        s.setsockopt(k.SOL_TCP, k.TCP_REPAIR, value)


@pytest.mark.parametrize("command", [k.REPAIR_ON, k.REPAIR_OFF, k.REPAIR_OFF_NO_WP])
def test_a_midway_kernel_failure_puts_back_what_was_switched(ns: Netns, command: int) -> None:
    pairs = tcp_pairs(4)
    ours = [a for a, _ in pairs]
    before = 0 if command == k.REPAIR_ON else 1
    for s in ours:
        s.setsockopt(k.SOL_TCP, k.TCP_REPAIR, before or k.REPAIR_OFF_NO_WP)
    with pytest.raises(helper.HelperError, match="3 already switched were put back"):
        helper.apply(command, ours, FailingAt(4))
    assert [repair_flag(s) for s in ours] == [before] * 4
    helper.apply(command, ours)  # the real kernel, no failure: all switched
    assert [repair_flag(s) for s in ours] == [1 if command == k.REPAIR_ON else 0] * 4
    for s in ours:
        s.setsockopt(k.SOL_TCP, k.TCP_REPAIR, k.REPAIR_OFF_NO_WP)
    for a, b in pairs:
        a.close()
        b.close()


# -- scripted helpers for replies the real one never gives -------------------


class FakeHelper:
    """Connects like a helper; answers message n with script(n, fds)."""

    def __init__(self, path: str, script: Callable[[int, int], bytes | None],
                 shrink_like_passt_repair: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.script = script
        self.shrink = shrink_like_passt_repair
        self.counts: list[int] = []
        self.truncated: list[bool] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        ancbuf = ANCBUF_SIZE
        n = 0
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(1, ancbuf)
            except OSError:
                return
            if not data:
                return
            fds = [fd for _, _, d in anc for fd in memoryview(d).cast("i")]
            for fd in fds:
                os.close(fd)
            if self.shrink:
                # passt-repair keeps the length the kernel wrote back
                ancbuf = socket.CMSG_SPACE(len(fds) * 4)
            self.counts.append(len(fds))
            self.truncated.append(bool(flags & socket.MSG_CTRUNC))
            answer = self.script(n, len(fds))
            n += 1
            if answer is None:
                self.sock.close()
                return
            if answer:
                self.sock.sendall(answer)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def _echo(cmd: int) -> bytes:
    return cmd.to_bytes(1, "big", signed=True)


def test_garbage_reply_is_an_error(ns: Netns, backend: RepairHelper) -> None:
    fake = FakeHelper(backend.path, lambda n, _: _echo(-1) if n == 0 else b"\x07")
    backend.wait(5)
    (a, _), = tcp_pairs(1)
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([a], k.REPAIR_ON)
    assert info.value.errno == errno.EPROTO and "07" in str(info.value)
    assert not backend.connected
    fake.close()


def test_silent_helper_times_out(ns: Netns, tmp_path: Path) -> None:
    backend = RepairHelper(str(tmp_path / "slow.repair"), reply_timeout=0.3)
    fake = FakeHelper(backend.path, lambda n, _: _echo(-1) if n == 0 else b"")
    backend.wait(5)
    (a, _), = tcp_pairs(1)
    start = time.monotonic()
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([a], k.REPAIR_ON)
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.3 <= time.monotonic() - start < 2
    fake.close()
    backend.close()


def test_helper_dying_mid_batch_reports_progress(ns: Netns, backend: RepairHelper) -> None:
    # priming message, then one good batch of 253, then death
    fake = FakeHelper(backend.path, lambda n, _: _echo(-1) if n == 0 else
                      (_echo(1) if n == 1 else None))
    backend.wait(5)
    pairs = tcp_pairs(600)
    with pytest.raises(RepairHelperError) as info:
        backend.set_repair([a for a, _ in pairs], k.REPAIR_ON)
    assert info.value.switched == SCM_MAX_FD
    assert "253 of 600" in str(info.value)
    fake.close()


def test_a_small_request_does_not_shrink_later_batches(ns: Netns, backend: RepairHelper) -> None:
    """Only a connection's first message caps passt-repair's batches: one
    socket switched alone must not make every later migration 1 per message."""
    fake = FakeHelper(backend.path, lambda n, _: b"\xff" if n == 0 else b"\x01")
    backend.wait(5)
    pairs = tcp_pairs(2 * SCM_MAX_FD + 1)
    socks = [a for a, _ in pairs]
    backend.set_repair(socks[:1], k.REPAIR_ON)
    seen: list[tuple[int, int]] = []
    backend.set_repair(socks, k.REPAIR_ON, lambda start, batch: seen.append((start, len(batch))))
    fake.close()
    for a, b in pairs:
        a.close()
        b.close()
    assert fake.counts == [SCM_MAX_FD, 1, SCM_MAX_FD, SCM_MAX_FD, 1]
    assert seen == [(0, SCM_MAX_FD), (SCM_MAX_FD, SCM_MAX_FD), (2 * SCM_MAX_FD, 1)]


def test_a_helper_dying_under_pipelined_batches_fails_the_whole_restore(
        ns: Netns, backend: RepairHelper) -> None:
    """restore_many hands the next batch to the helper while it restores the
    last one; a helper that dies on the third leaves nothing restored."""
    pairs = tcp_pairs(2 * SCM_MAX_FD + 10)
    states = []
    for ours, _ in pairs:
        ours.setsockopt(k.SOL_TCP, k.TCP_REPAIR, 1)
        states.append(tcp.dump(ours))
        ours.close()
    fake = FakeHelper(backend.path, lambda n, _: b"\xff" if n == 0 else
                      (b"\x01" if n < 3 else None))
    backend.wait(5)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RepairHelperError) as info:
        tcp.restore_many(states, backend)
    assert info.value.switched == 2 * SCM_MAX_FD
    assert len(os.listdir("/proc/self/fd")) <= before  # every new socket closed
    fake.close()
    for _, peer in pairs:  # now, not when a collector breaks the traceback's cycle
        peer.close()


@pytest.mark.parametrize("prime", [True, False])
def test_batches_fit_passt_repair_shrinking_buffer(
    ns: Netns, tmp_path: Path, prime: bool
) -> None:
    backend = RepairHelper(str(tmp_path / "p.repair"), prime=prime)
    fake = FakeHelper(backend.path, lambda n, _: b"\x01" if n else b"\xff" if prime else b"\x00",
                      shrink_like_passt_repair=True)
    backend.wait(5)
    pairs = tcp_pairs(SCM_MAX_FD + 1)
    socks = [a for a, _ in pairs]
    if not prime:
        backend.set_repair(socks[:1], k.REPAIR_OFF)  # a small first message
    backend.set_repair(socks[1:], k.REPAIR_ON)
    fake.close()
    backend.close()
    assert not any(fake.truncated)
    if prime:
        assert fake.counts == [SCM_MAX_FD, SCM_MAX_FD]
    else:
        # Never more than the first message carried: slower, still complete.
        assert fake.counts == [1] * (SCM_MAX_FD + 1)


def test_unfreeze_after_dump_resumes_the_connection(
    ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    """A migration that fails after the dump: the source carries on, and
    nothing sent while it was frozen is lost."""
    (ours, peer), = tcp_pairs(1)
    ours.sendall(b"a" * 1000)
    tcp.freeze([ours], backend)
    tcp.dump(ours)
    peer.sendall(b"while frozen")  # dropped by the filter, retransmitted later
    tcp.unfreeze([ours], backend)
    assert repair_flag(ours) == 0
    # The dump zeroed the send window; the window probe's answer reopens it.
    ours.sendall(b"b" * 1000)
    assert recv_exactly(peer, 2000) == b"a" * 1000 + b"b" * 1000
    assert recv_exactly(ours, 12) == b"while frozen"
    assert ns.tcp_out_rsts() == 0


def test_event_loop_accepts_the_helper_whenever_it_comes(root: None, tmp_path: Path) -> None:
    loop = Loop()
    backend = RepairHelper(str(tmp_path / "loop.repair"))
    backend.attach(loop)
    proc = start_helper(backend.path)
    try:
        assert loop.run(until=lambda: backend.connected, timeout=10)
        backend.close()
        assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
        loop.close()


def test_helper_runs_unprivileged_with_just_cap_net_admin(root: None, ns: Netns) -> None:
    """As nobody with CAP_NET_ADMIN as its only capability: enough."""
    with tempfile.TemporaryDirectory(dir="/tmp") as where:
        os.chmod(where, 0o755)  # nobody must reach the socket
        backend = RepairHelper(os.path.join(where, "nobody.repair"))
        os.chmod(backend.path, 0o666)
        proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "--inh-caps=+net_admin", "--ambient-caps=+net_admin", *HELPER, backend.path],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            backend.wait(10)
            (a, _peer), = tcp_pairs(1)
            backend.set_repair([a], k.REPAIR_ON)
            assert repair_flag(a) == 1
            backend.set_repair([a], k.REPAIR_OFF)
            with open(f"/proc/{proc.pid}/status", encoding="ascii") as f:
                assert "CapEff:\t0000000000001000" in f.read()
            backend.close()
            assert proc.wait(5) == 0
        finally:
            proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


def test_the_helper_silences_what_it_switches_to_repair_and_unsilences_after(
    ns: Netns, backend: RepairHelper, real_helper: subprocess.Popen[str]
) -> None:
    """Where only CAP_NET_ADMIN may attach socket filters, tether (which has
    none) relies on tether-repair to silence a socket it freezes."""
    (ours, peer), = tcp_pairs(1)
    backend.set_repair([ours], k.REPAIR_ON)
    assert repair_flag(ours) == 1 and k.silenced(ours)
    backend.set_repair([ours], k.REPAIR_OFF)
    assert repair_flag(ours) == 0 and not k.silenced(ours)
    ours.sendall(b"still works")
    assert recv_exactly(peer, 11) == b"still works"


UNPRIVILEGED_FREEZE = r"""
import socket, sys
from tether.repair import kernel as k, tcp
from tether.repair.client import RepairHelper

class Fake:  # passt-repair's part: repair mode, nothing else
    def __init__(self, real): self.real = real
    def set_repair(self, socks, command, each_batch=None):
        self.real.set_repair(socks, command)
        for s in socks:
            try: k.unsilence(s)
            except OSError: pass
        if each_batch is not None:
            each_batch(0, socks)

helper = RepairHelper(sys.argv[1], reply_timeout=5.0)
helper.wait(10)
lst = socket.create_server(("127.0.0.1", 0))
ours = socket.create_connection(lst.getsockname()); peer, _ = lst.accept()
try:
    k.silence(socket.socket())
    print("filters allowed")  # this kernel lets anyone attach one: nothing to show
    sys.exit(0)
except PermissionError:
    pass
tcp.freeze([ours], helper)
print("frozen silenced" if k.silenced(ours) and ours.getsockopt(k.SOL_TCP, k.TCP_REPAIR) else
      "frozen bare")
tcp.unfreeze([ours], helper)
try:
    tcp.freeze([ours], Fake(helper))
    print("bare freeze accepted")
except OSError as e:
    print("refused", e.errno, ours.getsockopt(k.SOL_TCP, k.TCP_REPAIR))
"""


def test_an_unprivileged_freeze_is_silenced_by_the_helper_or_refused(
    ns: Netns, tmp_path: Path
) -> None:
    """tether itself without capabilities, the real tether-repair with them:
    the freeze ends silenced; with a helper that only switches repair mode,
    as passt-repair does, it is undone and refused with EPERM."""
    script = tmp_path / "freeze.py"
    script.write_text(UNPRIVILEGED_FREEZE)
    path = tmp_path / "nocaps.repair"
    src = Path(__file__).resolve().parents[2] / "src"
    # Every capability gone from the bounding set: uid 0 gains none at exec.
    agent = subprocess.Popen(
        ns.argv("setpriv", "--bounding-set=-all", "--inh-caps=-all",
                "env", f"PYTHONPATH={src}", sys.executable, str(script), str(path)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: path.exists() or agent.poll() is not None, 10, "the repair socket")
        helper_proc = start_helper(path)
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    helper_proc.wait(10)
    lines = out.splitlines()
    assert lines, err
    if lines[0] == "filters allowed":
        return  # a kernel that lets anyone attach filters: the fallback is not needed
    assert lines == ["frozen silenced", f"refused {errno.EPERM} 0"], out + err
