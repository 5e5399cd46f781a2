"""The TCP state record's binary encoding: round trip and strict decoding."""

from __future__ import annotations

import contextlib
import socket
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.repair.kernel import MIGRATABLE, TcpState
from tether.repair.record import FIXED_SIZE, RecordError, TcpConnState, decode

u32 = st.integers(0, 2**32 - 1)
port = st.integers(1, 65535)


def _usable(a: IPv4Address | IPv6Address) -> bool:
    if isinstance(a, IPv6Address) and a.ipv4_mapped is not None:
        return False
    return not (a.is_unspecified or a.is_multicast or a == IPv4Address("255.255.255.255"))


@st.composite
def records(draw: st.DrawFn) -> TcpConnState:
    v6 = draw(st.booleans())
    addr: st.SearchStrategy[IPv4Address | IPv6Address]
    addr = st.ip_addresses(v=6 if v6 else 4).filter(_usable)
    wscale = draw(st.booleans())
    send_queue = draw(st.binary(max_size=300))
    snd_wnd = draw(u32)
    return TcpConnState(
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        local=(str(draw(addr)), draw(port)),
        remote=(str(draw(addr)), draw(port)),
        state=draw(st.sampled_from(sorted(MIGRATABLE))),
        options=draw(st.integers(0, 3)) | (4 if wscale else 0),
        snd_wscale=draw(st.integers(0, 14)) if wscale else 0,
        rcv_wscale=draw(st.integers(0, 14)) if wscale else 0,
        mss=draw(st.integers(1, 65535)),
        timestamp=draw(u32),
        snd_seq=draw(u32),
        rcv_seq=draw(u32),
        snd_wl1=draw(u32),
        snd_wnd=snd_wnd,
        max_window=draw(st.integers(snd_wnd, 2**32 - 1)),
        rcv_wnd=draw(u32),
        rcv_wup=draw(u32),
        send_queue=send_queue,
        unsent_len=draw(st.integers(0, len(send_queue))),
        recv_queue=draw(st.binary(max_size=300)),
    )


@given(records(), st.binary(max_size=8))
def test_round_trip(record: TcpConnState, trailer: bytes) -> None:
    data = record.encode() + trailer
    assert len(data) == FIXED_SIZE + len(record.send_queue) + len(record.recv_queue) + len(trailer)
    back, end = decode(data)
    assert back == record
    assert end == len(data) - len(trailer)


@given(records(), st.data())
def test_truncation_is_always_detected(record: TcpConnState, data: st.DataObject) -> None:
    raw = record.encode()
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(RecordError):
        decode(raw[:cut])


@given(st.binary(max_size=FIXED_SIZE + 40))
def test_garbage_raises_only_record_error(raw: bytes) -> None:
    with contextlib.suppress(RecordError):
        decode(raw)


def test_fixed_part_is_within_passts_budget() -> None:
    passt_fixed = 112 + 52  # tcp_tap_transfer + tcp_tap_transfer_ext
    assert FIXED_SIZE == 88
    assert passt_fixed >= FIXED_SIZE


def _sample() -> bytearray:
    rec = TcpConnState(
        family=socket.AF_INET, local=("10.0.0.1", 1000), remote=("10.0.0.2", 2000),
        state=TcpState.ESTABLISHED, options=7, snd_wscale=7, rcv_wscale=7, mss=1460,
        timestamp=1, snd_seq=2, rcv_seq=3, snd_wl1=4, snd_wnd=5, max_window=6, rcv_wnd=7,
        rcv_wup=8, send_queue=b"abc", unsent_len=1, recv_queue=b"de",
    )
    return bytearray(rec.encode())


def test_known_layout() -> None:
    raw = _sample()
    assert raw[:6] == bytes([1, 4, 1, 7, 7, 7])
    assert struct.unpack_from("!HHH", raw, 6) == (1460, 1000, 2000)
    assert raw[12:28] == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    assert struct.unpack_from("!11I", raw, 44) == (2, 3, 2, 1, 2, 1, 4, 5, 6, 7, 8)
    assert raw[FIXED_SIZE:] == b"abcde"


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 2, "version 2"),
        (1, 5, "family 5"),
        (2, 6, "TCP state 6"),  # TIME_WAIT
        (2, 10, "TCP state 10"),  # LISTEN
        (3, 0x17, "unknown option bits"),
        (4, 15, "window scale"),
        (12, 0x20, "not IPv4-mapped"),
        (24, 224, "cannot be a connection endpoint"),  # 224.0.0.1
    ],
)
def test_bad_fields_are_named(offset: int, value: int, message: str) -> None:
    raw = _sample()
    raw[offset] = value
    with pytest.raises(RecordError, match=message) as info:
        decode(raw)
    field_start = 12 if 12 <= offset < 28 else offset  # addresses: the field's offset
    assert info.value.offset == field_start


def test_oversized_queue_is_refused_before_reading_it() -> None:
    raw = _sample()
    struct.pack_into("!I", raw, 60, 1 << 30)
    with pytest.raises(RecordError, match="receive queue"):
        decode(raw)
