"""`python -m tether.transport.vhost_user --socket PATH`: a vhost-user back-end
driven by the test responder (responder.py), for tests until tether.net lands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from ...loop import READ, Loop
from .device import VhostUserNetDevice, VhostUserServer
from .responder import Responder

log = logging.getLogger("tether.vhost_user")
STREAM_COUNT = 3000  # with 4 per 10 ms: about 7.5 s of traffic
STREAM_GUEST_PORT = 9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.transport.vhost_user")
    parser.add_argument("--socket", "-s", help="UNIX socket path to listen on")
    parser.add_argument("--print-capabilities", action="store_true",
                        help="print the back-end capabilities (vhost-user.rst) and exit")
    parser.add_argument("--gateway", default="10.0.2.2",
                        help="address the test responder answers ARP and ping for")
    parser.add_argument("--once", action="store_true",
                        help="exit when the first front-end disconnects")
    parser.add_argument("--reject-state", action="store_true",
                        help="test aid: refuse any loaded device state (fails migrations)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    if args.print_capabilities:
        print(json.dumps({"type": "net"}))
        return 0
    if not args.socket:
        parser.error("--socket is required")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    loop = Loop()
    responder = Responder(args.gateway, loop)
    responder.reject_state = args.reject_state
    device = VhostUserNetDevice(loop, responder, state=responder)
    responder.sink = device
    try:
        server = VhostUserServer(loop, args.socket, device)
    except OSError as e:
        log.error("cannot listen on %s: %s", args.socket, e)
        return 1

    # Signals reach the loop through a wakeup pipe: a Python handler alone
    # would not interrupt epoll (PEP 475 retries the wait).
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, lambda signum, frame: None)

    def on_signal(events: int) -> None:
        for signum in os.read(wake_r, 64):
            if signum == signal.SIGUSR1:
                # Test aid: drop the front-end, as a crash would; QEMU reconnects.
                device.disconnect("SIGUSR1")
            elif signum == signal.SIGUSR2:
                # Test aid: a checked UDP stream to a closed guest port.
                responder.start_stream(STREAM_COUNT, STREAM_GUEST_PORT)
            else:
                loop.stop()

    loop.add(wake_r, READ, on_signal)
    log.info("listening on %s", args.socket)
    had_connection = False

    def done() -> bool:
        nonlocal had_connection
        had_connection = had_connection or device.connected
        return args.once and had_connection and not device.connected

    try:
        loop.run(until=done)
    finally:
        log.info("stats: %s", " ".join(f"{k}={v}" for k, v in device.stats().items()))
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
