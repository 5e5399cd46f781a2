"""Payload layouts of tether's own stages (docs/migration-format.md section 6).

Each codec validates every byte it reads: a stream is input from another
machine, and a value that passes here is made live on the target.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tether.migrate.errors import MigrationError
from tether.migrate.records import FixedRecords, expect_size
from tether.migrate.stream import Buffer
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, TcpFlowRecord
from tether.net.udp import UdpFlowRecord
from tether.repair import record as tcp_record
from tether.repair.record import TcpConnState
from tether.wire import inany


@dataclass(frozen=True)
class GuestAddresses:
    """What tether learned about the guest by watching its traffic.

    All-zero fields mean "not seen yet".  Addresses are kept as raw
    network-order bytes, as they appear on the wire.
    """

    mac: bytes = bytes(6)
    ipv4: bytes = bytes(4)
    ipv6: bytes = bytes(16)
    ipv6_link_local: bytes = bytes(16)

    def __post_init__(self) -> None:
        for name, size in (("mac", 6), ("ipv4", 4), ("ipv6", 16), ("ipv6_link_local", 16)):
            if len(getattr(self, name)) != size:
                raise ValueError(f"{name} must be {size} bytes")


class GuestAddressesCodec:
    """docs/migration-format.md section 6.1.

    mac(6) | ipv4(4) | ipv6(16) | ipv6_link_local(16): 42 bytes.
    """

    LAYOUT = struct.Struct(">6s4s16s16s")

    def encode(self, value: GuestAddresses) -> Sequence[Buffer]:
        return [self.LAYOUT.pack(value.mac, value.ipv4, value.ipv6, value.ipv6_link_local)]

    def decode(self, payload: memoryview) -> GuestAddresses:
        expect_size(payload, self.LAYOUT.size, "guest addresses")
        mac, ipv4, ipv6, link_local = self.LAYOUT.unpack(payload)
        if mac[0] & 1:
            raise MigrationError(errno.EINVAL,
                                 f"expected a unicast guest MAC, found {mac.hex(':')}", offset=0)
        v4 = ipaddress.IPv4Address(ipv4)
        if any(ipv4) and (v4.is_multicast or v4 == ipaddress.IPv4Address("255.255.255.255")):
            raise MigrationError(errno.EINVAL, f"expected a unicast guest IPv4, found {v4}",
                                 offset=6)
        v6 = ipaddress.IPv6Address(ipv6)
        if any(ipv6) and (v6.is_multicast or v6.is_link_local):
            raise MigrationError(errno.EINVAL,
                                 f"expected a global or unique-local guest IPv6, found {v6}",
                                 offset=10)
        ll = ipaddress.IPv6Address(link_local)
        if any(link_local) and not ll.is_link_local:
            raise MigrationError(errno.EINVAL,
                                 f"expected a link-local guest IPv6 (fe80::/10), found {ll}",
                                 offset=26)
        return GuestAddresses(mac, ipv4, ipv6, link_local)


# Not frozen, though used as a value (copy with dataclasses.replace, never
# assign): a frozen dataclass's __init__ sets each field through
# object.__setattr__, ten times slower, and a migration builds this for
# every connection inside the VM's downtime.
@dataclass(slots=True)
class TcpFlow:
    """One TCP connection: the guest-facing half and the host socket's half."""

    tap: TcpFlowRecord
    """Sequence and window state towards the guest, in passt's per-flow terms."""
    socket: TcpConnState
    """The kernel socket's state, restored with TCP_REPAIR."""


class TcpFlowsCodec:
    """docs/migration-format.md section 6.3: count u32, then per flow a 68-byte
    guest-side record followed by the socket's TCP state record (its layout:
    docs/migration-format.md section 6.4, 88 bytes plus the queued data)."""

    COUNT = struct.Struct(">I")
    TAP = struct.Struct(">BBBBBBHHHHH16s16sIIIII")
    INBOUND = 1

    def encode(self, value: Sequence[TcpFlow]) -> Sequence[Buffer]:
        size = self.COUNT.size + sum(self.TAP.size + f.socket.encoded_size() for f in value)
        out = bytearray(size)
        self.COUNT.pack_into(out, 0, len(value))
        offset = self.COUNT.size
        for flow in value:
            t = flow.tap
            tap = 1 if t.pif[1] == PIF_TAP else 0
            remote, guest, remote_port, guest_port = t.sides[tap]
            self.TAP.pack_into(out, offset, self.INBOUND if tap == 1 else 0, t.events,
                               t.retries, t.ws_from_tap, t.ws_to_tap, 0, t.tap_mss,
                               t.wnd_from_tap, t.wnd_to_tap, guest_port, remote_port, guest,
                               remote, t.seq_to_tap, t.seq_ack_from_tap, t.seq_from_tap,
                               t.seq_ack_to_tap, t.seq_init_from_tap)
            offset = flow.socket.encode_into(out, offset + self.TAP.size)
        return [out]

    def decode(self, payload: memoryview) -> list[TcpFlow]:
        if payload.nbytes < self.COUNT.size:
            raise MigrationError(errno.EINVAL, "expected a flow count, found "
                                 f"{payload.nbytes} bytes", offset=0)
        (count,) = self.COUNT.unpack_from(payload)
        minimum = self.COUNT.size + count * (self.TAP.size + tcp_record.FIXED_SIZE)
        if payload.nbytes < minimum:
            raise MigrationError(errno.EINVAL, f"expected at least {minimum} bytes for "
                                 f"{count} flows, found {payload.nbytes}", offset=0)
        flows = []
        offset = self.COUNT.size
        for _ in range(count):
            if offset + self.TAP.size > payload.nbytes:
                raise MigrationError(errno.EINVAL, "flow record cut short", offset=offset)
            tap = self._tap(payload, offset)
            try:
                state, offset = tcp_record.decode(payload, offset + self.TAP.size)
            except tcp_record.RecordError as exc:
                raise MigrationError(errno.EINVAL, str(exc), offset=exc.offset) from exc
            self._check_pair(tap, state, offset)
            flows.append(TcpFlow(tap, state))
        if offset != payload.nbytes:
            raise MigrationError(errno.EINVAL, f"expected {count} flows to end the payload, "
                                 f"found {payload.nbytes - offset} more bytes", offset=offset)
        return flows

    def _tap(self, payload: memoryview, offset: int) -> TcpFlowRecord:
        (direction, events, retries, ws_from_tap, ws_to_tap, reserved, tap_mss, wnd_from_tap,
         wnd_to_tap, guest_port, remote_port, guest, remote, seq_to_tap, seq_ack_from_tap,
         seq_from_tap, seq_ack_to_tap, seq_init_from_tap) = self.TAP.unpack_from(payload, offset)
        if direction > self.INBOUND or reserved:
            raise MigrationError(errno.EINVAL, f"expected direction 0 or 1 and a zero reserved "
                                 f"byte, found {direction} and {reserved}", offset=offset)
        if not events & ESTABLISHED:
            raise MigrationError(errno.EINVAL, f"expected an established flow, found events "
                                 f"{events:#04x}", offset=offset + 1)
        if ws_from_tap > 14 or ws_to_tap > 14:
            raise MigrationError(errno.EINVAL, "expected window scales <= 14, found "
                                 f"{ws_from_tap} and {ws_to_tap}", offset=offset + 3)
        if not tap_mss >= 64:
            raise MigrationError(errno.EINVAL, f"expected a guest MSS >= 64, found {tap_mss}",
                                 offset=offset + 6)
        for name, raw, where in (("guest", guest, 16), ("remote", remote, 32)):
            # Byte tests, not ipaddress objects: a target decodes every flow
            # inside the VM's downtime.  (:: and ff00::/8, as IPv6Address says.)
            if raw == _ANY6 or raw[0] == 0xFF:
                raise MigrationError(errno.EINVAL, f"expected a unicast {name} address, "
                                     f"found {ipaddress.IPv6Address(raw)}",
                                     offset=offset + where)
        if (inany.v4_of(guest) is None) != (inany.v4_of(remote) is None):
            raise MigrationError(errno.EINVAL, "guest and remote addresses mix IPv4 and IPv6",
                                 offset=offset + 16)
        guest_side = (remote, guest, remote_port, guest_port)
        host_side = (bytes(16), bytes(16), 0, 0)
        if direction == self.INBOUND:
            pif, sides = (PIF_HOST, PIF_TAP), (host_side, guest_side)
        else:
            pif, sides = (PIF_TAP, PIF_HOST), (guest_side, host_side)
        return TcpFlowRecord(pif, sides, retries, ws_from_tap, ws_to_tap, events, tap_mss, 0, 0,
                             0, wnd_from_tap, wnd_to_tap, seq_to_tap, seq_ack_from_tap,
                             seq_from_tap, seq_ack_to_tap, seq_init_from_tap)

    @staticmethod
    def _check_pair(tap: TcpFlowRecord, state: TcpConnState, offset: int) -> None:
        in_flight = (tap.seq_to_tap - tap.seq_ack_from_tap) & 0xFFFFFFFF
        if in_flight > len(state.recv_queue) + 1:  # + 1: a FIN takes a sequence number
            raise MigrationError(errno.EINVAL, f"expected at most {len(state.recv_queue)} "
                                 f"bytes in flight to the guest (the socket's receive queue), "
                                 f"found {in_flight}", offset=offset)


_ANY6 = bytes(16)


def _host(text: str) -> bytes:
    return ipaddress.ip_address(text).packed if ":" in text else inany.mapped(
        ipaddress.IPv4Address(text).packed)


def _host_text(raw: bytes) -> str:
    v4 = inany.v4_of(raw)
    return str(ipaddress.IPv4Address(v4)) if v4 is not None else str(ipaddress.IPv6Address(raw))


class UdpFlowsCodec:
    """docs/migration-format.md section 6.5: count u32, then 76-byte records."""

    TABLE = FixedRecords(">BBHHHHH16s16s16s16s", "UDP flows")
    _FIRST = FixedRecords.COUNT.size

    def encode(self, value: Sequence[UdpFlowRecord]) -> Sequence[Buffer]:
        return self.TABLE.encode([(int(f.inbound), 0, f.guest_port, f.remote_port, f.local[1],
                                   f.peer[1], 0, inany.mapped(f.guest_addr),
                                   inany.mapped(f.remote_addr), _host(f.local[0]),
                                   _host(f.peer[0])) for f in value])

    def decode(self, payload: memoryview) -> list[UdpFlowRecord]:
        out = []
        size = self.TABLE.layout.size
        for i, fields in enumerate(self.TABLE.decode(payload)):
            offset = self._FIRST + i * size
            (inbound, reserved, guest_port, remote_port, local_port, peer_port, reserved2,
             guest, remote, local, peer) = fields
            if inbound > 1 or reserved or reserved2:
                raise MigrationError(errno.EINVAL, "expected direction 0 or 1 and zero "
                                     "reserved fields", offset=offset)
            if (inany.v4_of(guest) is None) != (inany.v4_of(remote) is None):
                raise MigrationError(errno.EINVAL, "guest and remote addresses mix IPv4 and "
                                     "IPv6", offset=offset + 12)
            for name, raw, where in (("guest", guest, 12), ("remote", remote, 28),
                                     ("peer", peer, 60)):
                address = ipaddress.IPv6Address(raw)
                if address.is_unspecified or address.is_multicast:
                    raise MigrationError(errno.EINVAL, f"expected a unicast {name} address, "
                                         f"found {address}", offset=offset + where)
            if 0 in (guest_port, remote_port, local_port, peer_port):
                raise MigrationError(errno.EINVAL, "expected non-zero ports", offset=offset + 2)
            v4 = inany.v4_of(guest)
            out.append(UdpFlowRecord(bool(inbound), v4 if v4 is not None else guest, guest_port,
                                     inany.v4_of(remote) or remote, remote_port,
                                     (_host_text(local), local_port),
                                     (_host_text(peer), peer_port)))
        return out
