"""passt's device-state stream, version 2, as one more migration Format.

So that a VM moves between a passt host and a tether host, both ways.  The
layouts are passt's (reference/passt-migration.md; the section numbers below
are that file's):

    header (1.2)        magic 0xB1BB1D1B0BB1D1B0 | version 2 | compat_version 2
    observed addresses  addr6(16) addr6_ll(16) addr4(4) mac(6)              (1.3)
    prepare flows       nothing on the wire (the source freezes its sockets)
    transfer flows      count u32 | count x 112-byte flow record (2.5)
                        | count x [52-byte socket record (2.6) | send queue |
                        receive queue]

Nothing frames a stage, so the flows codec delimits its own payload from the
count and each socket record's queue lengths, checking each against passt's
bounds as it reads it (`FLOW_MAX`, 64 MiB per queue).  Everything tether
cannot represent is refused by name before anything is applied: a flow that
does not join the guest to a host socket (spliced, say), one that is not
established, a socket state TCP_REPAIR cannot rebuild.  A flow passt marks
"skip" (socket state 0: its dump failed on the source) is dropped, as passt
itself drops it.

The socket record's sequence fields follow passt's dump (2.7): each
sequence is the kernel's queue sequence, which counts a FIN, minus the
queue's length, so after a FIN it is one past where tether's TcpConnState
(data only, repair/tcp.py) starts; and in CLOSE_WAIT and LAST_ACK passt
lowers rcv_wup by one and raises rcv_wnd by one.  Checked on streams of the
real passt (tests/data/migration/passt/) and by moving VMs both ways.  The
conversion is in one place each way: `_from_passt` and `_to_passt`.

A limit of passt 0.0~git20250503, not of this reader: in CLOSE_WAIT it
writes its receive queue one byte short (the sequences agree with what it
wrote), so that byte of a connection the host half-closed is lost when such
a passt is the source; as a target it does not resume CLOSE_WAIT flows.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import replace

from tether.handover.records import (
    GuestAddresses,
    GuestAddressesCodec,
    TcpFlow,
    TcpFlowsCodec,
)
from tether.migrate.errors import MigrationError
from tether.migrate.stream import Buffer, Format, Stage
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, SOCK_ACCEPTED, TcpFlowRecord
from tether.repair.kernel import FIN_RECEIVED, FIN_SENT, MIGRATABLE, WSCALE_MAX, TcpState
from tether.repair.record import _OPT_KNOWN, OPT_WSCALE, QUEUE_MAX, TcpConnState
from tether.wire import inany

PASST_MAGIC = 0xB1BB1D1B0BB1D1B0
FLOW_MAX = (1 << 17) - 1  # passt's flow table (2.6)
_PIF_NAMES = {0: "none", 1: "host", 2: "tap", 3: "splice"}

# 2.6, all big-endian: seq_snd seq_rcv sndq notsent rcvq mss timestamp snd_wl1
# snd_wnd max_window rcv_wnd rcv_wup, then snd_ws rcv_ws tcpi_state tcpi_options.
SOCKET_RECORD = struct.Struct(">12I4B")
_COUNT = struct.Struct(">I")
_SKIP = 0  # tcpi_state 0: the source could not dump this flow
# passt adjusts the window fields for a received FIN only in these two states.
_WUP_ADJUSTED = frozenset({TcpState.CLOSE_WAIT, TcpState.LAST_ACK})


class PasstAddressesCodec:
    """1.3: the guest's addresses and MAC as passt saw them, 42 bytes."""

    LAYOUT = struct.Struct(">16s16s4s6s")

    def encode(self, value: GuestAddresses) -> Sequence[Buffer]:
        return [self.LAYOUT.pack(value.ipv6, value.ipv6_link_local, value.ipv4, value.mac)]

    def decode(self, payload: memoryview) -> GuestAddresses:
        addr6, link_local, addr4, mac = self.LAYOUT.unpack(payload)
        # The same checks as tether's own stage; its layout orders the fields
        # mac, ipv4, ipv6, link-local, so offsets are translated back.
        ours = GuestAddressesCodec.LAYOUT.pack(mac, addr4, addr6, link_local)
        try:
            return GuestAddressesCodec().decode(memoryview(ours))
        except MigrationError as exc:
            exc.offset = {0: 36, 6: 32, 10: 0, 26: 16}.get(exc.offset or 0, 0)
            raise

    def delimiter(self) -> _Fixed:
        return _Fixed(self.LAYOUT.size)


class _Fixed:
    def __init__(self, size: int) -> None:
        self.size = size

    def need(self, prefix: memoryview) -> int:
        return self.size


class _FlowsDelimiter:
    """Walks count, flow records, socket records and queues as their bytes arrive."""

    def __init__(self) -> None:
        self._count = -1
        self._pos = 0  # where the next socket record starts, once the count is known
        self._seen = 0  # socket records walked

    def need(self, prefix: memoryview) -> int:
        if self._count < 0:
            if prefix.nbytes < _COUNT.size:
                return _COUNT.size
            (count,) = _COUNT.unpack_from(prefix)
            if count > FLOW_MAX:
                raise MigrationError(errno.EINVAL, f"expected at most {FLOW_MAX} flows (passt's "
                                     f"table), found a count of {count}", offset=0)
            self._count = count
            self._pos = _COUNT.size + count * TcpFlowRecord.SIZE
        while self._seen < self._count:
            if prefix.nbytes < self._pos + SOCKET_RECORD.size:
                return self._pos + SOCKET_RECORD.size
            fields = SOCKET_RECORD.unpack_from(prefix, self._pos)
            sndq, notsent, rcvq, state = fields[2], fields[3], fields[4], fields[14]
            length = 0
            if state != _SKIP:
                _check_queues(sndq, notsent, rcvq, self._pos, self._seen)
                length = sndq + rcvq
            self._pos += SOCKET_RECORD.size + length
            self._seen += 1
        return self._pos


def _check_queues(sndq: int, notsent: int, rcvq: int, offset: int, index: int) -> None:
    if sndq > QUEUE_MAX or rcvq > QUEUE_MAX:
        raise MigrationError(errno.EINVAL, f"flow {index}: expected queues of at most "
                             f"{QUEUE_MAX} bytes, found send {sndq} receive {rcvq}",
                             offset=offset + 8)
    if notsent > sndq:
        raise MigrationError(errno.EINVAL, f"flow {index}: expected at most {sndq} unsent "
                             f"bytes (the send queue), found {notsent}", offset=offset + 12)


class PasstFlowsCodec:
    """2.3-2.6: every established TCP flow, its guest side and its socket."""

    def delimiter(self) -> _FlowsDelimiter:
        return _FlowsDelimiter()

    def encode(self, value: Sequence[TcpFlow]) -> Sequence[Buffer]:
        out: list[Buffer] = [_COUNT.pack(len(value))]
        # passt's ESTABLISHED is a state bit that clears SOCK_ACCEPTED and
        # TAP_SYN_RCVD; a passt target that finds SOCK_ACCEPTED still set takes
        # the flow for one waiting for the guest's SYN|ACK and resets it.
        out += [replace(flow.tap, events=flow.tap.events & ~SOCK_ACCEPTED).pack()
                for flow in value]
        for flow in value:
            out.append(_to_passt(flow.socket))
            out += [flow.socket.send_queue, flow.socket.recv_queue]
        return out

    def decode(self, payload: memoryview) -> list[TcpFlow]:
        (count,) = _COUNT.unpack_from(payload)
        pos = _COUNT.size + count * TcpFlowRecord.SIZE
        flows = []
        for i in range(count):
            at = _COUNT.size + i * TcpFlowRecord.SIZE
            tap = _tap_record(bytes(payload[at:at + TcpFlowRecord.SIZE]), at, i)
            fields = SOCKET_RECORD.unpack_from(payload, pos)
            start, pos = pos, pos + SOCKET_RECORD.size
            if fields[14] == _SKIP:
                continue  # passt dropped it on the source; so does passt's target
            sndq, rcvq = fields[2], fields[4]
            send_queue = bytes(payload[pos:pos + sndq])
            recv_queue = bytes(payload[pos + sndq:pos + sndq + rcvq])
            pos += sndq + rcvq
            state = _from_passt(tap, fields, send_queue, recv_queue=recv_queue, offset=start,
                                index=i)
            TcpFlowsCodec._check_pair(tap, state, start)
            flows.append(TcpFlow(tap, state))
        return flows


def _tap_record(raw: bytes, offset: int, index: int) -> TcpFlowRecord:
    record = TcpFlowRecord.unpack(raw)
    pif = record.pif
    if sorted(pif) != [PIF_HOST, PIF_TAP]:
        names = "/".join(_PIF_NAMES.get(p, str(p)) for p in pif)
        raise MigrationError(errno.ENOTSUP, f"flow {index}: tether moves flows between the "
                             f"guest and a host socket, found sides {names}", offset=offset)
    if not record.events & ESTABLISHED:
        raise MigrationError(errno.EINVAL, f"flow {index}: expected an established flow, found "
                             f"events {record.events:#04x}", offset=offset + 77)
    if record.ws_from_tap > 14 or record.ws_to_tap > 14:
        raise MigrationError(errno.EINVAL, f"flow {index}: expected window scales <= 14, found "
                             f"{record.ws_from_tap} and {record.ws_to_tap}", offset=offset + 75)
    if record.tap_mss < 64 or record.tap_mss > 0xFFFF:
        raise MigrationError(errno.EINVAL, f"flow {index}: expected a guest MSS in [64, 65535], "
                             f"found {record.tap_mss}", offset=offset + 78)
    tap = pif.index(PIF_TAP)
    remote, guest, _, _ = record.sides[tap]
    if (inany.v4_of(guest) is None) != (inany.v4_of(remote) is None):
        raise MigrationError(errno.EINVAL, f"flow {index}: guest and remote addresses mix IPv4 "
                             "and IPv6", offset=offset + 2 + 36 * tap)
    # tether keeps SOCK_ACCEPTED on an inbound flow for good (passt clears it).
    return replace(record, events=record.events | SOCK_ACCEPTED) if tap == 1 else record


def _text(raw: bytes) -> tuple[int, str]:
    v4 = inany.v4_of(raw)
    if v4 is not None:
        return socket.AF_INET, socket.inet_ntop(socket.AF_INET, v4)
    return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, raw)


def _from_passt(tap: TcpFlowRecord, fields: tuple[int, ...], send_queue: bytes, *,
                recv_queue: bytes, offset: int, index: int) -> TcpConnState:
    (seq_snd, seq_rcv, _sndq, notsent, _rcvq, mss, timestamp, snd_wl1, snd_wnd, max_window,
     rcv_wnd, rcv_wup, snd_ws, rcv_ws, raw_state, options) = fields
    if raw_state not in MIGRATABLE:
        raise MigrationError(errno.ENOTSUP, f"flow {index}: TCP state {raw_state} cannot be "
                             "rebuilt with TCP_REPAIR", offset=offset + 50)
    if options & ~_OPT_KNOWN:
        raise MigrationError(errno.ENOTSUP, f"flow {index}: unknown TCP option bits "
                             f"{options & ~_OPT_KNOWN:#04x}", offset=offset + 51)
    if snd_ws > WSCALE_MAX or rcv_ws > WSCALE_MAX:
        raise MigrationError(errno.EINVAL, f"flow {index}: window scales {snd_ws}/{rcv_ws} "
                             f"above {WSCALE_MAX}", offset=offset + 48)
    if not 0 < mss <= 0xFFFF:
        raise MigrationError(errno.EINVAL, f"flow {index}: MSS {mss}", offset=offset + 20)
    if max_window < snd_wnd:
        raise MigrationError(errno.EINVAL, f"flow {index}: max_window {max_window} below "
                             f"snd_wnd {snd_wnd}", offset=offset + 36)
    state = TcpState(raw_state)
    host = tap.sides[tap.pif.index(PIF_HOST)]
    oaddr, eaddr, oport, eport = host
    family, remote = _text(eaddr)
    local_family, local = _text(oaddr)
    if local_family != family or not eport or not oport:
        raise MigrationError(errno.EINVAL, f"flow {index}: host side {local}:{oport} -> "
                             f"{remote}:{eport} is not a connection", offset=offset)
    if not options & OPT_WSCALE:
        snd_ws = rcv_ws = 0
    if state in _WUP_ADJUSTED:
        rcv_wup, rcv_wnd = (rcv_wup + 1) & 0xFFFFFFFF, rcv_wnd - 1
    return TcpConnState(
        family=family, local=(local, oport), remote=(remote, eport), state=state,
        options=options, snd_wscale=snd_ws, rcv_wscale=rcv_ws, mss=mss, timestamp=timestamp,
        snd_seq=(seq_snd - int(state in FIN_SENT)) & 0xFFFFFFFF,
        rcv_seq=(seq_rcv - int(state in FIN_RECEIVED)) & 0xFFFFFFFF,
        snd_wl1=snd_wl1, snd_wnd=snd_wnd, max_window=max_window, rcv_wnd=rcv_wnd,
        rcv_wup=rcv_wup, send_queue=send_queue, unsent_len=notsent, recv_queue=recv_queue)


def _to_passt(st: TcpConnState) -> bytes:
    rcv_wup, rcv_wnd = st.rcv_wup, st.rcv_wnd
    if st.state in _WUP_ADJUSTED:
        rcv_wup, rcv_wnd = (rcv_wup - 1) & 0xFFFFFFFF, rcv_wnd + 1
    return SOCKET_RECORD.pack(
        (st.snd_seq + int(st.state in FIN_SENT)) & 0xFFFFFFFF,
        (st.rcv_seq + int(st.state in FIN_RECEIVED)) & 0xFFFFFFFF,
        len(st.send_queue), st.unsent_len, len(st.recv_queue), st.mss, st.timestamp,
        st.snd_wl1, st.snd_wnd, st.max_window, rcv_wnd, rcv_wup, st.snd_wscale,
        st.rcv_wscale, int(st.state), st.options)


OBSERVED_ADDRESSES: Stage[GuestAddresses] = Stage("observed addresses", 1, PasstAddressesCodec())
PREPARE_FLOWS: Stage[None] = Stage("prepare flows", 2)
TRANSFER_FLOWS: Stage[Sequence[TcpFlow]] = Stage("transfer flows", 3, PasstFlowsCodec())

PASST_FORMAT = Format(
    versions={2: (OBSERVED_ADDRESSES, PREPARE_FLOWS, TRANSFER_FLOWS)},
    current=2,
    compat=2,
    magic=PASST_MAGIC,
    framed=False,
    name="passt",
)
