"""The test entry point's command line."""

from __future__ import annotations

import json
import subprocess
import sys


def test_print_capabilities_says_net() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tether.transport.vhost_user", "--print-capabilities"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    assert json.loads(out) == {"type": "net"}
