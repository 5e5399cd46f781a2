"""The flow table: every translated connection, looked up by its guest-side 4-tuple.

Bounded on purpose: a guest that opens flows without end must hit a clean
refusal (TableFull), not exhaust tether's file descriptors or memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol

from tether.loop import Loop, Timer

FlowKey = tuple[int, bytes, int, bytes, int]
"""(IP protocol, guest address, guest port, remote address as the guest sees it, remote port)."""


_SHARED_MAX: Final = 4096  # distinct addresses and ports FlowTable.canonical keeps


class TableFull(Exception):  # noqa: N818 - reads as the condition it is
    """No room for another flow."""


class Flow(Protocol):
    key: FlowKey

    def close(self) -> None:
        """Release the flow's socket(s) and timers; called once, on removal."""
        ...


class FlowTable:
    """Every flow of one stack by its FlowKey, at most `capacity` of them.

    Translators look a guest packet's flow up here, ask check_room() before
    they open a host socket for a new one, and remove() a flow to close it:
    the table owns its flows, so close_all() releases every socket and timer.
    detach() lets go of a flow whose resources were handed elsewhere
    (migration) without closing them.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("flow table capacity must be at least 1")
        self.capacity = capacity
        self._flows: dict[FlowKey, Flow] = {}
        self._addresses: dict[bytes, bytes] = {}
        self._ports: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows.values()))

    def get(self, key: FlowKey) -> Flow | None:
        return self._flows.get(key)

    def canonical(self, key: FlowKey) -> FlowKey:
        """The key a long-lived flow keeps: its addresses and remote port shared.

        A key parsed from a frame or a record holds objects of its own, 48
        bytes for each address and 32 for a port above 256, while thousands
        of flows have the same guest address and mostly a few remote
        addresses and ports: one object for each saves up to 128 bytes per
        established flow (bench_flow_memory).  The cache is bounded, so a
        guest that spreads flows over many addresses costs no more than it
        did before; it is cleared when full, never searched.  (In the
        compiled build the port is not shared: mypyc keeps a tuple's ints
        unboxed and boxes them afresh.)
        """
        proto, guest, guest_port, remote, remote_port = key
        addresses, ports = self._addresses, self._ports
        if len(addresses) >= _SHARED_MAX:
            addresses.clear()
        if len(ports) >= _SHARED_MAX:
            ports.clear()
        return (proto, addresses.setdefault(guest, guest), guest_port,
                addresses.setdefault(remote, remote), ports.setdefault(remote_port, remote_port))

    def check_room(self) -> None:
        if len(self._flows) >= self.capacity:
            raise TableFull(f"flow table full ({self.capacity} flows)")

    def add(self, flow: Flow) -> None:
        self.check_room()
        if flow.key in self._flows:
            raise ValueError(f"duplicate flow {flow.key!r}")
        self._flows[flow.key] = flow

    def remove(self, flow: Flow) -> None:
        """Remove and close flow; harmless if it is already gone."""
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]
            flow.close()

    def detach(self, flow: Flow) -> None:
        """Remove flow without closing it (its resources were handed elsewhere)."""
        if self._flows.get(flow.key) is flow:
            del self._flows[flow.key]

    def close_all(self) -> None:
        for flow in self:
            self.remove(flow)


class IdleFlow(Flow, Protocol):
    last_used: float
    timer: Timer | None


def expire_when_idle(loop: Loop, table: FlowTable, flow: IdleFlow, timeout: float) -> None:
    """Remove flow from table once nothing used it for timeout seconds.

    One timer per flow, re-armed for the remaining time when it fires early,
    rather than a reset on every datagram: traffic costs nothing extra.
    """
    def check() -> None:
        idle = loop.now() - flow.last_used
        if idle >= timeout:
            table.remove(flow)
        else:
            flow.timer = loop.call_later(timeout - idle, check)

    flow.timer = loop.call_later(timeout, check)
