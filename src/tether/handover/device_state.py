"""tether's side of a live migration: the stream's stages bound to a running daemon.

QEMU drives it through the vhost-user device (transport.vhost_user.device):

source  rings stop -> save_state():  guest addresses; freeze every established
        TCP socket through tether-repair (repair mode, a drop-all filter); dump
        each.  The connections are out of the stack from then on.
        - rings start again      -> the migration failed: undo everything, the
                                    connections carry on where they stopped
        - the front-end goes away -> it succeeded: close the frozen sockets,
                                    silently (repair mode sends no FIN, no RST)
target  load_state(): validate the whole stream, then restore every socket in
        repair mode (nothing is sent yet; a failure restores nothing and fails
        the migration, so the source resumes).
        rings start -> the VM runs here now: leave repair mode (window probe),
                       hand the connections to the stack, ACK the guest.

Same-host migration (`linger=False`): the source closes its frozen sockets as
soon as they are dumped, or the target could not re-create the same 4-tuples,
and keeps a silent listener on each local address until the front-end goes
away, so that a peer's segment in the gap is dropped instead of reset.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from tether.handover.format import FORMATS, ROLES, TETHER_FORMAT
from tether.handover.records import GuestAddresses, TcpFlow
from tether.migrate.errors import MigrationError
from tether.migrate.stream import (
    DEFAULT_MAX_SIZE,
    Bindings,
    Format,
    Loaded,
    Saved,
    apply_loaded,
    save,
)
from tether.migrate.unframed import FormatReader
from tether.net.addresses import RECORD as ADDRESS_RECORD
from tether.net.flows import TableFull
from tether.net.sockets import reset_on_close
from tether.net.stack import Stack
from tether.net.tcp_record import TcpFlowRecord
from tether.net.udp import UdpFlowRecord
from tether.ratelimit import limited
from tether.repair import kernel as repair_kernel
from tether.repair import tcp as repair
from tether.repair.client import RepairHelper
from tether.repair.record import TcpConnState
from tether.repair.tcp import RepairError
from tether.state_channel import DeviceStateError

log = logging.getLogger(__name__)

HELPER_WAIT = 1.0
"""How long a migration waits for tether-repair to connect when it is not yet there."""


# Each format's stages by the role they play here: passt's three stages do what
# tether's first three do, under their own names; passt has no UDP stage.
def _addresses_from_stack(stack: Stack) -> GuestAddresses:
    addr6, addr6_ll, addr4, mac = ADDRESS_RECORD.unpack(stack.dump_addresses())
    return GuestAddresses(mac=mac, ipv4=addr4, ipv6=addr6, ipv6_link_local=addr6_ll)


def _addresses_to_stack(stack: Stack, seen: GuestAddresses) -> None:
    stack.load_addresses(ADDRESS_RECORD.pack(seen.ipv6, seen.ipv6_link_local, seen.ipv4,
                                             seen.mac))


@dataclass
class _Outgoing:
    """A source's connections from the freeze until the migration's outcome is known."""

    flows: list[tuple[TcpFlowRecord, socket.socket]] = field(default_factory=list)
    states: list[TcpConnState] = field(default_factory=list)
    frozen: bool = False
    released: bool = False
    """The sockets were closed (same-host); a rollback restores them from `states`."""
    holders: list[socket.socket] = field(default_factory=list)
    silenced: list[socket.socket] = field(default_factory=list)
    left_behind: int = 0
    """Connections that could not move (no helper): reset once the guest has left."""


@dataclass
class _Incoming:
    """A target's restored connections, in repair mode, until the rings start."""

    flows: list[tuple[TcpFlowRecord, socket.socket, TcpConnState]] = field(default_factory=list)
    udp: list[UdpFlowRecord] = field(default_factory=list)
    """Re-created when the rings start: a UDP socket takes no repair mode to stay quiet."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _without_gc(step: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run a migration step with the cyclic garbage collector paused.

    A step builds and drops several objects per connection inside the VM's
    downtime; every 700 allocations start a collection, and the older
    generations' walk every live object of a daemon that holds as many
    connections.  Paused, save + load of 10,000 idle connections took about
    15% less (bench_migration.py --counts 10000 --idle-only --linger, side
    by side).  Nothing here makes garbage that must go before the step ends:
    the collector runs again right after, on its own schedule.
    """

    @functools.wraps(step)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not gc.isenabled():
            return step(*args, **kwargs)
        gc.disable()
        try:
            return step(*args, **kwargs)
        finally:
            gc.enable()

    return run


class _StreamSink:
    """The device's StateSink: bytes into the format reader as they arrive, so
    --max-state, a bad magic or bad framing ends the transfer at once."""

    def __init__(self, handover: Handover, reader: FormatReader) -> None:
        self._handover = handover
        self._reader = reader

    @_without_gc
    def feed(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except MigrationError as exc:
            limited(log, logging.ERROR,
                    "migration: refusing incoming state, nothing applied: %s", exc)
            raise DeviceStateError(exc.errno, str(exc)) from exc

    @_without_gc
    def finish(self) -> None:
        try:
            loaded = self._reader.finish()
        except MigrationError as exc:
            limited(log, logging.ERROR,
                    "migration: refusing incoming state, nothing applied: %s", exc)
            raise DeviceStateError(exc.errno, str(exc)) from exc
        assert self._reader.format is not None
        self._handover._load(loaded, self._reader.format)


class Handover:
    """The DeviceStateHandler that tether's vhost-user device calls."""

    def __init__(self, stack: Stack, helper: RepairHelper | None, *,
                 require_repair: bool = False, linger: bool = True,
                 max_size: int = DEFAULT_MAX_SIZE, helper_wait: float = HELPER_WAIT,
                 listeners: Callable[[], list[socket.socket]] | None = None,
                 save_format: Format = TETHER_FORMAT) -> None:
        self.stack = stack
        self.save_format = save_format
        self.helper = helper
        self.require_repair = require_repair
        self.linger = linger
        self.max_size = max_size
        self.helper_wait = helper_wait
        self._listeners = listeners or (lambda: [])
        self._saved: Saved | None = None
        self._outgoing: _Outgoing | None = None
        self._incoming: _Incoming | None = None
        self.last_result: str = ""

    # -- source -----------------------------------------------------------------

    @_without_gc
    def save_state(self) -> bytes:
        if self._saved is not None:
            self._rollback("a new save started before the last one was settled")
        outgoing = _Outgoing()
        fmt = self.save_format
        roles = ROLES[fmt.name]
        sides = Bindings(fmt) \
            .bind(roles.addresses, save=lambda: _addresses_from_stack(self.stack)) \
            .bind(roles.freeze, save=lambda: self._freeze(outgoing),
                  undo=lambda: self._unfreeze(outgoing)) \
            .bind(roles.tcp, save=lambda: self._dump(outgoing))
        if roles.udp is not None:
            sides.bind(roles.udp, save=self.stack.dump_udp_flows)
        else:
            udp = len(self.stack.dump_udp_flows())
            if udp:
                limited(log, logging.INFO,
                        "migration: the %s format has no place for UDP flows: %d left out, "
                        "the guest's next datagram opens each again", fmt.name, udp)
        try:
            saved = save(fmt, sides)
        except MigrationError as exc:
            limited(log, logging.ERROR, "migration: saving state failed, source unchanged: %s", exc)
            raise DeviceStateError(exc.errno, str(exc)) from exc
        self._saved, self._outgoing = saved, outgoing
        data = saved.to_bytes()
        if not self.linger:
            self._release(outgoing)
        limited(log, logging.INFO,
                "migration: state saved, %d bytes, %d TCP connections frozen", len(data),
                len(outgoing.states))
        return data

    def _helper_ready(self) -> bool:
        if self.helper is None:
            return False
        if not self.helper.connected:
            try:
                self.helper.wait(self.helper_wait)
            except OSError as exc:
                limited(log, logging.WARNING, "migration: tether-repair not available: %s", exc)
        return self.helper.connected

    def _freeze(self, outgoing: _Outgoing) -> None:
        flows = self.stack.dump_tcp_flows()
        if not flows:
            return
        if not self._helper_ready():
            if self.require_repair:
                raise MigrationError(errno.ENOTCONN, f"{len(flows)} TCP connection(s) to move "
                                     "and no tether-repair helper connected "
                                     "(--require-repair)")
            limited(log, logging.WARNING,
                    "migration: no tether-repair helper: %d TCP connection(s) will not "
                    "move and will be reset", len(flows))
            outgoing.left_behind = len(flows)
            return
        assert self.helper is not None
        socks = [sock for _, sock in flows]
        states: list[TcpConnState] = []

        def dump(start: int, batch: Sequence[socket.socket]) -> None:
            # Here rather than in the "tcp flows" stage: the helper freezes the
            # next batch meanwhile, on the other core, inside the VM's downtime.
            for sock in batch:
                try:
                    states.append(repair.dump(sock))
                except OSError as exc:
                    raise MigrationError(exc.errno or errno.EIO,
                                         f"dumping TCP socket {sock.getsockname()}: "
                                         f"{exc}") from exc

        try:
            repair.freeze(socks, self.helper, dump)
        except MigrationError:
            raise  # freeze undid itself
        except OSError as exc:
            if exc.errno == errno.EPERM and not self.require_repair:
                # Moving them unsilenced could lose what arrives meanwhile: as
                # without a helper, they stay and are reset once the guest left.
                limited(log, logging.WARNING, "migration: %d TCP connection(s) will not "
                        "move and will be reset: %s", len(flows), exc)
                outgoing.left_behind = len(flows)
                return
            raise MigrationError(exc.errno or errno.EIO, f"freezing TCP sockets: {exc}") from exc
        outgoing.flows = flows
        outgoing.states = states
        outgoing.frozen = True
        migrating = {sock.fileno() for sock in socks}
        for sock in self.stack.forget_tcp_flows():
            if sock.fileno() not in migrating:
                sock.close()  # half-open: not migrated, like passt (migration-format.md, 6.3)

    @staticmethod
    def _dump(outgoing: _Outgoing) -> list[TcpFlow]:
        """The "tcp flows" stage: what the freeze dumped, with each flow's record."""
        return [TcpFlow(record, state)
                for (record, _), state in zip(outgoing.flows, outgoing.states, strict=True)]

    def _unfreeze(self, outgoing: _Outgoing) -> None:
        """Undo of the freeze stage: the source carries on as if nothing happened."""
        if not outgoing.frozen:
            return
        outgoing.frozen = False
        socks: list[socket.socket | None]
        if outgoing.released:
            socks = self._restore_released(outgoing)
        else:
            self._thaw_sockets([sock for _, sock in outgoing.flows])
            socks = [sock for _, sock in outgoing.flows]
        for holder in outgoing.holders:
            holder.close()
        for listener in outgoing.silenced:
            repair_kernel.unsilence(listener)
        for (record, _), sock in zip(outgoing.flows, socks, strict=True):
            if sock is None:
                continue
            try:
                self.stack.restore_tcp_flow(record, sock)
            except (ValueError, TableFull) as exc:
                limited(log, logging.ERROR,
                        "migration rollback: connection %s lost: %s", record.sides, exc)
                sock.close()

    def _thaw_sockets(self, socks: list[socket.socket]) -> None:
        assert self.helper is not None
        try:
            repair.unfreeze(socks, self.helper)
        except OSError as exc:
            limited(log, logging.ERROR, "migration rollback: leaving repair mode failed: %s", exc)

    def _restore_released(self, outgoing: _Outgoing) -> list[socket.socket | None]:
        """Same-host rollback: the sockets were closed, re-create them from the dump."""
        assert self.helper is not None
        for holder in outgoing.holders:
            holder.close()
        outgoing.holders = []
        restored = repair.restore_many(outgoing.states, self.helper)
        pairs = [(s, st) for s, st in zip(restored, outgoing.states, strict=True)
                 if isinstance(s, socket.socket)]
        errors = iter(repair.thaw_many(pairs, self.helper))
        out: list[socket.socket | None] = []
        for s in restored:
            if isinstance(s, socket.socket) and next(errors) is None:
                out.append(s)
            else:
                limited(log, logging.ERROR, "migration rollback: connection lost: %s", s)
                out.append(None)
        return out

    def _release(self, outgoing: _Outgoing) -> None:
        """Same host: close the frozen sockets now, hold their addresses silently."""
        own = {s.getsockname(): s for s in self._listeners()
               if s.type == socket.SOCK_STREAM}
        for state, (_, sock) in zip(outgoing.states, outgoing.flows, strict=True):
            local = state.local
            listener = own.get(local) or own.get(("0.0.0.0", local[1])) \
                or own.get(("::", local[1], 0, 0))
            if listener is not None:
                if listener not in outgoing.silenced:
                    try:
                        repair_kernel.silence(listener)
                        outgoing.silenced.append(listener)
                    except OSError as exc:  # EPERM where filters need CAP_NET_ADMIN
                        limited(log, logging.WARNING, "migration: cannot silence the "
                                "listener on %s while the connection moves: %s", local, exc)
            else:
                try:
                    outgoing.holders.append(repair.hold_address(state))
                except OSError as exc:
                    limited(log, logging.WARNING,
                            "migration: cannot hold %s while the connection moves: %s",
                            local, exc)
            sock.close()
        outgoing.released = True
        # The target re-creates the UDP flows on the same ports: let go of them.
        self.stack.forget_udp_flows()

    def _commit_source(self) -> None:
        outgoing = self._outgoing
        self._saved = self._outgoing = None
        if outgoing is None:
            return
        for _, sock in outgoing.flows:
            sock.close()  # in repair mode: the peer sees nothing
        for holder in outgoing.holders:
            holder.close()
        for listener in outgoing.silenced:
            repair_kernel.unsilence(listener)
        if outgoing.left_behind:
            # The guest is gone and its peers would wait on these forever: tell them.
            for sock in self.stack.forget_tcp_flows():
                reset_on_close(sock)
                sock.close()
            limited(log, logging.WARNING,
                    "migration: reset %d TCP connection(s) that could not move",
                    outgoing.left_behind)
        self.last_result = f"migrated {len(outgoing.states)} TCP connections"
        limited(log, logging.INFO, "migration complete: %s", self.last_result)

    def _rollback(self, why: str) -> None:
        saved = self._saved
        self._saved = self._outgoing = None
        if saved is None:
            return
        limited(log, logging.WARNING, "migration failed (%s): resuming on this side", why)
        try:
            saved.rollback()
        except MigrationError as exc:
            limited(log, logging.ERROR, "migration rollback incomplete: %s", exc)
        self.last_result = "rolled back"

    # -- target -----------------------------------------------------------------

    def begin_load(self) -> _StreamSink:
        """A SET_DEVICE_STATE_FD(LOAD): the stream is parsed as its bytes arrive."""
        self._discard_incoming("a new state arrived")
        return _StreamSink(self, FormatReader(tuple(FORMATS.values()), self.max_size))

    def load_state(self, data: bytes) -> None:
        """A whole stream at once (benchmarks, tests): as begin_load, fed once."""
        sink = self.begin_load()
        sink.feed(data)
        sink.finish()

    def _load(self, loaded: Loaded, fmt: Format) -> None:
        incoming = _Incoming()
        try:
            previous = _addresses_from_stack(self.stack)
            roles = ROLES[fmt.name]
            sides = Bindings(fmt) \
                .bind(roles.addresses, apply=lambda seen: self._apply_addresses(seen, previous)) \
                .bind(roles.tcp, apply=lambda flows: self._restore(flows, incoming))
            if roles.udp is not None:
                sides.bind(roles.udp, apply=lambda flows: self._keep_udp(flows, incoming))
            apply_loaded(fmt, loaded, sides)
        except MigrationError as exc:
            limited(log, logging.ERROR,
                    "migration: refusing incoming state, nothing applied: %s", exc)
            raise DeviceStateError(exc.errno, str(exc)) from exc
        self._incoming = incoming
        limited(log, logging.INFO,
                "migration: %s state loaded, %d bytes, %d TCP connections restored in repair "
                "mode", fmt.name, loaded.size, len(incoming.flows))

    def _apply_addresses(self, seen: GuestAddresses | None,
                         previous: GuestAddresses) -> Callable[[], None]:
        assert seen is not None  # a mandatory stage: the parser checked it is there
        _addresses_to_stack(self.stack, seen)
        return lambda: _addresses_to_stack(self.stack, previous)

    def _restore(self, flows: Sequence[TcpFlow] | None,
                 incoming: _Incoming) -> Callable[[], None]:
        def undo() -> None:
            self._close_incoming(incoming)

        if not flows:
            return undo
        room = self.stack.flows.capacity - len(self.stack.flows)
        if len(flows) > room:
            raise MigrationError(errno.ENOSPC, f"{len(flows)} TCP connections to restore, room "
                                 f"for {room} in the flow table")
        if not self._helper_ready():
            if self.require_repair:
                raise MigrationError(errno.ENOTCONN, f"{len(flows)} TCP connection(s) to "
                                     "restore and no tether-repair helper connected")
            limited(log, logging.WARNING,
                    "migration: no tether-repair helper: %d TCP connection(s) cannot be "
                    "restored; the guest will see them reset", len(flows))
            return undo
        assert self.helper is not None
        try:
            restored = repair.restore_many([f.socket for f in flows], self.helper)
        except OSError as exc:
            raise MigrationError(exc.errno or errno.EIO, f"restoring TCP sockets: {exc}") \
                from exc
        for flow, sock in zip(flows, restored, strict=True):
            if isinstance(sock, socket.socket):
                incoming.flows.append((flow.tap, sock, flow.socket))
        failed = [r for r in restored if not isinstance(r, socket.socket)]
        if failed:
            self._close_incoming(incoming)
            raise MigrationError(failed[0].errno or errno.EIO,
                                 f"{len(failed)} of {len(flows)} TCP connections could not be "
                                 f"restored: {failed[0]}")
        return undo

    @staticmethod
    def _keep_udp(flows: Sequence[UdpFlowRecord] | None, incoming: _Incoming) -> Callable[[], None]:
        incoming.udp = list(flows or ())

        def undo() -> None:
            incoming.udp = []

        return undo

    def _restore_udp(self, flows: list[UdpFlowRecord]) -> int:
        restored = 0
        for record in flows:
            try:
                self.stack.restore_udp_flow(record)
                restored += 1
            except (OSError, ValueError, TableFull) as exc:
                # UDP may lose datagrams: the flow re-forms, from another port, on the
                # guest's next datagram.
                limited(log, logging.WARNING,
                        "migration: UDP flow %s -> %s not re-created: %s", record.local,
                        record.peer, exc)
        return restored

    @staticmethod
    def _close_incoming(incoming: _Incoming) -> None:
        for _, sock, _ in incoming.flows:
            sock.close()  # still in repair mode: silent
        incoming.flows = []

    def _discard_incoming(self, why: str) -> None:
        if self._incoming is not None and self._incoming.flows:
            limited(log, logging.WARNING,
                    "migration: discarding %d restored connections: %s",
                    len(self._incoming.flows), why)
            self._close_incoming(self._incoming)
        self._incoming = None

    def _commit_target(self) -> None:
        incoming = self._incoming
        self._incoming = None
        if incoming is None:
            return
        udp = self._restore_udp(incoming.udp)
        if udp or incoming.udp:
            limited(log, logging.INFO,
                    "migration: %d of %d UDP flows re-created", udp, len(incoming.udp))
        if not incoming.flows:
            self.last_result = "resumed with no TCP connections"
            limited(log, logging.INFO,
                    "migration: guest resumed here, no TCP connections to resume")
            return
        assert self.helper is not None
        flows = incoming.flows
        resumed = 0
        settled = 0

        def hand_to_stack(index: int, thaw_error: RepairError | None) -> None:
            # As each batch is thawed, while the helper thaws the next one.
            nonlocal resumed, settled
            record, sock, _ = flows[index]
            settled = index + 1
            problem: Exception | None = thaw_error
            if problem is None:
                try:
                    self.stack.restore_tcp_flow(record, sock)
                    resumed += 1
                    return
                except (ValueError, TableFull) as exc:
                    problem = exc
            limited(log, logging.ERROR,
                    "migration: connection %s could not resume: %s", record.sides, problem)
            sock.close()

        try:
            repair.thaw_many([(sock, state) for _, sock, state in flows], self.helper,
                             hand_to_stack)
        except OSError as exc:
            # The helper failed midway: what it thawed runs on, the rest is lost.
            limited(log, logging.ERROR, "migration: %d TCP connection(s) lost, leaving repair "
                    "mode failed: %s", len(flows) - settled, exc)
            for _, sock, _ in flows[settled:]:
                sock.close()
        self.last_result = f"resumed {resumed} of {len(incoming.flows)} TCP connections"
        limited(log, logging.INFO, "migration: guest resumed here, %s", self.last_result)

    # -- events from the device ----------------------------------------------------

    @_without_gc
    def rings_started(self) -> None:
        if self._saved is not None:
            self._rollback("the front-end restarted this device")
        elif self._incoming is not None:
            self._commit_target()

    def rings_stopped(self) -> None:
        pass

    @_without_gc
    def front_end_gone(self) -> None:
        if self._saved is not None:
            self._commit_source()
        self._discard_incoming("the front-end went away before the guest resumed")
