"""Host side of the many-connections migration test: accept N connections and
check every byte of each against the tstream pattern, until all have ended.

    python -m tests.vm.manyconns PORT N SEED

Prints `MANY accepted=N` once all are connected, then one final line
`MANY ok=A bad=B reset=R bytes=T`.
"""

from __future__ import annotations

import selectors
import socket
import sys
import time

from tests.vm.pattern import Checker

IDLE_LIMIT = 30.0


def main() -> int:
    port, wanted, seed = (int(a) for a in sys.argv[1:4])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(wanted)
    listener.setblocking(False)
    print("MANY listening", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    checkers: dict[socket.socket, Checker] = {}
    accepted = ok = bad = reset = total = 0
    last = time.monotonic()
    while ok + bad + reset < wanted and time.monotonic() - last < IDLE_LIMIT:
        for key, _ in sel.select(1.0):
            last = time.monotonic()
            if key.data is None:
                conn, _ = listener.accept()
                conn.setblocking(False)
                checkers[conn] = Checker(seed)
                sel.register(conn, selectors.EVENT_READ, conn)
                accepted += 1
                if accepted == wanted:
                    print(f"MANY accepted={accepted}", flush=True)
                continue
            conn = key.data
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                reset += 1
                data = None
            if data:
                total += len(data)
                if not checkers[conn].feed(data):
                    bad += 1
                    data = None
                else:
                    continue
            elif data is not None:  # end of file: a complete, checked stream
                ok += 1
            sel.unregister(conn)
            conn.close()
    print(f"MANY ok={ok} bad={bad} reset={reset} bytes={total} accepted={accepted}", flush=True)
    return 0 if ok == wanted else 1


if __name__ == "__main__":
    sys.exit(main())
