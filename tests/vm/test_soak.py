"""bench/soak_migration.py in CI: ten live migrations back and forth, each
fault kind at least once before one of them, no byte lost or duplicated,
both connections kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .guest import GuestImage, build_tstream

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import soak_migration  # noqa: E402


@pytest.mark.vm
def test_ten_migrations_with_faults(workdir: Path, guest: GuestImage,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    tstream = build_tstream(tmp_path_factory.mktemp("tstream"))
    lines: list[str] = []
    report = soak_migration.soak(workdir, guest, tstream, migrations=10, seed=13,
                                 progress=lines.append)
    summary = report.as_dict()
    print(summary)
    assert report.migrations == 10, (summary, lines)
    assert set(report.faults) == set(soak_migration.FAULTS), summary
    assert report.lost_or_duplicated == 0, summary
    assert report.connections_kept == 2, summary
    assert report.up_bytes > 1 << 20 and report.down_bytes > 1 << 20, summary
