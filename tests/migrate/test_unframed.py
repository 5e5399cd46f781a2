"""Unframed streams (passt's kind): the reader, and telling formats apart by magic."""

from __future__ import annotations

import errno
import tracemalloc
from dataclasses import replace

import pytest

from tests.migrate.golden import FLOW, SEEN, raw_mapped
from tether.handover.format import FORMATS, GUEST_ADDRESSES, TCP_FLOWS, TETHER_FORMAT, UDP_FLOWS
from tether.handover.passt_format import OBSERVED_ADDRESSES, PASST_FORMAT, TRANSFER_FLOWS
from tether.handover.records import GuestAddressesCodec
from tether.migrate.errors import MigrationError
from tether.migrate.stream import Bindings, Format, Stage, save
from tether.migrate.unframed import FormatReader, UnframedParser

# passt's record carries the host side too (tether's own stage leaves it to
# the socket record): a live flow has both.
LIVE = replace(FLOW, tap=replace(FLOW.tap, sides=(
    FLOW.tap.sides[0], (raw_mapped("127.0.0.1"), raw_mapped("127.0.0.1"), 45678, 6000))))


def passt_stream(flows: int = 2) -> bytes:
    sides = Bindings(PASST_FORMAT).bind(OBSERVED_ADDRESSES, save=lambda: SEEN) \
        .bind(TRANSFER_FLOWS, save=lambda: [LIVE] * flows)
    return save(PASST_FORMAT, sides).to_bytes()


def read(data: bytes, chunk: int | None = None, max_size: int = 1 << 30) -> FormatReader:
    reader = FormatReader(tuple(FORMATS.values()), max_size)
    step = chunk or max(len(data), 1)
    for i in range(0, len(data), step):
        reader.feed(data[i:i + step])
    reader.finish()
    return reader


def test_byte_by_byte_reads_as_all_at_once() -> None:
    data = passt_stream()
    whole, drip = read(data), read(data, chunk=1)
    assert whole.format is drip.format is PASST_FORMAT
    assert [r.value for r in whole.records] == [r.value for r in drip.records]
    assert drip.records[1].value == [LIVE, LIVE]


def test_the_magic_picks_the_format() -> None:
    tether = save(TETHER_FORMAT, Bindings(TETHER_FORMAT)
                  .bind(GUEST_ADDRESSES, save=lambda: SEEN).bind(TCP_FLOWS, save=lambda: [])
                  .bind(UDP_FLOWS, save=lambda: [])).to_bytes()
    assert read(tether).format is TETHER_FORMAT
    assert read(passt_stream()).format is PASST_FORMAT
    with pytest.raises(MigrationError) as info:
        read(b"\x00" * 16)
    assert (info.value.errno, info.value.stage, info.value.offset) == (errno.EINVAL, "header", 0)
    assert "tether 0x897465746865720a" in info.value.message and "passt" in info.value.message


def test_every_truncation_names_what_is_missing() -> None:
    data = passt_stream()
    for cut in range(len(data)):
        with pytest.raises(MigrationError) as info:
            read(data[:cut])
        assert info.value.errno == errno.ENODATA, cut
        assert info.value.stage in ("header", "observed addresses", "transfer flows"), cut


def test_max_size_stops_a_stream_before_its_bytes_arrive() -> None:
    data = passt_stream()
    with pytest.raises(MigrationError) as info:
        read(data, max_size=len(data) - 1)
    assert (info.value.errno, info.value.stage) == (errno.EFBIG, "transfer flows")


def test_a_declared_queue_costs_only_the_bytes_that_came() -> None:
    data = bytearray(passt_stream(flows=1))
    ext = 62 + 112
    data[ext + 16:ext + 20] = (60 << 20).to_bytes(4, "big")  # a 60 MiB receive queue, claimed
    parser = UnframedParser(PASST_FORMAT)
    tracemalloc.start()
    try:
        parser.feed(bytes(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    with pytest.raises(MigrationError) as info:
        parser.finish()
    assert info.value.errno == errno.ENODATA


def test_bytes_after_the_last_stage_are_refused() -> None:
    data = passt_stream()
    with pytest.raises(MigrationError) as info:
        read(data + b"x")
    assert (info.value.errno, info.value.stage, info.value.offset) == \
        (errno.EINVAL, "end", len(data))


def test_an_unframed_format_needs_delimiting_codecs() -> None:
    with pytest.raises(ValueError, match="delimiting codec"):
        Format(versions={1: (Stage("x", 1, GuestAddressesCodec()),)}, current=1, compat=1,
               magic=1, framed=False)
