"""The one exception type of the migration stream.

vhost-user's CHECK_DEVICE_STATE reports a single number to QEMU, so every
failure carries an errno code; people read the message, so it also says where
in the stream (stage, byte offset) and what was expected against what was found.
"""

from __future__ import annotations

import errno as errno_codes


class MigrationError(Exception):
    """A migration failed; nothing was applied on a target, everything undone on a source."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        stage: str | None = None,
        offset: int | None = None,
    ) -> None:
        super().__init__(message)
        self.errno = code
        self.message = message
        self.stage = stage
        self.offset = offset

    def located(self, stage: str | None, offset: int | None) -> MigrationError:
        """Fill in the stage and offset where the raiser did not know them."""
        if self.stage is None:
            self.stage = stage
        if self.offset is None:
            self.offset = offset
        return self

    @property
    def errno_name(self) -> str:
        return errno_codes.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        where = []
        if self.stage is not None:
            where.append(f"stage {self.stage!r}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        prefix = f"{', '.join(where)}: " if where else ""
        return f"{prefix}{self.message} [{self.errno_name}]"
