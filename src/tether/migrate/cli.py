"""A stream inspector for any set of Formats: `tether-state` is this, given
tether's formats (handover/state_cli.py).

    tether-state inspect [--json] FILE|-
    tether-state check FILE|-

Exit status: 0 valid, 1 invalid stream, 2 usage error or unreadable input.
Never a traceback: every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import ipaddress
import json
import os
import stat
import sys
from collections.abc import Sequence
from typing import Any

from tether.migrate.errors import MigrationError
from tether.migrate.fdio import read_stream
from tether.migrate.stream import (
    DEFAULT_MAX_SIZE,
    FLAG_OPTIONAL,
    HEADER,
    RECORD,
    Format,
    Loaded,
    Record,
)
from tether.migrate.unframed import FormatReader

EXIT_VALID = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def jsonable(value: Any) -> Any:
    """Decoded stage values as JSON: addresses as text, raw bytes as hex."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _field(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    return value


def _field(name: str, value: Any) -> Any:
    if isinstance(value, bytes):
        if name == "mac" and len(value) == 6:
            return value.hex(":")
        if name.startswith("ipv4") and len(value) == 4:
            return str(ipaddress.IPv4Address(value))
        if name.startswith("ipv6") and len(value) == 16:
            return str(ipaddress.IPv6Address(value))
    return jsonable(value)


def _open(path: str) -> int:
    if path == "-":
        return sys.stdin.fileno()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    return fd


def _read(path: str, parser: FormatReader) -> Loaded:
    fd = _open(path)
    try:
        return read_stream(fd, parser)
    finally:
        if path != "-":
            os.close(fd)


def _record_json(record: Record, framing: int) -> dict[str, Any]:
    return {
        "offset": record.offset,
        "id": record.id,
        "stage": record.stage.name if record.stage else None,
        "optional": bool(record.flags & FLAG_OPTIONAL),
        "header_size": framing,
        "payload_size": record.length,
        "fields": jsonable(record.value) if record.stage else None,
    }


def _error_json(error: MigrationError) -> dict[str, Any]:
    return {"errno": error.errno, "name": error.errno_name, "stage": error.stage,
            "offset": error.offset, "message": error.message}


def inspect(path: str, as_json: bool, max_size: int, formats: Sequence[Format]) -> int:
    error: MigrationError | None = None
    parser = FormatReader(formats, max_size)
    try:
        loaded = _read(path, parser)
    except MigrationError as exc:
        error = exc
    header = parser.header
    records = parser.records
    fmt = parser.format
    framing = RECORD.size if fmt is None or fmt.framed else 0
    if as_json:
        doc: dict[str, Any] = {
            "valid": error is None,
            "format": fmt.name if fmt else None,
            "magic": f"{fmt.magic:#018x}" if fmt else None,
            "version": header[0] if header else None,
            "compat_version": header[1] if header else None,
            "read_as_version": header[2] if header else None,
            "records": [_record_json(r, framing) for r in records],
            "size": None if error else loaded.size,
            "error": _error_json(error) if error else None,
        }
        print(json.dumps(doc, indent=2))
    else:
        if header and fmt:
            print(f"header     offset 0, {HEADER.size} bytes: {fmt.name} stream, magic "
                  f"{fmt.magic:#018x}, version {header[0]}, compat_version {header[1]}; "
                  f"read as version {header[2]}")
        for r in records:
            name = r.stage.name if r.stage else "unknown, skipped"
            optional = ", optional" if r.flags & FLAG_OPTIONAL else ""
            size = f"{framing}+{r.length}" if framing else f"{r.length}"
            print(f"stage {r.id:<4} offset {r.offset}, {size} bytes: {name}{optional}")
            if r.stage is not None:
                for key, value in _flatten(jsonable(r.value)):
                    print(f"    {key}: {value}")
        if error is None:
            if framing:
                print(f"end        offset {loaded.size - framing}, {framing} bytes; "
                      f"stream is {loaded.size} bytes, valid")
            else:
                print(f"end        offset {loaded.size} (end of file); stream is "
                      f"{loaded.size} bytes, valid")
    if error is not None:
        print(f"tether-state: invalid: {error}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_VALID


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = []
        for key, item in value.items():
            out.extend(_flatten(item, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
        return out
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = []
        for i, item in enumerate(value):
            out.extend(_flatten(item, f"{prefix}[{i}]"))
        return out
    return [(prefix or "value", value)]


def check(path: str, max_size: int, formats: Sequence[Format]) -> int:
    parser = FormatReader(formats, max_size)
    try:
        loaded = _read(path, parser)
    except MigrationError as exc:
        print(f"tether-state: invalid: {exc}", file=sys.stderr)
        return EXIT_INVALID
    assert parser.format is not None
    print(f"valid: {parser.format.name} stream, version {loaded.version} (read as "
          f"{loaded.chosen}), {len(loaded.records)} record(s), {loaded.size} bytes")
    return EXIT_VALID


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether-state",
        description="Inspect or check a migration stream (the device state tether "
                    "or passt hands to QEMU), told apart by its magic. FILE may be - "
                    "for standard input.")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, metavar="BYTES",
                        help="refuse streams larger than this (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="print the header and every stage")
    p_inspect.add_argument("--json", action="store_true", help="machine-readable output")
    p_inspect.add_argument("file", metavar="FILE|-")
    p_check = sub.add_parser("check", help="exit 0 if valid, 1 with the reason if not")
    p_check.add_argument("file", metavar="FILE|-")
    return parser


def main(argv: Sequence[str] | None, formats: Sequence[Format]) -> int:
    """Run the command line in argv, reading streams of any of `formats`."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return inspect(args.file, args.json, args.max_size, formats)
        return check(args.file, args.max_size, formats)
    except OSError as exc:
        print(f"tether-state: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        # Buffers grow only with bytes actually read, so this takes a stream
        # of real data larger than the memory this process may use.
        print(f"tether-state: {args.file}: out of memory (lower --max-size or raise the "
              "memory limit)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_USAGE

