"""passt's per-flow TCP migration record, `struct tcp_tap_transfer` (112 bytes).

Declared once here, next to its codec: reference/passt-migration.md section 2.5
and docs/migration-format.md describe the layout.  The event bits are passt's
(tcp_conn.h) as they travel; tether's own names for them, which tell apart the
two meanings passt gives 0x08, are in net/tcp_state.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

# passt's connection event bits (tcp_conn.h), as the record carries them.
SOCK_ACCEPTED = 0x01
TAP_SYN_RCVD = 0x02
ESTABLISHED = 0x04
# One bit, two meanings: TAP_SYN_ACK_SENT before ESTABLISHED, SOCK_FIN_RCVD after.
SYN_ACK_SENT_OR_SOCK_FIN_RCVD = 0x08
SOCK_FIN_SENT = 0x10
TAP_FIN_RCVD = 0x20
TAP_FIN_SENT = 0x40
TAP_FIN_ACKED = 0x80

# passt's interface identifiers (pif.h), the record's `pif` pair.
PIF_HOST = 1
PIF_TAP = 2


# Not frozen, though used as a value (copy with dataclasses.replace, never
# assign): a frozen dataclass's __init__ sets each field through
# object.__setattr__, ten times slower, and a migration builds this for
# every connection inside the VM's downtime.
@dataclass(slots=True)
class TcpFlowRecord:
    """One flow as passt's `struct tcp_tap_transfer` (112 bytes) describes it.

    Side 0 is the initiator: the guest for outbound flows, the host peer for
    inbound ones.  Addresses are IPv4-mapped IPv6 (`::ffff:a.b.c.d`, wire/inany.py).
    `events` holds passt's bits as above, not tether's in-memory ones.
    """

    pif: tuple[int, int]
    sides: tuple[tuple[bytes, bytes, int, int], tuple[bytes, bytes, int, int]]
    retries: int
    ws_from_tap: int
    ws_to_tap: int
    events: int
    tap_mss: int
    sndbuf: int
    flags: int
    seq_dup_ack_approx: int
    wnd_from_tap: int
    wnd_to_tap: int
    seq_to_tap: int
    seq_ack_from_tap: int
    seq_from_tap: int
    seq_ack_to_tap: int
    seq_init_from_tap: int

    # Offset 0: pif[2]; 2 and 38: the two flowsides (oaddr, eaddr, oport, eport),
    # ports in the sender's native byte order in passt (section 2.5): "=H".
    _SIDE: ClassVar[struct.Struct] = struct.Struct("=16s16sHH")
    # Offset 74: retries, ws_from_tap, ws_to_tap, events, tap_mss, sndbuf, flags,
    # seq_dup_ack_approx, wnd_from_tap, wnd_to_tap, then the five sequence numbers.
    _TAIL: ClassVar[struct.Struct] = struct.Struct("!BBBBIIBBHHIIIII")
    SIZE: ClassVar[int] = 112

    def pack(self) -> bytes:
        out = bytes(self.pif)
        for side in self.sides:
            out += self._SIDE.pack(*side)
        out += self._TAIL.pack(self.retries, self.ws_from_tap, self.ws_to_tap, self.events,
                               self.tap_mss, self.sndbuf, self.flags, self.seq_dup_ack_approx,
                               self.wnd_from_tap, self.wnd_to_tap, self.seq_to_tap,
                               self.seq_ack_from_tap, self.seq_from_tap, self.seq_ack_to_tap,
                               self.seq_init_from_tap)
        return out

    @classmethod
    def unpack(cls, data: bytes) -> TcpFlowRecord:
        if len(data) != cls.SIZE:
            raise ValueError(f"TCP flow record is {len(data)} bytes, need {cls.SIZE}")
        s0 = cls._SIDE.unpack_from(data, 2)
        s1 = cls._SIDE.unpack_from(data, 38)
        tail = cls._TAIL.unpack_from(data, 74)
        return cls((data[0], data[1]), (s0, s1), *tail)
