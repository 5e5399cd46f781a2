"""The command line of examples/vhost_user_responder.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESPONDER = Path(__file__).resolve().parents[2] / "examples" / "vhost_user_responder.py"


def test_print_capabilities_says_net() -> None:
    out = subprocess.run(
        [sys.executable, str(RESPONDER), "--print-capabilities"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    assert json.loads(out) == {"type": "net"}


def test_socket_path_that_is_not_a_socket_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    result = subprocess.run(
        [sys.executable, str(RESPONDER), "--socket", str(path)],
        capture_output=True, text=True, check=False, timeout=30)
    assert result.returncode == 1
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr
    assert path.read_text() == "precious"
