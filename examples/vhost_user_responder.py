"""A vhost-user net back-end in ~300 lines, on tether's vhost-user library.

    python examples/vhost_user_responder.py --socket PATH [--gateway 10.0.2.2]

QEMU attaches a virtio-net card to PATH (-chardev socket,path=PATH plus
-netdev vhost-user); the `Responder` below stands in for a network stack.
It answers ARP and ICMP echo for one gateway address, remembers the
guest's MAC and IPv4 address from what the guest sends, and carries those
two as its device state, so a live migration moves them to the target
back-end.  tether's VM tests drive it (RX, TX, MRG_RXBUF, reconnect,
migration, the dirty log) through a real guest's `ping`.

What it shows of the library (tether.transport.vhost_user): a back-end is
a `frames.GuestPort` (frames from the guest arrive in `frames_from_guest`,
frames to it go through the device's `send_frame`) plus, optionally, a
`state_channel.DeviceStateHandler`; `VhostUserServer` accepts QEMU and
`VhostUserNetDevice` does the rest (rings, guest memory, dirty logging,
device-state transfer), all on one `loop.Loop`.

For the dirty-log test it also sends a checked stream (`start_stream`, on
SIGUSR2): UDP datagrams with valid checksums to a closed guest port, paced
by loop timers.  The guest kernel verifies every checksum (counting
failures in /proc/net/snmp Udp InCsumErrors) before it counts the datagram
as NoPorts, so a buffer page lost by the dirty log shows up as a checksum
error.  SIGUSR1 drops the front-end, as a crash would.

State blob (network byte order): b"TRSP", u8 version 1, 6-byte MAC, 4-byte IPv4.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import logging
import os
import signal
import struct
import sys
from collections.abc import Sequence

from tether.frames import FrameSink
from tether.loop import READ, Loop
from tether.state_channel import BufferedSink, DeviceStateError
from tether.transport.vhost_user.device import VhostUserNetDevice
from tether.transport.vhost_user.server import VhostUserServer

log = logging.getLogger("vhost_user_responder")

ETH = struct.Struct("!6s6sH")  # dst, src, ethertype (IEEE 802.3)
ARP = struct.Struct("!HHBBH6s4s6s4s")  # RFC 826, Ethernet/IPv4
ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
UDP = struct.Struct("!HHHH")  # RFC 768
STREAM_PORT = 7000  # source port of the stream
STREAM_PAYLOAD = 1400
STREAM_BURST = 4  # datagrams per 10 ms tick
STATE = struct.Struct("!4sB6s4s")
STATE_MAGIC = b"TRSP"
STREAM_COUNT = 3000  # with 4 per 10 ms: about 7.5 s of traffic
STREAM_GUEST_PORT = 9

GATEWAY_MAC = bytes.fromhex("525500000001")


def _checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class Responder:
    """A frames.GuestPort and a state_channel.DeviceStateHandler."""

    def __init__(self, gateway: str, loop: Loop | None = None) -> None:
        self.gateway = ipaddress.IPv4Address(gateway).packed
        self.loop = loop
        self._stream: tuple[int, int, int] | None = None  # next seq, end, port
        self.sink: FrameSink | None = None
        self.guest_mac = b""
        self.guest_ip = b""
        self.echo_replies = 0
        self.dropped = 0
        self._staged: tuple[bytes, bytes] | None = None
        self.reject_state = False  # test aid: fail every load, to fail a migration

    # -- GuestPort ---------------------------------------------------------

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        for frame in frames:
            self._frame(bytes(frame))
        if self.sink is not None:
            self.sink.flush()

    def guest_room_available(self) -> None:
        pass

    def _frame(self, frame: bytes) -> None:
        if len(frame) < ETH.size:
            return
        _, src, ethertype = ETH.unpack_from(frame)
        if src != self.guest_mac and not src[0] & 1:
            self.guest_mac = src
            log.info("responder: guest MAC %s", src.hex(":"))
        if ethertype == ETH_P_ARP and len(frame) >= ETH.size + ARP.size:
            self._arp(frame)
        elif ethertype == ETH_P_IP:
            self._ipv4(frame)

    def _arp(self, frame: bytes) -> None:
        htype, ptype, hlen, plen, op, sha, spa, _, tpa = ARP.unpack_from(frame, ETH.size)
        if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1) or tpa != self.gateway:
            return
        self._learn_ip(spa)
        reply = ETH.pack(sha, GATEWAY_MAC, ETH_P_ARP) + ARP.pack(
            1, ETH_P_IP, 6, 4, 2, GATEWAY_MAC, self.gateway, sha, spa)
        self._send(reply)

    def _ipv4(self, frame: bytes) -> None:
        ip = frame[ETH.size:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return
        ihl = (ip[0] & 0xF) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        if ip[16:20] != self.gateway or total > len(ip) or total < ihl + 8:
            return
        if ip[9] != 1:
            return
        if ip[ihl] != 8:  # ICMP echo request (RFC 792)
            return
        self._learn_ip(ip[12:16])
        icmp = bytearray(ip[ihl:total])
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        struct.pack_into("!H", icmp, 2, _checksum(icmp))
        header = bytearray(ip[:ihl])
        header[12:16], header[16:20] = ip[16:20], ip[12:16]
        header[8] = 64
        header[10:12] = b"\0\0"
        struct.pack_into("!H", header, 10, _checksum(header))
        src = frame[6:12]
        self._send(ETH.pack(src, GATEWAY_MAC, ETH_P_IP) + bytes(header) + bytes(icmp))
        self.echo_replies += 1
        log.info("responder: echo reply %d (%d bytes)", self.echo_replies, ETH.size + total)

    def start_stream(self, count: int, port: int) -> None:
        """Send `count` checked datagrams to the guest's `port` (test aid)."""
        if self.loop is None or not self.guest_ip or not self.guest_mac:
            log.warning("responder: no stream, the guest was not seen yet")
            return
        log.info("responder: streaming %d datagrams to port %d", count, port)
        self._stream = (0, count, port)
        self.loop.call_later(0.01, self._stream_tick)

    def _stream_tick(self) -> None:
        if self._stream is None or self.loop is None:
            return
        seq, end, port = self._stream
        for _ in range(STREAM_BURST):
            if seq >= end:
                self._stream = None
                log.info("responder: stream done (%d datagrams)", end)
                return
            payload = (f"{seq:08d}".encode() * (STREAM_PAYLOAD // 8))
            self._send(self._udp_frame(STREAM_PORT, port, payload))
            seq += 1
        if self.sink is not None:
            self.sink.flush()
        self._stream = (seq, end, port)
        self.loop.call_later(0.01, self._stream_tick)

    def _udp_frame(self, sport: int, dport: int, payload: bytes) -> bytes:
        length = UDP.size + len(payload)
        pseudo = self.gateway + self.guest_ip + struct.pack("!BBH", 0, 17, length)
        udp = bytearray(UDP.pack(sport, dport, length, 0) + payload)
        struct.pack_into("!H", udp, 6, _checksum(pseudo + udp) or 0xFFFF)
        header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0x4000, 64,
                                       17, 0, self.gateway, self.guest_ip))
        struct.pack_into("!H", header, 10, _checksum(header))
        return ETH.pack(self.guest_mac, GATEWAY_MAC, ETH_P_IP) + bytes(header) + bytes(udp)

    def _learn_ip(self, ip: bytes) -> None:
        if ip not in (self.guest_ip, b"\x00\x00\x00\x00"):
            self.guest_ip = ip
            log.info("responder: guest IPv4 %s", ipaddress.IPv4Address(ip))

    def _send(self, frame: bytes) -> None:
        if self.sink is not None and not self.sink.send_frame(frame):
            self.dropped += 1
            if self.dropped == 1:
                log.warning("responder: guest had no room for a %d-byte frame", len(frame))

    # -- DeviceStateHandler ----------------------------------------------------

    def save_state(self) -> bytes:
        mac = self.guest_mac or bytes(6)
        ip = self.guest_ip or bytes(4)
        log.info("responder: saving state: guest MAC %s", mac.hex(":"))
        return STATE.pack(STATE_MAGIC, 1, mac, ip)

    def begin_load(self) -> BufferedSink:
        return BufferedSink(self.load_state, STATE.size)

    def load_state(self, data: bytes) -> None:
        if self.reject_state:
            raise DeviceStateError(errno.EPERM, "this back-end refuses all state (test)")
        if len(data) != STATE.size:
            raise DeviceStateError(errno.EINVAL, f"state is {len(data)} bytes, "
                                                 f"expected {STATE.size}")
        magic, version, mac, ip = STATE.unpack(data)
        if magic != STATE_MAGIC or version != 1:
            raise DeviceStateError(errno.EPROTO, f"bad state header {magic!r} v{version}")
        self._staged = (mac, ip)
        log.info("responder: loaded state: guest MAC %s", mac.hex(":"))

    def rings_started(self) -> None:
        if self._staged is not None:
            self.guest_mac, self.guest_ip = self._staged
            self._staged = None
            log.info("responder: applied state: guest MAC %s IPv4 %s", self.guest_mac.hex(":"),
                     ipaddress.IPv4Address(self.guest_ip))
        else:
            log.info("responder: rings started")

    def rings_stopped(self) -> None:
        log.info("responder: rings stopped")

    def front_end_gone(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vhost_user_responder.py")
    parser.add_argument("--socket", "-s", help="UNIX socket path to listen on")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end capabilities (vhost-user.rst) and exit")
    parser.add_argument("--gateway", default="10.0.2.2",
                        help="address the responder answers ARP and ping for")
    parser.add_argument("--once", action="store_true",
                        help="exit when the first front-end disconnects")
    parser.add_argument("--reject-state", action="store_true",
                        help="test aid: refuse any loaded device state (fails migrations)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    if not args.socket:
        parser.error("--socket is required")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    loop = Loop()
    responder = Responder(args.gateway, loop)
    responder.reject_state = args.reject_state
    device = VhostUserNetDevice(loop, responder, state=responder)
    responder.sink = device
    try:
        server = VhostUserServer(loop, args.socket, device)
    except OSError as e:
        log.error("cannot listen on %s: %s", args.socket, e)
        return 1

    # Signals reach the loop through a wakeup pipe: a Python handler alone
    # would not interrupt epoll (PEP 475 retries the wait).
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda signum, frame: None)

    def on_signal(events: int) -> None:
        for signum in os.read(wake_r, 64):
            if signum == signal.SIGUSR1:
                # Test aid: drop the front-end, as a crash would; QEMU reconnects.
                device.disconnect("SIGUSR1")
            elif signum == signal.SIGUSR2:
                # Test aid: a checked UDP stream to a closed guest port.
                responder.start_stream(STREAM_COUNT, STREAM_GUEST_PORT)
            else:
                loop.stop()

    loop.add(wake_r, READ, on_signal)
    log.info("listening on %s", args.socket)
    had_connection = False

    def done() -> bool:
        nonlocal had_connection
        had_connection = had_connection or device.connected
        return args.once and had_connection and not device.connected

    try:
        loop.run(until=done)
    finally:
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in device.stats().items()))
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
