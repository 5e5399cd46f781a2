"""What the translators (tcp, udp, icmp) use of the stack, as a narrow interface.

net/stack.py builds the translators and provides this; the translators know
nothing else of it, so they sit below the stack and import no module above
them.  `Stack` satisfies `NetContext` by its shape.
"""

from __future__ import annotations

import socket
from typing import Protocol

from tether.loop import Loop
from tether.net.flows import FlowTable
from tether.net.output import Output
from tether.net.params import NetParams


class RoomWaiter(Protocol):
    """A flow that stopped sending because the guest's queue was full."""

    def room_available(self) -> None:
        """The guest's queue has room again: carry on sending."""
        ...


class NetContext(Protocol):
    loop: Loop
    params: NetParams
    flows: FlowTable
    output: Output

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Queue a frame for the guest (copied before this returns)."""
        ...

    def has_room(self) -> bool:
        """Whether the guest's queue takes another frame now."""
        ...

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        """Room in the guest's own buffers for payloads received in place
        (frames.InPlaceSink.claim); 0 where the transport has none."""
        ...

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        """Queue the next claimed frame (frames.InPlaceSink.commit)."""
        ...

    def wait_for_room(self, waiter: RoomWaiter) -> None:
        """Call waiter.room_available() once the guest's queue has room."""
        ...

    def forget_waiting(self) -> None:
        """Drop every waiter (their flows were handed elsewhere)."""
        ...

    def host_target(self, dst: bytes, port: int) -> str | None:
        """The host address a guest destination maps to, None for nowhere."""
        ...

    def outbound_socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A host socket for a guest-initiated flow, bound as the options say."""
        ...

    def guest_view_of(self, host_addr: str) -> bytes:
        """How a host peer's address looks to the guest."""
        ...

    def guest_addr_for(self, family: int, remote: bytes = b"") -> bytes | None:
        """Where inbound traffic from remote (as the guest sees it) goes."""
        ...
