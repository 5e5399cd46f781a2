"""The checked-stream pattern of tstream (tests/vm/tstream.c), host side.

Definition (this module is the reference; tstream.c implements the same):

    key(seed) = (seed + 1) * 0x9E3779B97F4A7C15  mod 2**64
    word(k)   = k XOR key(seed)                   for k = 0, 1, 2, ...
    byte(i)   = byte (i mod 8) of word(i // 8), little-endian

A 64-bit counter masked by a per-seed key: seeds that differ mod 256 differ
at byte 0, and a stream that lost, repeated or reordered data differs from
the pattern in some byte of the first word after the damage, so the first
mismatch is within 8 bytes of where the stream went wrong.

Fast without numpy: a block of consecutive words is computed at once as
one big integer, (COUNTER + k0 * ONES) ^ KEYS, whose 64-bit lanes never
carry into each other; Python's big-int arithmetic is linear C code, so
generating or checking runs at hundreds of MiB/s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

GOLDEN = 0x9E3779B97F4A7C15
MASK64 = (1 << 64) - 1
BLOCK_WORDS = 8192  # 64 KiB per block
BLOCK = BLOCK_WORDS * 8


def key(seed: int) -> int:
    return ((seed + 1) * GOLDEN) & MASK64


def _lanes(value: int, n: int) -> int:
    """`value` repeated in n 64-bit little-endian lanes, as one integer."""
    return int.from_bytes(value.to_bytes(8, "little") * n, "little")


_ONES = _lanes(1, BLOCK_WORDS)
_COUNTER = int.from_bytes(b"".join(j.to_bytes(8, "little") for j in range(BLOCK_WORDS)),
                          "little")


@lru_cache(maxsize=8)
def _keys(seed: int) -> int:
    return _lanes(key(seed), BLOCK_WORDS)


def _block(seed: int, k0: int) -> bytes:
    """The BLOCK bytes of words k0 .. k0 + BLOCK_WORDS - 1."""
    return ((_COUNTER + k0 * _ONES) ^ _keys(seed)).to_bytes(BLOCK, "little")


def byte_at(seed: int, offset: int) -> int:
    """One byte of the pattern, straight from the definition."""
    return (((offset >> 3) ^ key(seed)) >> (8 * (offset & 7))) & 0xFF


def generate(seed: int, offset: int, length: int) -> bytes:
    """The pattern bytes [offset, offset + length)."""
    parts: list[bytes] = []
    pos, end = offset, offset + length
    while pos < end:
        base = pos - pos % BLOCK  # block-aligned, so blocks are whole words
        block = _block(seed, base >> 3)
        take = min(end, base + BLOCK) - pos
        parts.append(block[pos - base: pos - base + take])
        pos += take
    return b"".join(parts)


@dataclass(frozen=True)
class Mismatch:
    offset: int
    expected: int
    found: int

    def __str__(self) -> str:
        return f"offset={self.offset} expected=0x{self.expected:02x} found=0x{self.found:02x}"


def first_mismatch(data: bytes | bytearray | memoryview, seed: int,
                   offset: int = 0) -> Mismatch | None:
    """The first byte of data (at stream offset `offset`) not in the pattern."""
    view = memoryview(data).cast("B")
    pos = 0
    while pos < len(view):
        take = min(len(view) - pos, BLOCK - (offset + pos) % BLOCK)
        expected = generate(seed, offset + pos, take)
        got = view[pos: pos + take]
        if got != expected:
            j = next(j for j in range(take) if got[j] != expected[j])
            return Mismatch(offset + pos + j, expected[j], got[j])
        pos += take
    return None


class Checker:
    """Verify a stream fed in pieces of any size; stops at the first mismatch."""

    def __init__(self, seed: int = 0, offset: int = 0) -> None:
        self.seed = seed
        self.offset = offset  # stream offset of the next byte expected
        self.bad: Mismatch | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Check the next piece; False (and self.bad set) once it went wrong."""
        if self.bad is None:
            self.bad = first_mismatch(data, self.seed, self.offset)
            self.offset = self.bad.offset if self.bad else self.offset + len(data)
        return self.bad is None

    def result(self) -> str:
        """The line tstream prints for the same outcome (without "TSTREAM ")."""
        return f"bad {self.bad}" if self.bad else f"ok bytes={self.offset}"


class Source:
    """The pattern as a sequence of pieces to send, from offset 0."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.offset = 0

    def read(self, n: int) -> bytes:
        data = generate(self.seed, self.offset, n)
        self.offset += n
        return data


_RESULT = re.compile(r"TSTREAM (sent|ok|bad|error|listening|progress|rr|echoed)\b(.*)")


def parse_result(text: str) -> dict[str, str]:
    """The last TSTREAM line in text, as {"result": "ok", "bytes": "123", ...}.

    The words after the result are key=value pairs; `error` lines carry the
    kind first ("error reset after=N" gives {"result": "error", "kind":
    "reset", "after": "N"}).
    """
    matches = list(_RESULT.finditer(text))
    if not matches:
        raise ValueError(f"no TSTREAM result in: {text[-500:]!r}")
    what, rest = matches[-1].groups()
    fields = {"result": what}
    for word in rest.split():
        if word.startswith("="):  # "sent=N"
            fields["bytes"] = word[1:]
        elif "=" in word:
            name, value = word.split("=", 1)
            fields[name] = value
        else:
            fields["kind"] = word
    return fields
