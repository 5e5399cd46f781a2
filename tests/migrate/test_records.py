"""Payload codecs of tether's stages: what they accept and what they refuse."""

from __future__ import annotations

import errno

import pytest

from tether.handover.records import GuestAddresses, GuestAddressesCodec
from tether.migrate.errors import MigrationError
from tether.migrate.records import FixedRecords


def payload(codec_output: object) -> memoryview:
    assert isinstance(codec_output, list)
    return memoryview(b"".join(bytes(c) for c in codec_output))


def test_fixed_records_round_trip_and_table_access() -> None:
    codec = FixedRecords(">IH", "pairs")
    records = [(i, i & 0xFFFF) for i in range(1000)]
    table = codec.decode(payload(codec.encode(records)))
    assert len(table) == 1000
    assert table == records
    assert table[0] == (0, 0) and table[-1] == (999, 999)
    assert table[10:13] == [(10, 10), (11, 11), (12, 12)]
    with pytest.raises(IndexError):
        table[1000]
    assert codec.decode(payload(codec.encode([]))) == []


@pytest.mark.parametrize("data", [b"", b"\0\0\0", b"\0\0\0\x02" + bytes(6 * 2 - 1),
                                  b"\0\0\0\x01" + bytes(7), b"\xff\xff\xff\xff"])
def test_fixed_records_count_must_match_size(data: bytes) -> None:
    with pytest.raises(MigrationError) as info:
        FixedRecords(">IH", "pairs").decode(memoryview(data))
    assert info.value.errno == errno.EINVAL
    assert "pairs" in info.value.message


def test_guest_addresses_round_trip() -> None:
    codec = GuestAddressesCodec()
    seen = GuestAddresses(bytes.fromhex("525400abcdef"), bytes([192, 168, 1, 2]),
                          bytes.fromhex("20010db8" + "00" * 11 + "01"),
                          bytes.fromhex("fe80" + "00" * 13 + "01"))
    assert codec.decode(payload(codec.encode(seen))) == seen


@pytest.mark.parametrize(("field", "value", "offset"), [
    ("mac", bytes.fromhex("ffffffffffff"), 0),
    ("ipv4", bytes([224, 0, 0, 1]), 6),
    ("ipv4", bytes([255, 255, 255, 255]), 6),
    ("ipv6", bytes.fromhex("ff02" + "00" * 13 + "01"), 10),
    ("ipv6", bytes.fromhex("fe80" + "00" * 13 + "01"), 10),
    ("ipv6_link_local", bytes.fromhex("20010db8" + "00" * 11 + "01"), 26),
])
def test_guest_addresses_refuse_what_a_guest_cannot_own(field: str, value: bytes,
                                                        offset: int) -> None:
    raw = bytearray(payload(GuestAddressesCodec().encode(GuestAddresses())))
    raw[offset:offset + len(value)] = value
    with pytest.raises(MigrationError) as info:
        GuestAddressesCodec().decode(memoryview(bytes(raw)))
    assert (info.value.errno, info.value.offset) == (errno.EINVAL, offset), field


def test_guest_addresses_size_is_exact() -> None:
    for size in (0, 41, 43):
        with pytest.raises(MigrationError) as info:
            GuestAddressesCodec().decode(memoryview(bytes(size)))
        assert info.value.errno == errno.EINVAL
