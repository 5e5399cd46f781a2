"""Byte layouts of the protocols tether speaks with the guest, and their checksums.

Every parser here is strict and total: given any bytes it returns a value or
raises `ParseError`, nothing else.  Builders write into caller-owned buffers
(`pack_into`) so the hot path allocates no header objects of its own.
"""

from __future__ import annotations


class ParseError(ValueError):
    """A frame that is malformed, truncated, or of a kind tether does not handle."""
