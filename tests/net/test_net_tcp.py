"""TCP through tether: the guest namespace's kernel is the peer on one side,
a host socket on loopback (--map-host-loopback: the gateway) on the other."""

from __future__ import annotations

import functools
import http.server
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.net.conftest import GATEWAY, Tether
from tests.net.hostside import LineEchoPeer, TcpPeer, free_port, pattern
from tests.support import require

MiB = 1 << 20


@pytest.mark.root
def test_transfer_both_ways_byte_exact(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    peer = TcpPeer("transfer", send=24 * MiB)
    out = t.ns.guest_tool("tcp-client", GATEWAY, str(peer.port), str(16 * MiB),
                          str(24 * MiB))
    assert out.startswith("ok")
    assert peer.done.wait(30) and not peer.errors
    assert peer.received == [pattern(16 * MiB)]
    assert t.alive()


@pytest.mark.root
def test_transfer_at_mtu_1500(start_tether: Callable[..., Tether]) -> None:
    t = start_tether("-m", "1500", mtu=1500)
    peer = TcpPeer("transfer", send=4 * MiB)
    t.ns.guest_tool("tcp-client", GATEWAY, str(peer.port), str(4 * MiB), str(4 * MiB))
    assert peer.done.wait(30) and peer.received == [pattern(4 * MiB)]


@pytest.mark.root
def test_slow_readers_lose_nothing(start_tether: Callable[..., Tether]) -> None:
    """Both receivers hold off reading until every buffer and window is full: tether
    must stop acknowledging guest data the host socket has no room for, and must
    stop sending when the guest's window closes, and then resume exactly."""
    t = start_tether()
    peer = TcpPeer("transfer", send=12 * MiB, delay=1.0)
    t.ns.guest_tool("tcp-client", GATEWAY, str(peer.port), str(12 * MiB), str(12 * MiB),
                    "1.0")
    assert peer.done.wait(30) and not peer.errors
    assert peer.received == [pattern(12 * MiB)]


@pytest.mark.root
def test_refused_connection_is_reset(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    port = free_port()  # nothing listens there
    assert "ok" in t.ns.guest_tool("tcp-expect-refused", GATEWAY, str(port))
    assert t.alive()


@pytest.mark.root
def test_host_reset_reaches_guest(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    peer = TcpPeer("reset")
    assert "ok" in t.ns.guest_tool("tcp-expect-reset", GATEWAY, str(peer.port))


@pytest.mark.root
def test_thousand_concurrent_connections(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    peer = LineEchoPeer()
    out = t.ns.guest_tool("tcp-many", GATEWAY, str(peer.port), "1000")
    assert out.strip() == "ok 1000"
    assert peer.served == 1000
    peer.close()


@pytest.mark.root
def test_full_flow_table_refuses_cleanly(start_tether: Callable[..., Tether]) -> None:
    t = start_tether("--max-flows", "3")
    peer = TcpPeer("echo-line")
    # Three connections fit; a fourth is refused with a reset, not a hang.
    out = t.ns.run("python3", "-c", f"""
import socket
held = [socket.create_connection(("{GATEWAY}", {peer.port}), timeout=10) for _ in range(3)]
try:
    socket.create_connection(("{GATEWAY}", {peer.port}), timeout=10)
    print("fourth connected")
except ConnectionRefusedError:
    print("refused")
for s in held:
    s.close()
""").stdout
    assert out.strip() == "refused"
    assert t.alive()


@pytest.mark.root
def test_curl_fetches_from_a_host_http_server(start_tether: Callable[..., Tether],
                                              tmp_path: Path) -> None:
    require(shutil.which("curl") is not None, "needs curl (apt install curl)")
    body = pattern(3 * MiB)
    (tmp_path / "file.bin").write_bytes(body)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        t = start_tether()
        got = tmp_path / "got.bin"
        t.ns.run("curl", "-sS", "--max-time", "30", "-o", str(got),
                 f"http://{GATEWAY}:{server.server_address[1]}/file.bin")
        assert got.read_bytes() == body
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.root
def test_guest_reset_reaches_host(start_tether: Callable[..., Tether]) -> None:
    t = start_tether()
    peer = socket.socket()
    peer.bind(("127.0.0.1", 0))
    peer.listen(1)
    peer.settimeout(10)
    guest = t.ns.popen("python3", "-c", f"""
import socket, struct
s = socket.create_connection(("{GATEWAY}", {peer.getsockname()[1]}), timeout=10)
s.sendall(b"before the reset")
s.recv(1)  # the host's byte: the data before it has surely arrived
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
print("reset sent")
""")
    conn, _ = peer.accept()
    conn.settimeout(10)
    got = b""
    while len(got) < 16:
        got += conn.recv(16)
    assert got == b"before the reset"
    conn.sendall(b"x")
    out, err = guest.communicate(timeout=20)
    assert out.strip() == "reset sent", err
    with pytest.raises(ConnectionResetError):
        while conn.recv(100):
            pass
    conn.close()
    peer.close()


@pytest.mark.root
def test_lossy_guest_link_loses_nothing(start_tether: Callable[..., Tether]) -> None:
    """The guest's firewall drops 5% of TCP segments each way: tether must retransmit
    what the guest did not get (rewinding its peek offset) and cope with gaps in
    what the guest sends, and the stream still arrives byte-exact both ways."""
    require(shutil.which("nft") is not None, "needs nftables (apt install nftables)")
    t = start_tether()
    t.ns.run("nft", "add table inet lossy")
    for hook in ("input", "output"):
        t.ns.run("nft", f"add chain inet lossy {hook} {{ type filter hook {hook} priority 0; }}")
        t.ns.run("nft", f"add rule inet lossy {hook} meta l4proto tcp numgen random mod 100 "
                        "< 5 drop")
    # 16 MiB is about 256 segments of 64 KiB each way: some are surely dropped.
    peer = TcpPeer("transfer", send=16 * MiB)
    out = t.ns.guest_tool("tcp-client", GATEWAY, str(peer.port), str(16 * MiB),
                          str(16 * MiB))
    assert out.startswith("ok")
    assert peer.done.wait(60) and peer.received == [pattern(16 * MiB)]
    # Go-back-N resends what follows a loss (here 25 to 36 MB went to the
    # guest in all), but each loss once: rewinding again on every duplicate
    # ACK our own resending provokes sent 2.4 to 3.9 GB and could stall it.
    sent_to_guest = int(t.ns.run("cat", "/sys/class/net/tap0/statistics/rx_bytes").stdout)
    assert sent_to_guest < 6 * 16 * MiB
    t.stop()
    assert "rewinds" in t.log_text()
    rewinds = int(t.log_text().split(" rewinds")[0].rsplit(" ", 1)[1])
    assert rewinds > 0  # the retransmission path really ran
