"""Golden streams: the encoder's output is stable, and the reader's verdicts too."""

from __future__ import annotations

import errno
import json

import pytest

from tests.migrate.golden import DIRECTORY, SEEN, streams
from tether.handover.format import FORMATS, GUEST_ADDRESSES, TETHER_FORMAT
from tether.migrate.errors import MigrationError
from tether.migrate.stream import Loaded, parse
from tether.migrate.unframed import FormatReader

EXPECTED = json.loads((DIRECTORY / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(streams()))
def test_encoder_reproduces_the_golden_file(name: str) -> None:
    assert (DIRECTORY / name).read_bytes() == streams()[name], \
        f"{name}: the encoder's output changed; if on purpose, follow " \
        "docs/migration-format.md section 5.3 and regenerate with python -m tests.migrate.golden"


def test_every_file_on_disk_is_covered() -> None:
    on_disk = {p.name for p in DIRECTORY.glob("*.bin")}
    assert on_disk == set(streams())
    assert {n for n in on_disk if n.endswith(".invalid.bin")} == set(EXPECTED)


def read_as_a_target_does(data: bytes) -> tuple[str, Loaded]:
    reader = FormatReader(tuple(FORMATS.values()))
    reader.feed(data)
    loaded = reader.finish()
    assert reader.format is not None
    return reader.format.name, loaded


@pytest.mark.parametrize("name", sorted(n for n in streams() if n.endswith(".valid.bin")))
def test_valid_files_parse(name: str) -> None:
    fmt, loaded = read_as_a_target_does((DIRECTORY / name).read_bytes())
    assert (fmt, loaded.chosen) == (("passt", 2) if name.startswith("passt") else ("tether", 1))


def test_golden_addresses_decode_to_what_was_encoded() -> None:
    loaded = parse(TETHER_FORMAT, (DIRECTORY / "guest-addresses.valid.bin").read_bytes())
    assert loaded.value(GUEST_ADDRESSES) == SEEN


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_invalid_files_fail_as_recorded(name: str) -> None:
    with pytest.raises(MigrationError) as info:
        read_as_a_target_does((DIRECTORY / name).read_bytes())
    want = EXPECTED[name]
    assert (errno.errorcode[info.value.errno], info.value.stage, info.value.offset) == \
        (want["errno"], want["stage"], want["offset"])
