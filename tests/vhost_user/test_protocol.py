"""protocol.py: framing and payload parsing, sans-IO."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tether.transport.vhost_user import protocol as p

messages = st.lists(st.tuples(st.integers(1, 43), st.sampled_from([0x1, 0x9]),
                              st.binary(max_size=300)), min_size=1, max_size=8)


@given(messages=messages, cuts=st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_reader_reassembles_messages_from_any_chunking(
        messages: list[tuple[int, int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(p.encode_request(r, data, flags) for r, flags, data in messages)
    reader = p.MessageReader()
    got = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = min(reader.wanted(), cuts[i % len(cuts)])
        i += 1
        message = reader.feed(stream[pos:pos + n], [])
        pos += n
        if message is not None:
            got.append((message.request, message.flags, message.payload))
    assert got == messages


@pytest.mark.parametrize("header, error", [
    (p.HEADER.pack(1, 0x2, 0), "bad version"),
    (p.HEADER.pack(1, 0x5, 0), "reply flag"),
    (p.HEADER.pack(5, 0x1, p.MAX_PAYLOAD + 1), "exceeds"),
])
def test_reader_rejects_bad_headers_by_name(header: bytes, error: str) -> None:
    with pytest.raises(p.ProtocolError, match=error):
        p.MessageReader().feed(header, [])


@given(payload=st.binary(max_size=64))
def test_fixed_size_parsers_accept_only_their_size(payload: bytes) -> None:
    for parse, size in ((p.parse_u64, 8), (p.parse_vring_state, 8),
                        (p.parse_vring_addr, 40), (p.parse_log_params, 16),
                        (p.parse_transfer_params, 8)):
        message = p.Message(p.Request.SET_VRING_NUM, 1, payload)
        if len(payload) == size:
            parse(message)
        else:
            with pytest.raises(p.ProtocolError, match=f"expected {size}"):
                parse(message)


def test_reply_flags_are_exactly_0x5() -> None:
    request, flags, size = p.HEADER.unpack_from(p.encode_u64_reply(42, 0x100))
    assert (request, flags, size) == (42, 0x5, 8)
