"""The stream tether writes and reads: its table of versions and stages.

Changing this table is changing a wire format: follow docs/migration-format.md
section 5.3 (when a new stage can be optional, when `current` and `compat`
must be bumped), and add golden streams for the new version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tether.handover.passt_format import (
    OBSERVED_ADDRESSES,
    PASST_FORMAT,
    PREPARE_FLOWS,
    TRANSFER_FLOWS,
)
from tether.handover.records import (
    GuestAddresses,
    GuestAddressesCodec,
    TcpFlow,
    TcpFlowsCodec,
    UdpFlowsCodec,
)
from tether.migrate.stream import Format, Stage
from tether.net.udp import UdpFlowRecord

GUEST_ADDRESSES: Stage[GuestAddresses] = Stage("guest addresses", 1, GuestAddressesCodec())
FREEZE_TCP: Stage[None] = Stage("freeze tcp", 2)
TCP_FLOWS: Stage[Sequence[TcpFlow]] = Stage("tcp flows", 3, TcpFlowsCodec())
UDP_FLOWS: Stage[Sequence[UdpFlowRecord]] = Stage("udp flows", 4, UdpFlowsCodec())

TETHER_FORMAT = Format(
    versions={
        1: (GUEST_ADDRESSES, FREEZE_TCP, TCP_FLOWS, UDP_FLOWS),
    },
    current=1,
    compat=1,
)


FORMATS: dict[str, Format] = {"tether": TETHER_FORMAT, "passt": PASST_FORMAT}
"""Every format a target reads (picked by the stream's magic); --migrate-format names one."""


@dataclass(frozen=True)
class Roles:
    """Which stage of a format does each part of a handover.

    The handover binds its source and target sides to these Stage objects
    (migrate.stream.Bindings), so a format without a stage for a role is
    stated here (None), not discovered by a name that does not match.
    """

    addresses: Stage[GuestAddresses]
    freeze: Stage[None]
    """Source only: make the TCP sockets quiet and dumpable (TCP_REPAIR)."""
    tcp: Stage[Sequence[TcpFlow]]
    udp: Stage[Sequence[UdpFlowRecord]] | None
    """None: the format cannot carry UDP flows; the guest's next datagram opens each again."""


ROLES: dict[str, Roles] = {
    TETHER_FORMAT.name: Roles(GUEST_ADDRESSES, FREEZE_TCP, TCP_FLOWS, UDP_FLOWS),
    PASST_FORMAT.name: Roles(OBSERVED_ADDRESSES, PREPARE_FLOWS, TRANSFER_FLOWS, None),
}
"""Keyed by Format.name; every format in FORMATS has its roles."""
assert ROLES.keys() == FORMATS.keys()
