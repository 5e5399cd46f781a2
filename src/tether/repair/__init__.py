"""Move live TCP connections between processes and hosts with TCP_REPAIR.

Knows nothing of the flow table: it works on sockets and state records.
"""

from tether.repair.record import RecordError, TcpConnState, decode
from tether.repair.tcp import (
    KernelSwitch,
    RepairError,
    RepairSwitch,
    dump,
    freeze,
    hold_address,
    restore,
    restore_many,
    resume,
    thaw,
    thaw_many,
    unfreeze,
)

__all__ = [
    "KernelSwitch",
    "RecordError",
    "RepairError",
    "RepairSwitch",
    "TcpConnState",
    "decode",
    "dump",
    "freeze",
    "hold_address",
    "restore",
    "restore_many",
    "resume",
    "thaw",
    "thaw_many",
    "unfreeze",
]
