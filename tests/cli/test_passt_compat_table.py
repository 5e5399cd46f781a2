"""docs/passt-compatibility.md and the parser say the same thing, row by row."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tether.config import REFUSED, build_parser

TABLE = Path(__file__).parents[2] / "docs" / "passt-compatibility.md"
_ROW = re.compile(r"^\| (`-[^|]*`) \| (supported|differs|not|[a-z][^|]*) \|")


def _rows() -> dict[str, str]:
    """option string -> status ('own' for tether's own options)."""
    out: dict[str, str] = {}
    for line in TABLE.read_text().splitlines():
        m = _ROW.match(line)
        if m is None:
            continue
        status = m.group(2) if m.group(2) in ("supported", "differs", "not") else "own"
        for name in re.findall(r"`(-[^`]+)`", m.group(1)):
            assert name not in out, f"{name} has two rows"
            out[name] = status
    return out


def _parser_options() -> dict[str, argparse.Action]:
    return dict(build_parser()._option_string_actions)


def test_every_parser_option_has_a_row_and_every_row_an_option() -> None:
    rows = _rows()
    options = _parser_options()
    assert sorted(set(options) - set(rows)) == [], "options missing from the table"
    assert sorted(set(rows) - set(options)) == [], "table rows the parser does not know"


def test_refused_rows_are_exactly_the_refused_options() -> None:
    refused = {name for names in REFUSED for name in names}
    assert {n for n, status in _rows().items() if status == "not"} == refused


@pytest.mark.parametrize("names,nargs", [(n, a) for n, (a, _) in REFUSED.items()],
                         ids=[n[-1] for n in REFUSED])
def test_a_refused_option_is_one_line_naming_it_and_exit_1(names: tuple[str, ...],
                                                           nargs: int) -> None:
    for name in names:
        argv = [name, *(["x"] * nargs), "--socket", "/nonexistent/s"]
        done = subprocess.run([sys.executable, "-m", "tether.cli", *argv],
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 1
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and name in lines[0] and "not supported" in lines[0], lines
        assert done.stdout == ""


def test_supported_rows_parse() -> None:
    options = _parser_options()
    for name, status in _rows().items():
        if status in ("supported", "differs"):
            assert options[name].__class__.__name__ != "_Refused", name
