"""Flow state as plain records: passt's layout, and a live connection handed over.

The handover runs two stacks in this process on one tap: the first dumps its
guest addresses and TCP flows and lets go of the sockets, the second loads them
and carries on, while the guest's kernel keeps its connection open throughout.
This is what migration does, minus moving the sockets between hosts.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading

import pytest

from tests.net.conftest import GATEWAY, GUEST, configure_guest, delete_netns, make_netns
from tether.loop import Loop
from tether.net.params import NetParams
from tether.net.stack import Stack
from tether.net.tcp_record import ESTABLISHED, TcpFlowRecord
from tether.transport.tap import TapTransport
from tether.transport.tap_setup import create_tap

GUEST_CLIENT = r"""
import socket, sys
block = bytes((i * 7 + 3) % 251 for i in range(1 << 16))
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
for i in range(64):
    chunk = block[i:] + block[:i]
    s.sendall(chunk)
    if i == 32:
        print("half", flush=True)
        sys.stdin.readline()
    got = b""
    while len(got) < len(chunk):
        data = s.recv(1 << 20)
        if not data:
            sys.exit(f"EOF at chunk {i}")
        got += data
    if got != chunk:
        sys.exit(f"chunk {i} differs")
s.shutdown(socket.SHUT_WR)
if s.recv(10) != b"":
    sys.exit("extra data")
print("ok")
"""


def test_record_layout_is_passts() -> None:
    addr = bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 2])
    rec = TcpFlowRecord((2, 1), ((addr, addr, 80, 4000), (bytes(16), bytes(16), 1, 2)),
                        3, 7, 8, ESTABLISHED, 65480, 0, 0, 0, 0x1234, 0x5678, 0x11111111,
                        0x22222222, 0x33333333, 0x44444444, 0x55555555)
    raw = rec.pack()
    assert len(raw) == 112
    assert raw[:2] == b"\x02\x01"
    assert raw[2:18] == addr and struct.unpack_from("=H", raw, 34)[0] == 80
    assert raw[74:78] == bytes([3, 7, 8, ESTABLISHED])
    assert struct.unpack_from("!I", raw, 78)[0] == 65480
    assert struct.unpack_from("!HH", raw, 88) == (0x1234, 0x5678)
    assert struct.unpack_from("!5I", raw, 92) == (0x11111111, 0x22222222, 0x33333333,
                                                 0x44444444, 0x55555555)
    assert TcpFlowRecord.unpack(raw) == rec


class EchoPeer(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]

    def run(self) -> None:
        conn, _ = self.sock.accept()
        while data := conn.recv(1 << 20):
            conn.sendall(data)
        conn.close()


@pytest.mark.root
def test_live_connection_survives_dump_and_load() -> None:
    ns = make_netns("tho")
    loop = Loop()
    gw = socket.inet_aton(GATEWAY)
    params = NetParams(addr4=socket.inet_aton(GUEST), prefix4=24, gateway4=gw,
                       map_host_loopback4=gw)
    try:
        first = Stack(loop, params)
        tap = TapTransport(loop, create_tap(ns.name, "tap0", 65520), first)
        first.output.partial_l4_checksums = True
        first.attach(tap)
        configure_guest(ns)
        peer = EchoPeer()
        peer.start()
        client = subprocess.Popen(ns.cmd(sys.executable, "-c", GUEST_CLIENT, GATEWAY,
                                         str(peer.port)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        half = threading.Event()
        lines: list[str] = []

        def read_stdout() -> None:
            assert client.stdout is not None
            for line in client.stdout:
                lines.append(line.strip())
                if line.strip() == "half":
                    half.set()

        threading.Thread(target=read_stdout, daemon=True).start()
        assert loop.run(until=half.is_set, timeout=30), "the guest never got half way"

        flows = first.dump_tcp_flows()
        assert len(flows) == 1
        record, sock = flows[0]
        addresses = first.dump_addresses()
        assert first.forget_tcp_flows() == [sock]
        first.close()
        assert sock.fileno() >= 0  # forgetting a flow does not close its socket

        second = Stack(loop, params)
        second.output.partial_l4_checksums = True
        second.attach(tap)
        tap.port = second
        second.load_addresses(addresses)
        second.restore_tcp_flow(TcpFlowRecord.unpack(record.pack()), sock)
        assert client.stdin is not None
        client.stdin.write("go\n")
        client.stdin.flush()
        assert loop.run(until=lambda: client.poll() is not None, timeout=60)
        assert client.returncode == 0, lines
        loop.run(until=lambda: "ok" in lines, timeout=5)
        assert lines[-1] == "ok"
        second.close()
        tap.close()
    finally:
        loop.close()
        delete_netns(ns)
