"""The golden streams in tests/data/migration/, made by the real encoder.

Regenerate with `python -m tests.migrate.golden` only when the format changes on
purpose; test_golden.py fails if the encoder's output drifts from these files.
A file named *.valid.bin must pass `tether-state check`; *.invalid.bin must fail
with the errno, stage and offset recorded in expected.json.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

from tests.migrate.formats import U32Codec
from tether.handover.format import GUEST_ADDRESSES, TCP_FLOWS, TETHER_FORMAT, UDP_FLOWS
from tether.handover.records import GuestAddresses, TcpFlow
from tether.migrate.stream import Bindings, Format, Stage, save
from tether.net.tcp_record import ESTABLISHED, PIF_HOST, PIF_TAP, TcpFlowRecord
from tether.net.udp import UdpFlowRecord
from tether.repair.kernel import TcpState
from tether.repair.record import OPT_SACK, OPT_TIMESTAMPS, OPT_WSCALE, TcpConnState

DIRECTORY = Path(__file__).resolve().parent.parent / "data" / "migration"

SEEN = GuestAddresses(
    mac=bytes.fromhex("525400123456"),
    ipv4=bytes([10, 200, 0, 2]),
    ipv6=bytes.fromhex("fd000200000000000000000000000002"),
    ipv6_link_local=bytes.fromhex("fe800000000000005054 00fffe123456".replace(" ", "")),
)

V1 = TETHER_FORMAT.versions[1]
# A later release that added an optional stage: today's reader must skip it.
FUTURE = Stage("future", 200, U32Codec(), optional=True)
FUTURE_FORMAT = Format(
    versions={1: V1, 2: (*V1, FUTURE)},
    current=2, compat=1)
# A later release whose stream today's reader must refuse.
INCOMPATIBLE_FORMAT = Format(versions={1: V1, 5: V1}, current=5, compat=5)


def raw_mapped(ipv4: str) -> bytes:
    return bytes(10) + b"\xff\xff" + socket.inet_aton(ipv4)


# One connection the guest opened to a host service, mid-transfer: bytes in
# flight to the guest (still in the socket's receive queue), bytes the peer has
# not acknowledged yet and bytes never sent.
FLOW = TcpFlow(
    tap=TcpFlowRecord(
        pif=(PIF_TAP, PIF_HOST),
        sides=((raw_mapped("10.200.0.1"), raw_mapped("10.200.0.2"), 6000, 40000),
               (bytes(16), bytes(16), 0, 0)),
        retries=0, ws_from_tap=7, ws_to_tap=7, events=ESTABLISHED, tap_mss=65480, sndbuf=0,
        flags=0, seq_dup_ack_approx=0, wnd_from_tap=512, wnd_to_tap=1024,
        seq_to_tap=0x10000010, seq_ack_from_tap=0x10000008, seq_from_tap=0x20000100,
        seq_ack_to_tap=0x20000100, seq_init_from_tap=0x20000000),
    socket=TcpConnState(
        family=socket.AF_INET, local=("127.0.0.1", 45678), remote=("127.0.0.1", 6000),
        state=TcpState.ESTABLISHED, options=OPT_TIMESTAMPS | OPT_SACK | OPT_WSCALE,
        snd_wscale=7, rcv_wscale=7, mss=65483, timestamp=123456, snd_seq=0x30000000,
        rcv_seq=0x40000000, snd_wl1=0x40000000, snd_wnd=65536, max_window=65536,
        rcv_wnd=65536, rcv_wup=0x40000000, send_queue=b"sent-unacked|never-sent",
        unsent_len=10, recv_queue=b"in flight to the guest; then unread"),
)


UDP_FLOW = UdpFlowRecord(inbound=False, guest_addr=socket.inet_aton("10.200.0.2"),
                         guest_port=5353, remote_addr=socket.inet_aton("10.200.0.1"),
                         remote_port=53, local=("0.0.0.0", 40001), peer=("127.0.0.1", 53))


def _stream(fmt: Format, addresses: GuestAddresses, future: int | None = None,
            flows: tuple[TcpFlow, ...] = (), udp: tuple[UdpFlowRecord, ...] = ()) -> bytes:
    sides = Bindings(fmt).bind(GUEST_ADDRESSES, save=lambda: addresses) \
        .bind(TCP_FLOWS, save=lambda: list(flows))
    if UDP_FLOWS in fmt.versions[fmt.current]:
        sides.bind(UDP_FLOWS, save=lambda: list(udp))
    if FUTURE in fmt.versions[fmt.current]:
        sides.bind(FUTURE, save=lambda: future)
    return save(fmt, sides).to_bytes()


def streams() -> dict[str, bytes]:
    seen = _stream(TETHER_FORMAT, SEEN)
    corrupt = bytearray(seen)
    corrupt[16 + 16 + 3] ^= 0x01  # a bit of the MAC inside the payload
    multicast = _stream(TETHER_FORMAT, GuestAddresses(mac=bytes.fromhex("015400123456")))
    return {
        "guest-addresses.valid.bin": seen,
        "nothing-seen.valid.bin": _stream(TETHER_FORMAT, GuestAddresses()),
        "one-tcp-flow.valid.bin": _stream(TETHER_FORMAT, SEEN, flows=(FLOW,)),
        "tcp-and-udp-flows.valid.bin": _stream(TETHER_FORMAT, SEEN, flows=(FLOW,),
                                               udp=(UDP_FLOW,)),
        "future-optional-stage.valid.bin": _stream(FUTURE_FORMAT, SEEN, future=7),
        "truncated.invalid.bin": seen[:40],
        "trailing-bytes.invalid.bin": seen + b"\0",
        "corrupt-payload.invalid.bin": bytes(corrupt),
        "multicast-mac.invalid.bin": multicast,
        "incompatible-version.invalid.bin": _stream(INCOMPATIBLE_FORMAT, SEEN),
        # passt's stream with nothing seen and no flow: read by its magic.
        "passt-v2-empty.valid.bin": struct.pack(">QII", 0xB1BB1D1B0BB1D1B0, 2, 2) + bytes(46),
    }


EXPECTED_ERRORS = {
    "truncated.invalid.bin": ("ENODATA", "guest addresses", 40),
    "trailing-bytes.invalid.bin": ("EINVAL", "end", 130),
    "corrupt-payload.invalid.bin": ("EBADMSG", "guest addresses", 20),
    "multicast-mac.invalid.bin": ("EINVAL", "guest addresses", 32),
    "incompatible-version.invalid.bin": ("ENOTSUP", "header", 8),
}


def main() -> None:
    DIRECTORY.mkdir(parents=True, exist_ok=True)
    for name, data in streams().items():
        (DIRECTORY / name).write_bytes(data)
    expected = {name: {"errno": e, "stage": s, "offset": o}
                for name, (e, s, o) in EXPECTED_ERRORS.items()}
    (DIRECTORY / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
