"""The stream tether writes and reads: its table of versions and stages.

Changing this table is changing a wire format: follow docs/migration-format.md
section 5.3 (when a new stage can be optional, when `current` and `compat`
must be bumped), and add golden streams for the new version.
"""

from __future__ import annotations

from tether.handover.passt_format import PASST_FORMAT
from tether.handover.records import GuestAddressesCodec, TcpFlowsCodec, UdpFlowsCodec
from tether.migrate.stream import Format, Stage

GUEST_ADDRESSES = Stage("guest addresses", 1, GuestAddressesCodec())
FREEZE_TCP: Stage[None] = Stage("freeze tcp", 2)
TCP_FLOWS = Stage("tcp flows", 3, TcpFlowsCodec())
UDP_FLOWS = Stage("udp flows", 4, UdpFlowsCodec())

TETHER_FORMAT = Format(
    versions={
        1: (GUEST_ADDRESSES, FREEZE_TCP, TCP_FLOWS, UDP_FLOWS),
    },
    current=1,
    compat=1,
)


FORMATS: dict[str, Format] = {"tether": TETHER_FORMAT, "passt": PASST_FORMAT}
"""Every format a target reads (picked by the stream's magic); --migrate-format names one."""
