"""Small stage tables used by the stream tests, with codecs simple enough to trust."""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.migrate.errors import MigrationError
from tether.migrate.stream import Bindings, Buffer, Format, Stage


class BlobCodec:
    """Payload is the value itself."""

    def encode(self, value: bytes) -> Sequence[Buffer]:
        return [value]

    def decode(self, payload: memoryview) -> bytes:
        return bytes(payload)


class U32Codec:
    def encode(self, value: int) -> Sequence[Buffer]:
        return [struct.pack(">I", value)]

    def decode(self, payload: memoryview) -> int:
        if payload.nbytes != 4:
            raise MigrationError(errno.EINVAL, f"expected 4 bytes, found {payload.nbytes}",
                                 offset=0)
        return int(struct.unpack(">I", payload)[0])


ALPHA = Stage("alpha", 1, U32Codec())
PREPARE: Stage[None] = Stage("prepare", 2)
BLOB = Stage("blob", 3, BlobCodec())
EXTRA = Stage("extra", 4, U32Codec(), optional=True)

THREE_STAGES = Format(versions={1: (ALPHA, PREPARE, BLOB, EXTRA)}, current=1, compat=1)


@dataclass
class LiveState:
    """Stands for a subsystem's live state, recording what the runner did to it."""

    values: dict[str, Any] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def sides(self, fmt: Format, fail_save: str | None = None,
              fail_apply: str | None = None) -> Bindings:
        out = Bindings(fmt)
        for stage in fmt.versions[fmt.current]:
            self._bind(out, stage, fail_save, fail_apply)
        return out

    def _bind(self, bindings: Bindings, stage: Stage[Any], fail_save: str | None,
              fail_apply: str | None) -> None:
        name = stage.name

        def save() -> Any:
            if name == fail_save:
                raise OSError(errno.EBUSY, "refused by test")
            self.log.append(f"save {name}")
            return self.values.get(name)

        def undo() -> None:
            self.log.append(f"undo {name}")

        def apply(value: Any) -> Any:
            if name == fail_apply:
                raise OSError(errno.EEXIST, "refused by test")
            previous = self.values.get(name)
            self.values[name] = value
            self.log.append(f"apply {name}")

            def revert() -> None:
                self.values[name] = previous
                self.log.append(f"revert {name}")
            return revert

        bindings.bind(stage, save=save, undo=undo, apply=apply)
