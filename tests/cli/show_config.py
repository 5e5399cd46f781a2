"""Print, as JSON, the configuration tether derives from argv in this namespace.

Run inside a test's network namespace (`ip netns exec NS python show_config.py
ARGS`): the defaults tether copies come from that namespace's routes and
addresses, so the test controls them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import sys
from typing import Any

from tether.config import ConfigError, build_parser, from_args


def _plain(value: Any) -> Any:
    if isinstance(value, bytes) and len(value) in (4, 16):
        return str(ipaddress.ip_address(value))
    if isinstance(value, bytes):
        return value.hex(":")
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def main() -> int:
    try:
        config = from_args(build_parser().parse_args(sys.argv[1:]))
    except ConfigError as exc:
        print(json.dumps({"error": str(exc)}))
        return 1
    out = _plain(config)
    out["net"]["router6"] = _plain(config.net.router6)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
