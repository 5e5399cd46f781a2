"""tether-state as a user runs it: a real process, files and pipes, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.migrate.golden import DIRECTORY

EXPECTED = json.loads((DIRECTORY / "expected.json").read_text())


def tether_state(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tether.handover.state_cli", *args],
                          input=stdin.decode("latin-1") if stdin is not None else None,
                          capture_output=True, text=True, encoding="latin-1", timeout=60,
                          check=False)


def test_check_valid_file() -> None:
    result = tether_state("check", str(DIRECTORY / "guest-addresses.valid.bin"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("valid: tether stream, version 1")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_check_invalid_file_is_one_precise_line(name: str) -> None:
    result = tether_state("check", str(DIRECTORY / name))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    want = EXPECTED[name]
    assert f"[{want['errno']}]" in lines[0]
    assert f"stage {want['stage']!r}" in lines[0]
    assert f"offset {want['offset']}" in lines[0]
    assert "Traceback" not in result.stderr


def test_check_reads_standard_input() -> None:
    data = (DIRECTORY / "guest-addresses.valid.bin").read_bytes()
    assert tether_state("check", "-", stdin=data).returncode == 0
    assert tether_state("check", "-", stdin=data[:-1]).returncode == 1


def test_inspect_text_names_every_stage_with_offsets_and_fields() -> None:
    result = tether_state("inspect", str(DIRECTORY / "guest-addresses.valid.bin"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "version 1, compat_version 1; read as version 1" in out
    assert "offset 16, 16+42 bytes: guest addresses" in out
    assert "mac: 52:54:00:12:34:56" in out
    assert "ipv4: 10.200.0.2" in out
    assert "ipv6: fd00:200::2" in out
    assert "ipv6_link_local: fe80::5054:ff:fe12:3456" in out
    assert "offset 74, 16+4 bytes: tcp flows" in out
    assert "offset 94, 16+4 bytes: udp flows" in out
    assert "stream is 130 bytes, valid" in out


def test_inspect_json_and_skipped_stages() -> None:
    result = tether_state("inspect", "--json", str(DIRECTORY / "future-optional-stage.valid.bin"))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["valid"], doc["version"], doc["compat_version"], doc["read_as_version"]) == \
        (True, 2, 1, 1)
    assert [(r["stage"], r["offset"], r["payload_size"], r["optional"]) for r in doc["records"]] \
        == [("guest addresses", 16, 42, False), ("tcp flows", 74, 4, False),
            ("udp flows", 94, 4, False), (None, 114, 4, True)]
    assert doc["records"][0]["fields"]["mac"] == "52:54:00:12:34:56"
    assert doc["size"] == 150


def test_inspect_decodes_a_tcp_flow() -> None:
    result = tether_state("inspect", "--json", str(DIRECTORY / "one-tcp-flow.valid.bin"))
    assert result.returncode == 0, result.stderr
    flows = json.loads(result.stdout)["records"][1]["fields"]
    assert len(flows) == 1
    assert flows[0]["socket"]["local"] == ["127.0.0.1", 45678]
    assert bytes.fromhex(flows[0]["socket"]["recv_queue"]).startswith(b"in flight")
    assert flows[0]["tap"]["seq_to_tap"] == 0x10000010
    text = tether_state("inspect", str(DIRECTORY / "one-tcp-flow.valid.bin")).stdout
    assert "[0].socket.unsent_len: 10" in text


def test_inspect_decodes_a_udp_flow() -> None:
    result = tether_state("inspect", "--json", str(DIRECTORY / "tcp-and-udp-flows.valid.bin"))
    assert result.returncode == 0, result.stderr
    udp = json.loads(result.stdout)["records"][2]["fields"]
    assert udp == [{"inbound": False, "guest_addr": "0ac80002", "guest_port": 5353,
                    "remote_addr": "0ac80001", "remote_port": 53, "local": ["0.0.0.0", 40001],
                    "peer": ["127.0.0.1", 53]}]


def test_inspect_invalid_shows_what_was_read_and_the_error() -> None:
    result = tether_state("inspect", "--json", str(DIRECTORY / "trailing-bytes.invalid.bin"))
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["valid"] is False
    assert [r["stage"] for r in doc["records"]] == ["guest addresses", "tcp flows",
                                                     "udp flows"]
    assert doc["error"]["name"] == "EINVAL"
    assert doc["error"]["offset"] == 130


def test_missing_file_and_bad_usage(tmp_path: Path) -> None:
    result = tether_state("check", str(tmp_path / "absent"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr
    assert tether_state("frobnicate").returncode == 2
    assert tether_state("check", str(tmp_path)).returncode == 2  # a directory


def test_size_limit_option() -> None:
    result = tether_state("--max-size", "50", "check",
                          str(DIRECTORY / "guest-addresses.valid.bin"))
    assert result.returncode == 1
    assert "[EFBIG]" in result.stderr
