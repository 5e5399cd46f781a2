"""The seam between transports (tap, stream, vhost-user) and the network stack.

A transport moves Ethernet frames; the stack decides what they mean.  Neither
imports the other: a transport is given a `GuestPort` (the stack's side) and
the stack is given a `FrameSink` (the transport's side).  Frames carry no
virtio-net header or length prefix here: that framing belongs to the transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class FrameSink(Protocol):
    """Frames towards the guest."""

    def send_frame(self, frame: bytes | bytearray | memoryview) -> bool:
        """Queue one frame for the guest, copied before this returns: the
        caller may reuse its buffer at once.

        Returns False, having dropped the frame, when the guest has no room;
        callers that must not lose data (TCP) check `has_room()` first and
        wait for `GuestPort.guest_room_available()`.
        """
        ...

    def has_room(self) -> bool:
        """Whether at least one more full-sized frame fits right now."""
        ...

    def flush(self) -> None:
        """Make queued frames visible and notify the guest once.

        The stack calls it at the end of every loop pass in which it queued
        a frame (`Stack.send`), so a frame never waits for an unrelated event.
        """
        ...


class GuestPort(Protocol):
    """Frames from the guest, and flow-control news, delivered by a transport."""

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        """A batch of frames.  The views are valid only during the call."""
        ...

    def guest_room_available(self) -> None:
        """The guest made room (posted receive buffers) after has_room() was False."""
        ...
