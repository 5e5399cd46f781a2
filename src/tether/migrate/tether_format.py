"""The stream tether writes and reads: its table of versions and stages.

Changing this table is changing a wire format: follow docs/migration-format.md
section 5.3 (when a new stage can be optional, when `current` and `compat`
must be bumped), and add golden streams for the new version.
"""

from __future__ import annotations

from tether.migrate.records import GuestAddressesCodec
from tether.migrate.stream import Format, Stage

GUEST_ADDRESSES = Stage("guest addresses", 1, GuestAddressesCodec())

TETHER_FORMAT = Format(
    versions={
        1: (GUEST_ADDRESSES,),
    },
    current=1,
    compat=1,
)
