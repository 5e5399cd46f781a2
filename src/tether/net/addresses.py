"""What the stack learned about the guest from the frames it sent.

The record layout is passt's "observed addresses" migration payload
(reference/passt-migration.md section 1.3): IPv6 (16), IPv6 link-local (16),
IPv4 (4), MAC (6), raw network-order bytes, 42 bytes in all.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

RECORD: Final = struct.Struct("!16s16s4s6s")
RECORD_LEN: Final = RECORD.size  # 42


@dataclass
class GuestAddresses:
    mac: bytes | None = None
    addr4: bytes | None = None
    addr6: bytes | None = None
    addr6_ll: bytes | None = None

    def dump(self) -> bytes:
        return RECORD.pack(self.addr6 or bytes(16), self.addr6_ll or bytes(16),
                           self.addr4 or bytes(4), self.mac or bytes(6))

    def load(self, record: bytes) -> None:
        """Replace what was learned; ValueError (and no change) if the record is malformed."""
        if len(record) != RECORD_LEN:
            raise ValueError(f"guest address record is {len(record)} bytes, need {RECORD_LEN}")
        addr6, addr6_ll, addr4, mac = RECORD.unpack(record)
        self.addr6 = addr6 if any(addr6) else None
        self.addr6_ll = addr6_ll if any(addr6_ll) else None
        self.addr4 = addr4 if any(addr4) else None
        self.mac = mac if any(mac) else None
