"""The seam between transports (tap, stream, vhost-user) and the network stack.

A transport moves Ethernet frames; the stack decides what they mean.  Neither
imports the other: a transport is given a `GuestPort` (the stack's side) and
the stack is given a `FrameSink` (the transport's side).  Frames carry no
virtio-net header or length prefix here: that framing belongs to the transport.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast


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


class InPlaceSink(Protocol):
    """What a FrameSink may add: receive buffers a socket can fill directly.

    Bulk TCP towards the guest is mostly copying: peeked from the socket
    into a frame, then the frame into the guest's buffers.  A transport that
    offers this (vhost-user) lets the stack peek several frames' payloads
    straight into guest memory with one recvmsg, then write only the
    headers.  Optional: the stack looks for the two methods at attach()
    (`in_place_of`; no runtime_checkable: mypyc's protocols refuse it).
    """

    def claim(self, headroom: int, payload_max: int, total: int,
              views: list[memoryview]) -> int:
        """Plan frames of `headroom` header bytes and up to `payload_max`
        payload bytes each, `total` payload bytes at most: append to `views`
        where their payloads go, in order, and return how many bytes they
        hold (0: none, send frames with send_frame).  Frame k holds payload
        bytes k * payload_max onwards.  Nothing is consumed until commit();
        the views are valid only until the caller returns to the loop, and
        the caller drops them first.  A send_frame() in between voids the
        claim.
        """
        ...

    def commit(self, headers: memoryview, payload_len: int) -> bool:
        """Queue the next claimed frame: `headers` (headroom bytes) in front
        of the `payload_len` bytes received into its views.  A frame that
        holds less than its claim is the last one committed.  False: the
        claim no longer stands and nothing was queued."""
        ...


def in_place_of(sink: FrameSink) -> InPlaceSink | None:
    """The sink as an InPlaceSink, if it is one."""
    if callable(getattr(sink, "claim", None)) and callable(getattr(sink, "commit", None)):
        return cast("InPlaceSink", sink)
    return None


class GuestPort(Protocol):
    """Frames from the guest, and flow-control news, delivered by a transport."""

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        """A batch of frames.  The views are valid only during the call."""
        ...

    def guest_room_available(self) -> None:
        """The guest made room (posted receive buffers) after has_room() was False."""
        ...


class LatePort:
    """A GuestPort bound late: a transport needs its port before the stack's
    wrappers (pcap) exist.  Here, in a compiled module, and not in cli.py:
    every batch of guest frames passes through it, and an interpreted
    method cost a bytecode frame per batch."""

    def __init__(self) -> None:
        self.target: GuestPort | None = None

    def frames_from_guest(self, frames: Sequence[memoryview]) -> None:
        if self.target is not None:
            self.target.frames_from_guest(frames)

    def guest_room_available(self) -> None:
        if self.target is not None:
            self.target.guest_room_available()
