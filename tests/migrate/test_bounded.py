"""Memory stays bounded by the bytes that arrived, whatever a stream declares.

Run in subprocesses under an RLIMIT_AS far below the sizes the streams
claim: an allocation sized by a record header would fail there with
MemoryError (or a traceback), where bounded parsing just reports the stream
as truncated or too big.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tether.migrate.stream import HEADER, MAGIC, RECORD

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 512 << 20  # address space for the child: a quarter of what the streams claim


def limited(argv: list[str], limit: int = LIMIT) -> list[str]:
    """argv under an address-space limit (util-linux prlimit: no preexec_fn,
    which is unsafe in a process that may have threads)."""
    return ["prlimit", f"--as={limit}", *argv]


ENV = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")


def run(args: list[str], stdin: bytes, limit: int = LIMIT,
        timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(limited([sys.executable, *args], limit), input=stdin,
                          capture_output=True, env=ENV, timeout=timeout, check=False)


def declaring(length: int, stage: int = 1) -> bytes:
    """A 32-byte stream: a valid header, then a record header claiming `length` bytes."""
    return HEADER.pack(MAGIC, 1, 1) + RECORD.pack(stage, 0, 0, length)


def test_a_32_byte_stream_claiming_2_gib_costs_32_bytes() -> None:
    for length in ((2 << 30) - 64, 2 << 30, (1 << 64) - 1):
        for stage in (1, 4, 999):  # known stages, and an unknown one
            done = run(["-m", "tether.handover.state_cli", "check", "-"], declaring(length, stage))
            assert b"Traceback" not in done.stderr, done.stderr.decode()
            assert b"MemoryError" not in done.stderr
            assert done.returncode == 1, done.stderr.decode()


def test_an_optional_unknown_record_is_skipped_without_being_buffered() -> None:
    script = textwrap.dedent("""
        import zlib, sys
        from tether.handover.format import TETHER_FORMAT
        from tether.migrate.stream import HEADER, MAGIC, RECORD, StreamParser, FLAG_OPTIONAL
        n = 1 << 30   # 1 GiB of payload, 64 KiB at a time, under a 512 MiB limit
        chunk = bytes(1 << 16)
        crc = 0
        for _ in range(n // len(chunk)):
            crc = zlib.crc32(chunk, crc)
        p = StreamParser(TETHER_FORMAT, max_size=4 << 30)
        p.feed(HEADER.pack(MAGIC, 1, 1) + RECORD.pack(999, FLAG_OPTIONAL, crc, n))
        for _ in range(n // len(chunk)):
            p.feed(chunk)
        print("skipped", p.offset)
    """)
    done = run(["-c", script], b"", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["skipped", str(32 + (1 << 30))]


FUZZ_CHILD = textwrap.dedent("""
    import errno, sys
    from hypothesis import HealthCheck, given, settings, strategies as st
    from tether.handover.format import TETHER_FORMAT
    from tether.migrate.errors import MigrationError
    from tether.migrate.stream import HEADER, MAGIC, RECORD, StreamParser

    ran = 0
    sizes = st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1),
                      st.sampled_from([2**31, 2**31 - 64, 2**32, 2**63, 2**64 - 1]))
    record = st.tuples(st.integers(0, 6), st.integers(0, 3), st.integers(0, 2**32 - 1),
                       sizes, st.binary(max_size=200))

    @settings(max_examples=int(sys.argv[1]), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(record, max_size=6), st.integers(1, 64), st.booleans())
    def fuzz(records, chunk, finish):
        global ran
        ran += 1
        data = HEADER.pack(MAGIC, 1, 1) + b"".join(
            RECORD.pack(i, f, c, n) + body for i, f, c, n, body in records)
        parser = StreamParser(TETHER_FORMAT)
        try:
            for pos in range(0, len(data), chunk):
                parser.feed(data[pos:pos + chunk])
            if finish:
                parser.finish()
        except MigrationError as exc:
            assert exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.ENODATA, errno.EFBIG,
                                 errno.EBADMSG), exc

    fuzz()
    # An honest stream still parses in the same process afterwards.
    from tether.migrate.stream import parse
    parse(TETHER_FORMAT, open(sys.argv[2], "rb").read())
    print("ran", ran)
""")


def test_fuzzed_streams_under_an_address_space_limit() -> None:
    valid = ROOT / "tests" / "data" / "migration" / "tcp-and-udp-flows.valid.bin"
    done = run(["-c", FUZZ_CHILD, "400", str(valid)], b"", limit=768 << 20, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    words = done.stdout.decode().split()
    assert words[0] == "ran" and int(words[1]) >= 400


def test_tether_state_reports_memory_exhaustion_in_one_line() -> None:
    """Real data beyond the limit: a one-line error, never a traceback."""
    # 300 MiB of a real (known, mandatory) record under a 256 MiB limit, written
    # in chunks: the test itself holds 1 MiB of it at a time.
    n = 300 << 20
    proc = subprocess.Popen(limited([sys.executable, "-m", "tether.handover.state_cli",
                                     "check", "-"],
                                    256 << 20),
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(declaring(n, stage=3))
        chunk = bytes(1 << 20)
        for _ in range(n // len(chunk)):
            proc.stdin.write(chunk)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it gave up before the end: what matters is how
    stderr = proc.stderr.read().decode()
    assert proc.wait(120) in (1, 2)
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_errno_of_a_truncated_huge_record_is_enodata() -> None:
    from tether.handover.format import TETHER_FORMAT  # noqa: PLC0415
    from tether.migrate.errors import MigrationError  # noqa: PLC0415
    from tether.migrate.stream import StreamParser  # noqa: PLC0415

    parser = StreamParser(TETHER_FORMAT)
    parser.feed(declaring((2 << 30) - 64))
    try:
        parser.finish()
    except MigrationError as exc:
        assert exc.errno == errno.ENODATA
    else:
        raise AssertionError("a truncated stream was accepted")
