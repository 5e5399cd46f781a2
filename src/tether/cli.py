"""`tether`: parse options, build the stack, attach a transport, run the loop."""

from __future__ import annotations

import argparse
import contextlib
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import sys
from typing import NoReturn

from tether import __version__, summary
from tether.config import Config, ConfigError, build_parser, from_args
from tether.frames import FrameSink, GuestPort, LatePort
from tether.handover.device_state import Handover
from tether.handover.format import FORMATS
from tether.loop import READ, Loop
from tether.net.icmp import ping_sockets_allowed
from tether.net.stack import Stack
from tether.pcap import CapturingPort, CapturingSink, PcapWriter
from tether.repair import caps
from tether.repair.client import RepairHelper
from tether.spawn import Child
from tether.state_channel import DeviceStateHandler, StateSink
from tether.transport.stream import StreamTransport
from tether.transport.tap import TapTransport
from tether.transport.tap_setup import configure_ipv4, create_tap
from tether.transport.vhost_user.device import VhostUserNetDevice
from tether.transport.vhost_user.protocol import PASST_FEATURES
from tether.transport.vhost_user.server import VhostUserServer

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
    root.setLevel(logging.DEBUG if config.debug else
                  logging.WARNING if config.quiet else logging.INFO)


def _daemonise() -> int:
    """Fork into the background; the calling process exits only once the daemon
    reports ready (or dies), so whoever started tether (libvirt) finds the socket
    listening and the pid file written.  Returns the fd to report readiness on."""
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        ok = os.read(ready_r, 1) == b"1"  # b"" if the daemon died before it was ready
        os._exit(0 if ok else 1)
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    return ready_w


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _user(spec: str) -> tuple[int, int]:
    """passt's --runas: UID, UID:GID, LOGIN or LOGIN:GROUP -> (uid, gid)."""
    who, _, group = spec.partition(":")
    try:
        if who.isdigit():
            uid = int(who)
            gid = pwd.getpwuid(uid).pw_gid if not group else -1
        else:
            entry = pwd.getpwnam(who)
            uid, gid = entry.pw_uid, entry.pw_gid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"--runas: no such user or group: {spec!r}") from None
    return uid, gid


def _drop_privileges(runas: str | None) -> None:
    """As root, become an unprivileged user (default nobody), as passt does; as
    anyone, end with no capabilities: tether needs none once its sockets exist."""
    if os.geteuid() == 0:
        uid, gid = _user(runas or "nobody")
        if uid == 0:
            log.info("staying root, as --runas asks")
            return
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)  # from root to non-root: every capability set is cleared
        log.info("running as uid %d, gid %d", uid, gid)
    elif runas is not None and _user(runas)[0] != os.getuid():
        raise ConfigError("--runas: changing user needs root")
    if _capabilities():
        caps.keep_only(set())


def _capabilities() -> int:
    # Read as bytes: after setuid, the interpreter may not reach codec modules that
    # were not imported yet (a Python installed in a directory only root can read).
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return int(line.split()[1], 16)
    return 0


class _OneOff:
    """A DeviceStateHandler around the handover that ends the loop when the
    front-end goes away (--one-off), except after a completed migration as
    source, as passt(1) says; with --migrate-exit, exactly then."""

    def __init__(self, inner: DeviceStateHandler, loop: Loop, one_off: bool,
                 migrate_exit: bool) -> None:
        self.inner = inner
        self.loop = loop
        self.one_off = one_off
        self.migrate_exit = migrate_exit
        self._saved = False

    def save_state(self) -> bytes:
        data = self.inner.save_state()
        self._saved = True
        return data

    def begin_load(self) -> StateSink:
        return self.inner.begin_load()

    def rings_started(self) -> None:
        self._saved = False  # on a source: QEMU resumed us, the migration failed
        self.inner.rings_started()

    def rings_stopped(self) -> None:
        self.inner.rings_stopped()

    def front_end_gone(self) -> None:
        migrated, self._saved = self._saved, False
        self.inner.front_end_gone()
        if migrated and self.migrate_exit:
            log.info("migration complete, exiting (--migrate-exit)")
            self.loop.stop()
        elif migrated and self.one_off:
            log.info("migration complete: staying, as --one-off does after a migration")
        elif self.one_off:
            log.info("front-end gone, exiting (--one-off)")
            self.loop.stop()


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
    port = LatePort()
    sink: FrameSink
    server: VhostUserServer | None = None
    stream: StreamTransport | None = None
    child: Child | None = None
    helper: RepairHelper | None = None
    netns = config.netns
    inherited = socket.socket(fileno=config.fd) if config.fd is not None else None
    # Opened now, written once the daemon's pid is known: the directory may be
    # writable only by the user tether was started as.
    pid_out = open(config.pid_file, "w") if config.pid_file is not None else None  # noqa: SIM115
    qemu_facing = netns is None and (config.socket_path is not None or inherited is not None)
    if qemu_facing:
        # As passt: before any socket exists, so the sockets belong to the user
        # tether runs as; a tap in a namespace needs the privileges until it exists.
        _drop_privileges(config.runas)
    if netns is None and not qemu_facing:
        child = Child(config.command or [os.environ.get("SHELL", "/bin/sh")])
        netns = child.netns
    try:
        if config.vhost_user:
            if config.repair_path is not None:
                helper = RepairHelper(config.repair_path)
                helper.attach(loop)
                log.info("tether-repair can connect on %s", config.repair_path)
            handover = Handover(stack, helper, require_repair=config.require_repair,
                                linger=config.linger, max_size=config.max_state,
                                listeners=stack.listening_sockets,
                                save_format=FORMATS[config.migrate_format])
            state = _OneOff(handover, loop, config.one_off, config.migrate_exit)
            device = VhostUserNetDevice(loop, port, state=state)
            if config.migrate_format == "passt":
                device.offered_features = PASST_FEATURES

            def checksum_offload(guest_takes_partial: bool) -> bool:
                # The guest completes TCP/UDP checksums: the stack leaves the
                # pseudo-header sum, as it does for a tap with a vnet header.
                stack.output.partial_l4_checksums = guest_takes_partial
                return guest_takes_partial

            device.on_checksum_offload = checksum_offload
            if inherited is not None:
                device.attach(inherited)
                log.info("serving QEMU on inherited fd %d (vhost-user)", config.fd)
            else:
                assert config.socket_path is not None
                server = VhostUserServer(loop, config.socket_path, device)
                log.info("waiting for QEMU on %s (vhost-user)", config.socket_path)
            sink = device
        elif netns is not None:
            fd = create_tap(netns, config.ifname, config.net.mtu)
            if config.config_net or child is not None:
                p = config.net
                configure_ipv4(netns, config.ifname, p.addr4, p.prefix4, p.gateway4)
            sink = TapTransport(loop, fd, port, mtu=config.net.mtu)
            log.info("tap %s up in namespace %s", config.ifname, netns)
        else:
            stream = StreamTransport(loop, config.socket_path, port, conn=inherited)
            if config.one_off:
                stream.on_client_gone = loop.stop
            sink = stream
            if inherited is not None:
                log.info("serving QEMU on inherited fd %d (-netdev stream)", config.fd)
            else:
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
    for line in summary.lines(config.net):
        log.info("%s", line)
    ready: int | None = None
    if child is not None:
        # tether lives as long as the command: its exit ends the loop.
        pidfd = os.pidfd_open(child.pid)
        loop.add(pidfd, READ, lambda _ev: loop.stop())
        child.release()
    elif not config.foreground:
        ready = _daemonise()
    # The wakeup fd makes a signal end epoll_wait, which Python would otherwise retry.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    loop.add(wake_r.fileno(), READ, lambda _ev: _drain(wake_r))
    signal.signal(signal.SIGTERM, lambda *_: loop.stop())
    signal.signal(signal.SIGINT, lambda *_: loop.stop())
    try:
        if pid_out is not None:
            pid_out.write(f"{os.getpid()}\n")
            pid_out.close()
        if not qemu_facing and config.runas is not None:
            # pasta's part (a tap in a namespace, COMMAND) keeps its user unless asked:
            # it is started by whoever owns the namespace.
            _drop_privileges(config.runas)
        if ready is not None:
            _detach_stdio()
            os.write(ready, b"1")
            os.close(ready)
        log.info("running")
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
        if stream is not None:
            stream.close()
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
    if ns.version:
        print(f"tether {__version__} (passt-compatible command line)")
        return 0
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
