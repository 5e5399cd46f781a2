"""A host to copy defaults from: a network namespace with libvirt's interface names."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.net.conftest import Netns, delete_netns, make_netns

HERE = Path(__file__).parent
SRC = str(Path(__file__).parents[2] / "src")


class Host:
    """eth42: 192.0.2.10/24 via .1, 2001:db8:42::10/64 via 2001:db8:42::1; eth43: a
    second interface with 198.51.100.7/24 and no default route; eth44: no address at
    all; resolver 192.0.2.53."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def config(self, *argv: str) -> dict[str, Any]:
        done = self.ns.run(sys.executable, str(HERE / "show_config.py"), *argv, check=False)
        assert done.stdout, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    ns = make_netns("tcli")
    etc = Path("/etc/netns") / ns.name
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text("nameserver 192.0.2.53\nsearch example.test\n")
    try:
        for argv in (["link", "add", "eth42", "type", "veth", "peer", "name", "eth43"],
                     ["link", "add", "eth44", "type", "veth", "peer", "name", "eth45"],
                     ["link", "set", "eth42", "up"], ["link", "set", "eth43", "up"],
                     ["addr", "add", "192.0.2.10/24", "dev", "eth42"],
                     ["addr", "add", "198.51.100.7/24", "dev", "eth43"],
                     ["-6", "addr", "add", "2001:db8:42::10/64", "dev", "eth42", "nodad"],
                     ["route", "add", "default", "via", "192.0.2.1"],
                     ["-6", "route", "add", "default", "via", "2001:db8:42::1"]):
            subprocess.run(["ip", "-n", ns.name, *argv], check=True, capture_output=True)
        yield Host(ns)
    finally:
        delete_netns(ns)
        for f in etc.iterdir():
            f.unlink()
        etc.rmdir()
