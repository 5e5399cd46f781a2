"""Device states captured from the real passt (tests/vm/capture_passt_state.py):
tether reads them as passt wrote them, writes them back byte for byte, and
refuses every truncation and corruption of them cleanly."""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import pytest

from tether.handover.format import FORMATS
from tether.handover.passt_format import OBSERVED_ADDRESSES, PASST_FORMAT, TRANSFER_FLOWS
from tether.migrate.errors import MigrationError
from tether.migrate.stream import Bindings, Loaded, save
from tether.migrate.unframed import FormatReader
from tether.repair.kernel import TcpState

DIRECTORY = Path(__file__).resolve().parent.parent / "data" / "migration" / "passt"
CAPTURES = sorted(p.stem for p in DIRECTORY.glob("*.bin"))


def read(data: bytes) -> Loaded:
    reader = FormatReader(tuple(FORMATS.values()))
    reader.feed(data)
    loaded = reader.finish()
    assert reader.format is PASST_FORMAT
    return loaded


def test_the_captures_are_there() -> None:
    assert CAPTURES == ["streams-and-half-closed", "two-streams"]


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_reads_as_what_passt_held(name: str) -> None:
    summary = json.loads((DIRECTORY / f"{name}.json").read_text())
    data = (DIRECTORY / f"{name}.bin").read_bytes()
    loaded = read(data)
    assert loaded.size == summary["size"] == len(data)
    sent = loaded.value(TRANSFER_FLOWS)
    flows = list(sent)
    assert len(flows) == summary["flows"]
    assert loaded.value(OBSERVED_ADDRESSES).ipv4 == bytes([10, 200, 0, 2])
    states = {f.socket.state for f in flows}
    if summary["half_closed"]:
        # The host's FIN with data still queued for the guest, and the guest's FIN.
        assert TcpState.CLOSE_WAIT in states and states & {TcpState.FIN_WAIT1,
                                                           TcpState.FIN_WAIT2}
        assert any(f.socket.state is TcpState.CLOSE_WAIT and f.socket.recv_queue
                   for f in flows)
        closing = next(f for f in flows if f.socket.state is TcpState.CLOSE_WAIT)
        # The kernel acknowledged the host's FIN, one sequence number past the
        # queued data: tether's restore puts the queue back and then counts the FIN.
        st = closing.socket
        assert (st.rcv_seq + len(st.recv_queue) + 1) & 0xFFFFFFFF == st.rcv_wup
    else:
        assert states == {TcpState.ESTABLISHED}


@pytest.mark.parametrize("name", CAPTURES)
def test_capture_is_written_back_byte_for_byte(name: str) -> None:
    data = (DIRECTORY / f"{name}.bin").read_bytes()
    loaded = read(data)
    sides = Bindings(PASST_FORMAT) \
        .bind(OBSERVED_ADDRESSES, save=lambda: loaded.value(OBSERVED_ADDRESSES)) \
        .bind(TRANSFER_FLOWS, save=lambda: loaded.value(TRANSFER_FLOWS))
    assert save(PASST_FORMAT, sides).to_bytes() == data


@pytest.mark.parametrize("name", CAPTURES)
def test_every_truncation_is_refused_cleanly(name: str) -> None:
    data = (DIRECTORY / f"{name}.bin").read_bytes()
    # Every cut in the header and the records, and a spread through the queues.
    cuts = sorted(set(range(min(len(data), 1024))) | set(range(1024, len(data), 97)))
    for cut in cuts:
        with pytest.raises(MigrationError) as info:
            read(data[:cut])
        assert info.value.errno in (errno.ENODATA, errno.EINVAL), (cut, info.value)
        assert info.value.stage, cut


@pytest.mark.parametrize("name", CAPTURES)
def test_corruptions_are_refused_or_read_never_crash(name: str) -> None:
    data = (DIRECTORY / f"{name}.bin").read_bytes()
    rng = random.Random(name)
    refused = 0
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(min(len(damaged), 2048))] ^= 1 << rng.randrange(8)
        try:
            read(bytes(damaged))
        except MigrationError as exc:
            refused += 1
            assert exc.stage and exc.offset is not None
    assert refused > 0


def test_trailing_bytes_are_refused_at_their_offset() -> None:
    data = (DIRECTORY / "two-streams.bin").read_bytes()
    with pytest.raises(MigrationError) as info:
        read(data + b"\0")
    assert (info.value.errno, info.value.offset) == (errno.EINVAL, len(data))


def test_a_count_beyond_passts_table_is_refused_before_its_flows_arrive() -> None:
    data = bytearray((DIRECTORY / "two-streams.bin").read_bytes())
    data[58:62] = (1 << 17).to_bytes(4, "big")
    with pytest.raises(MigrationError) as info:
        read(bytes(data[:62]))
    assert (info.value.errno, info.value.stage, info.value.offset) == \
        (errno.EINVAL, "transfer flows", 58)


def test_a_queue_length_beyond_64_mib_is_refused_before_its_bytes_arrive() -> None:
    data = bytearray((DIRECTORY / "two-streams.bin").read_bytes())
    ext = 62 + 2 * 112  # the first socket record
    data[ext + 16:ext + 20] = ((64 << 20) + 1).to_bytes(4, "big")  # rcvq
    with pytest.raises(MigrationError) as info:
        read(bytes(data[:ext + 52]))
    assert (info.value.errno, info.value.stage) == (errno.EINVAL, "transfer flows")
    assert "queues of at most" in info.value.message
