"""`tether`: parse options, build the stack, attach a transport, run the loop."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from tether.config import Config, ConfigError, build_parser, from_args
from tether.frames import FrameSink, GuestPort
from tether.handover.device_state import Handover
from tether.handover.format import FORMATS
from tether.loop import READ, Loop
from tether.net.icmp import ping_sockets_allowed
from tether.net.stack import Stack
from tether.pcap import CapturingPort, CapturingSink, PcapWriter
from tether.repair.client import RepairHelper
from tether.spawn import Child
from tether.transport.stream import StreamTransport
from tether.transport.tap import TapTransport, configure_ipv4, create_tap
from tether.transport.vhost_user.device import VhostUserNetDevice, VhostUserServer
from tether.transport.vhost_user.protocol import PASST_FEATURES

log = logging.getLogger("tether")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One clear line and status 1, as passt does, not argparse's usage dump and 2.
        self.exit(1, f"tether: {message} (see --help)\n")


def _setup_logging(config: Config) -> None:
    handler: logging.Handler = (logging.FileHandler(config.log_file) if config.log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s tether: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if config.debug else logging.INFO)


def _daemonise() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


class _Port:
    """Late binding: the transport needs a port before the stack's wrappers exist."""

    def __init__(self) -> None:
        self.target: GuestPort | None = None

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        if self.target is not None:
            self.target.frames_from_guest(frames)

    def guest_room_available(self) -> None:
        if self.target is not None:
            self.target.guest_room_available()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError):
        sock.recv(4096)


def _raise_fd_limit() -> None:
    """Every flow holds a socket: allow as many as the hard limit does, as passt does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run(config: Config) -> int:
    _raise_fd_limit()
    loop = Loop()
    stack = Stack(loop, config.net)
    port = _Port()
    sink: FrameSink
    server: VhostUserServer | None = None
    child: Child | None = None
    helper: RepairHelper | None = None
    netns = config.netns
    if netns is None and config.socket_path is None:
        child = Child(config.command or [os.environ.get("SHELL", "/bin/sh")])
        netns = child.netns
    try:
        if config.vhost_user:
            assert config.socket_path is not None
            if config.repair_path is not None:
                helper = RepairHelper(config.repair_path)
                helper.attach(loop)
                log.info("tether-repair can connect on %s", config.repair_path)
            handover = Handover(stack, helper, require_repair=config.require_repair,
                                linger=config.linger, max_size=config.max_state,
                                listeners=stack.listening_sockets,
                                save_format=FORMATS[config.migrate_format])
            device = VhostUserNetDevice(loop, port, state=handover)
            if config.migrate_format == "passt":
                device.offered_features = PASST_FEATURES

            def checksum_offload(guest_takes_partial: bool) -> bool:
                # The guest completes TCP/UDP checksums: the stack leaves the
                # pseudo-header sum, as it does for a tap with a vnet header.
                stack.output.partial_l4_checksums = guest_takes_partial
                return guest_takes_partial

            device.on_checksum_offload = checksum_offload
            server = VhostUserServer(loop, config.socket_path, device)
            sink = device
            log.info("waiting for QEMU on %s (vhost-user)", config.socket_path)
        elif netns is not None:
            fd = create_tap(netns, config.ifname, config.net.mtu)
            if config.config_net or child is not None:
                p = config.net
                configure_ipv4(netns, config.ifname, p.addr4, p.prefix4, p.gateway4)
            sink = TapTransport(loop, fd, port, mtu=config.net.mtu)
            log.info("tap %s up in namespace %s", config.ifname, netns)
        else:
            assert config.socket_path is not None
            sink = StreamTransport(loop, config.socket_path, port)
            log.info("waiting for QEMU on %s (-netdev stream)", config.socket_path)
    except BaseException:
        if child is not None:
            child.abandon()
        if helper is not None:
            helper.close()
        raise
    guest_port: GuestPort = stack
    if config.pcap is not None:
        pcap = PcapWriter(config.pcap)
        sink = CapturingSink(sink, pcap)
        guest_port = CapturingPort(stack, pcap)
    port.target = guest_port
    # A transport that completes TCP/UDP checksums (virtio NEEDS_CSUM) says so with a
    # `checksum_offload` attribute; frames.FrameSink leaves it optional.
    stack.output.partial_l4_checksums = bool(getattr(sink, "checksum_offload", False))
    stack.output.segment_offload = bool(getattr(sink, "segment_offload", False))
    stack.attach(sink)
    stack.start()
    allowed, why = ping_sockets_allowed()
    if not allowed:
        log.warning("%s", why)
    if child is not None:
        # tether lives as long as the command: its exit ends the loop.
        pidfd = os.pidfd_open(child.pid)
        loop.add(pidfd, READ, lambda _ev: loop.stop())
        child.release()
    elif not config.foreground:
        _daemonise()
    if config.pid_file is not None:
        with open(config.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    # The wakeup fd makes a signal end epoll_wait, which Python would otherwise retry.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    loop.add(wake_r.fileno(), READ, lambda _ev: _drain(wake_r))
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    log.info("running")
    try:
        loop.run()
        if child is not None:
            return child.exit_status()
    finally:
        tcp = stack.tcp
        log.info("exiting: %d bad guest frames; TCP: %d socket-full stalls, %d guest gaps, "
                 "%d rewinds, %d pure ACKs (%d delayed)", stack.bad_frames, tcp.socket_full,
                 tcp.gaps_from_guest, tcp.rewinds, tcp.pure_acks, tcp.delayed_acks)
        stack.close()
        if server is not None:
            server.close()
        if helper is not None:
            helper.close()
        if config.pid_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(config.pid_file)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.__class__ = _Parser
    ns = parser.parse_args(argv)
    if ns.print_capabilities:
        print('{"type": "net"}')  # vhost-user.rst "Back-end program conventions"
        return 0
    try:
        config = from_args(ns)
        _setup_logging(config)
        return run(config)
    except ConfigError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
