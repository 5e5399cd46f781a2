"""Host socket options the stack sets in more than one place."""

from __future__ import annotations

import socket
import struct
from typing import Final

SO_PEEK_OFF: Final = getattr(socket, "SO_PEEK_OFF", 42)  # asm-generic/socket.h
SIOCINQ: Final = 0x541B  # linux/sockios.h (FIONREAD): bytes in a receive queue, not yet read
SIOCOUTQ: Final = 0x5411  # linux/sockios.h: bytes in a socket's send queue, not yet acknowledged

# struct linger {int l_onoff; int l_linger;}: on, zero seconds.
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def reset_on_close(sock: socket.socket) -> None:
    """Make sock's close() abort the connection: the peer gets RST, not FIN
    (SO_LINGER with a zero timeout, socket(7))."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
