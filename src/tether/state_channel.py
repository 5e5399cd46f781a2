"""The seam between a transport's device-state channel and the migration code.

vhost-user's SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (vhost-user.rst,
"Migrating back-end state") carry an opaque blob: the transport moves bytes
and ring events, the handover decides what the bytes mean.  Neither imports
the other: the transport is given a `DeviceStateHandler`, and refusals come
back as `DeviceStateError`, whose errno is what CHECK_DEVICE_STATE answers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Protocol


class DeviceStateError(Exception):
    """Saving or loading device state failed; `errno` goes to CHECK_DEVICE_STATE."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class StateSink(Protocol):
    """Target: where the bytes of one incoming device state go, as they arrive."""

    def feed(self, data: bytes) -> None:
        """More bytes; raise DeviceStateError to stop the transfer at once
        (a bad magic, bad framing, over the size limit)."""
        ...

    def finish(self) -> None:
        """End of file: validate and keep the state (guest memory is not mapped
        yet).  Raise DeviceStateError to fail the migration; nothing may be applied."""
        ...


class DeviceStateHandler(Protocol):
    """What the device needs from the migration stream (wired by the integrator)."""

    def save_state(self) -> bytes:
        """Source: the state to send, called once the rings are stopped."""
        ...

    def begin_load(self) -> StateSink:
        """Target: a SET_DEVICE_STATE_FD(LOAD) arrived; the sink takes its bytes."""
        ...

    def rings_started(self) -> None:
        """Both rings started: the target applies loaded state here; on the
        source this after a save means QEMU resumed us (the migration failed)."""
        ...

    def rings_stopped(self) -> None:
        """All rings stopped (GET_VRING_BASE): the device is suspended."""
        ...

    def front_end_gone(self) -> None:
        """QEMU disconnected: on a source after a save, the migration succeeded."""
        ...


class BufferedSink:
    """A StateSink for small states: collects up to `limit` bytes, then hands
    them whole to `load` (which raises DeviceStateError to refuse them)."""

    def __init__(self, load: Callable[[bytes], None], limit: int) -> None:
        self._load = load
        self._limit = limit
        self._data = bytearray()

    def feed(self, data: bytes) -> None:
        if len(self._data) + len(data) > self._limit:
            raise DeviceStateError(errno.EFBIG, f"device state over {self._limit} bytes")
        self._data += data

    def finish(self) -> None:
        self._load(bytes(self._data))
