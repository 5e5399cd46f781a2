"""Encode and decode a synthetic state of 100 000 fixed-size records (164 bytes each,
the size of passt's per-flow records), through tether's real stream code.

    python bench/bench_migrate.py [--records N] [--rounds R]

Prints records/s each way (best of R rounds; the machine is shared and noisy)
and the bytes the framing adds on top of the records.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

from tether.migrate.records import FixedRecords
from tether.migrate.stream import Bindings, Format, Stage, apply_loaded, parse, save

# 164 bytes: the shape of a flow entry plus its socket state.
LAYOUT = ">2B16s16sHH16s16sHH4BIIBBHH5I12I4B"
FLOWS: Stage[Sequence[tuple[Any, ...]]] = Stage("flows", 1, FixedRecords(LAYOUT, "flows"))
FORMAT = Format(versions={1: (FLOWS,)}, current=1, compat=1)


def synthetic(count: int) -> list[tuple[Any, ...]]:
    addr = bytes(range(16))
    return [(1, 2, addr, addr, i & 0xFFFF, 80, addr, addr, 443, i & 0xFFFF, 1, 2, 3, 4,
             1460, 1 << 16, 5, 6, 7, 8, i, i + 1, i + 2, i + 3, i + 4,
             *range(i, i + 12), 1, 2, 3, 4) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    records = synthetic(args.records)
    assert FLOWS.codec is not None
    record_size = FixedRecords(LAYOUT, "flows").layout.size
    encode_best = decode_best = float("inf")
    received: list[Sequence[tuple[Any, ...]]] = []
    data = b""

    def keep(table: Any) -> None:
        received.append(table)

    for _ in range(args.rounds):
        started = time.perf_counter()
        saved = save(FORMAT, Bindings(FORMAT).bind(FLOWS, save=lambda: records))
        encode_best = min(encode_best, time.perf_counter() - started)
        data = saved.to_bytes()
        started = time.perf_counter()
        loaded = parse(FORMAT, data)
        apply_loaded(FORMAT, loaded, Bindings(FORMAT).bind(FLOWS, apply=keep))
        decode_best = min(decode_best, time.perf_counter() - started)
    assert received[-1] == records  # a full unpack of every field, outside the timing
    unpack_best = float("inf")
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _record in received[-1]:
            pass
        unpack_best = min(unpack_best, time.perf_counter() - started)
    payload = record_size * args.records
    overhead = len(data) - payload
    print(f"records: {args.records} x {record_size} B = {payload} B; stream {len(data)} B")
    print(f"encode: {args.records / encode_best:,.0f} records/s "
          f"({encode_best * 1e3:.1f} ms, best of {args.rounds})")
    print(f"decode: {args.records / decode_best:,.0f} records/s "
          f"({decode_best * 1e3:.1f} ms, best of {args.rounds})")
    print(f"unpacking every field of every record afterwards (the consumer's work): "
          f"{args.records / unpack_best:,.0f} records/s")
    print(f"framing overhead: {overhead} B total, {overhead / args.records:.5f} B/record, "
          f"{100 * overhead / payload:.5f} %")


if __name__ == "__main__":
    main()
