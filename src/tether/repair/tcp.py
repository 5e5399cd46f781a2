"""Capture and re-create TCP connections with TCP_REPAIR.

The source side: `freeze` (silence + repair on), `dump`, then close silently
(a socket closed in repair mode sends nothing) or `unfreeze` to roll back.
The target side: `restore` (create, bind, repair-connect, refill queues, set
options and window; the socket is left in repair mode), then `thaw` (leave
repair mode with a window probe, send the never-sent tail, replay the FINs).

Switching repair mode needs CAP_NET_ADMIN; tether has none, so that single
step goes through a `RepairSwitch`: the helper client, or `KernelSwitch` when
the caller holds the capability itself.  Everything else here is ordinary,
unprivileged socket calls.

Kernel facts this relies on (net/ipv4/tcp.c, tcp_input.c, tcp_output.c):
- repair mode does not stop the receive path: data and FINs that arrive are
  still queued and acknowledged.  `freeze` therefore first attaches a
  drop-everything socket filter, so nothing changes after the dump.
- nor does it stop the send timers: a tail loss probe may still transmit
  never-sent data.  `dump` zeroes the send window first (the record keeps the
  real one); after `unfreeze`, the window probe's answer reopens it.
- a repaired socket has no RTT sample, so the kernel starts its RTO at the
  3 s fallback (RFC 6298 5.7): a segment lost around the move, or a zero
  window at the peer, costs up to 3 s before the first retransmission/probe.
- SIOCOUTQ/SIOCOUTQNSD and TCP_QUEUE_SEQ count our FIN once it is queued;
  TCP_QUEUE_SEQ on the receive queue counts the peer's FIN; SIOCINQ does not.
  The record holds data sequence numbers only; the FINs are implied by state.
- a FIN cannot be put back into a receive queue, and a restored socket starts
  ESTABLISHED.  Half-closed states are rebuilt on top of that (see thaw()).
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from tether.repair import kernel as k
from tether.repair.kernel import FIN_RECEIVED, FIN_SENT, FIN_UNACKED, MIGRATABLE
from tether.repair.record import (
    OPT_SACK,
    OPT_TIMESTAMPS,
    OPT_WSCALE,
    QUEUE_MAX,
    TcpConnState,
)

_SEQ_MASK = 0xFFFFFFFF
_SEND_CHUNK = 1 << 20
_CHUNK_MIN = 1024
_SHORT_OF_MEMORY = (errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN)


class RepairError(OSError):
    """A dump, restore or thaw step failed; names the step and the connection."""


BatchDone = Callable[[int, Sequence[socket.socket]], None]
"""Called with (index of the batch's first socket, the batch) once it is switched."""


class RepairSwitch(Protocol):
    """Turns TCP_REPAIR on or off for a batch of sockets."""

    def set_repair(self, socks: Sequence[socket.socket], command: int,
                   each_batch: BatchDone | None = None) -> None:
        """All of socks, or an OSError; each_batch(start, batch) as parts are done."""
        ...


class KernelSwitch:
    """setsockopt(TCP_REPAIR) in this process: needs CAP_NET_ADMIN here."""

    def set_repair(self, socks: Sequence[socket.socket], command: int,
                   each_batch: BatchDone | None = None) -> None:
        for s in socks:
            s.setsockopt(k.SOL_TCP, k.TCP_REPAIR, command)
        if each_batch is not None:
            each_batch(0, socks)


def _fail(step: str, sock: socket.socket | None, err: OSError) -> RepairError:
    where = ""
    if sock is not None:
        try:
            where = f" {sock.getsockname()}->{sock.getpeername()}"
        except OSError:
            where = f" fd {sock.fileno()}"
    return RepairError(err.errno or 0, f"{step}{where}: {err.strerror or err}")


# -- source side ------------------------------------------------------------


def freeze(socks: Sequence[socket.socket], switch: RepairSwitch,
           each_batch: BatchDone | None = None) -> None:
    """Stop the connections dead: no segment in or out changes their state.

    Repair mode first, then a drop-all filter on each socket before anything
    reads it: repair mode alone still queues (and ACKs) what arrives, and
    that is harmless until the dump, which takes the queue as it is; after
    the dump nothing may arrive, so the filter must be on by then.
    tether-repair attaches the filter itself with repair mode, on its own
    core while this process dumps the batch before (a filter costs the
    kernel about 13 us a socket); a helper that does not (passt-repair)
    leaves it to this process, and where the kernel lets only CAP_NET_ADMIN
    attach one (EPERM) the freeze is undone and fails with EPERM, so that
    the caller can decide between failing and not moving them.

    each_batch(start, batch) runs on each batch once it is frozen (to dump
    it while the helper freezes the next); if it raises, the freeze is
    undone and the exception goes on.
    """

    def frozen(start: int, batch: Sequence[socket.socket]) -> None:
        bare = 0
        for s in batch:
            if not k.silenced(s):
                try:
                    k.silence(s)
                except PermissionError:
                    bare += 1
        if bare:
            raise RepairError(errno.EPERM, f"{bare} of {len(batch)} socket(s) cannot be "
                              "silenced: this kernel lets only CAP_NET_ADMIN attach socket "
                              "filters, and the helper did not (passt-repair does not; "
                              "tether-repair does)")
        if each_batch is not None:
            each_batch(start, batch)

    try:
        switch.set_repair(socks, k.REPAIR_ON, frozen)
    except BaseException:
        unfreeze_quietly(socks, switch)
        raise


def unfreeze_quietly(socks: Sequence[socket.socket], switch: RepairSwitch) -> None:
    """unfreeze() for a freeze that failed midway: best effort, errors dropped
    (the helper may be the reason), so the first failure is the one reported."""
    try:
        unfreeze(socks, switch)
    except OSError:
        for s in socks:
            with contextlib.suppress(OSError):
                k.unsilence(s)


def unfreeze(socks: Sequence[socket.socket], switch: RepairSwitch) -> None:
    """Roll a freeze back: the connections carry on where they stopped."""
    switch.set_repair(socks, k.REPAIR_OFF)
    for s in socks:
        k.unsilence(s)


_MIGRATABLE_STATES = {int(state): state for state in MIGRATABLE}


def dump(sock: socket.socket) -> TcpConnState:
    """Capture a connection whose socket is in repair mode (see freeze).

    Leaves the socket in repair mode with the receive queue selected (the
    selector matters only to repair-mode reads and writes, and whoever
    touches a queue next selects it first).
    """
    try:
        return _dump(sock)
    except OSError as e:
        raise _fail("dump", sock, e) from e


def _dump(sock: socket.socket) -> TcpConnState:
    raw_state, tcpi_options, snd_ws, rcv_ws, _ = k.tcp_info(sock)
    state = _MIGRATABLE_STATES.get(raw_state)
    if state is None:
        raise OSError(0, f"TCP state {raw_state} cannot be migrated")
    options = 0
    if tcpi_options & k.TCPI_OPT_TIMESTAMPS:
        options |= OPT_TIMESTAMPS
    if tcpi_options & k.TCPI_OPT_SACK:
        options |= OPT_SACK
    if tcpi_options & k.TCPI_OPT_WSCALE:
        options |= OPT_WSCALE
    else:
        snd_ws = rcv_ws = 0
    mss = sock.getsockopt(k.SOL_TCP, k.TCP_MAXSEG)  # mss_clamp in repair mode
    window = k.REPAIR_WINDOW.unpack(
        sock.getsockopt(k.SOL_TCP, k.TCP_REPAIR_WINDOW, k.REPAIR_WINDOW.size)
    )
    notsent = k.ioctl_int(sock, k.SIOCOUTQNSD)  # write_seq - snd_nxt
    if notsent:
        # Repair mode leaves the kernel's timers running: a tail loss probe
        # or a window probe may still transmit never-sent data, and the peer
        # would then acknowledge bytes the record calls unsent (the target
        # drops such ACKs, with their data).  A zero send window stops new
        # data for good; the record keeps the real one.  Retransmissions of
        # sent data may go on, which is harmless.  With nothing unsent (an
        # idle connection) there is nothing to stop: nobody writes to a
        # frozen socket, so that system call is saved.
        wl1, _, max_window, rcv_wnd, rcv_wup = window
        sock.setsockopt(
            k.SOL_TCP, k.TCP_REPAIR_WINDOW,
            k.REPAIR_WINDOW.pack(wl1, 0, max_window, rcv_wnd, rcv_wup),
        )
        notsent = k.ioctl_int(sock, k.SIOCOUTQNSD)  # a probe may have sent some meanwhile

    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
    outq = k.ioctl_int(sock, k.SIOCOUTQ)  # write_seq - snd_una
    write_seq = sock.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ) & _SEQ_MASK
    fin_out = state in FIN_SENT
    if state in FIN_UNACKED:
        outq -= 1
    if fin_out and notsent > 0:
        notsent -= 1  # the FIN is still queued behind the unsent data
    if not 0 <= notsent <= outq <= QUEUE_MAX:
        raise OSError(0, f"inconsistent send queue: outq {outq}, notsent {notsent}")
    send_queue = _peek(sock, outq, "send")
    snd_seq = (write_seq - int(fin_out) - outq) & _SEQ_MASK

    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
    inq = k.ioctl_int(sock, k.SIOCINQ)  # data only, the FIN excluded
    rcv_nxt = sock.getsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ) & _SEQ_MASK
    if not 0 <= inq <= QUEUE_MAX:
        raise OSError(0, f"inconsistent receive queue: {inq} bytes")
    if inq:
        # A caller's peek offset would make this read start late (the send
        # queue's peek ignores it).  Whoever resumes the socket sets its own.
        sock.setsockopt(socket.SOL_SOCKET, k.SO_PEEK_OFF, -1)
    recv_queue = _peek(sock, inq, "receive")
    rcv_seq = (rcv_nxt - int(state in FIN_RECEIVED) - inq) & _SEQ_MASK
    # Last: whatever was retransmitted meanwhile carried an older timestamp,
    # so the target's clock never starts behind what the peer has seen.
    timestamp = sock.getsockopt(k.SOL_TCP, k.TCP_TIMESTAMP) & _SEQ_MASK

    local = sock.getsockname()
    remote = sock.getpeername()
    return TcpConnState(
        # from the address, not sock.family, which builds an enum per call
        family=socket.AF_INET6 if len(local) == 4 else socket.AF_INET,
        local=(local[0], local[1]),
        remote=(remote[0], remote[1]),
        state=state,
        options=options,
        snd_wscale=snd_ws,
        rcv_wscale=rcv_ws,
        mss=mss,
        timestamp=timestamp,
        snd_seq=snd_seq,
        rcv_seq=rcv_seq,
        snd_wl1=window[0],
        snd_wnd=window[1],
        max_window=window[2],
        rcv_wnd=window[3],
        rcv_wup=window[4],
        send_queue=send_queue,
        unsent_len=notsent,
        recv_queue=recv_queue,
    )


def _peek(sock: socket.socket, length: int, which: str) -> bytes:
    """Read a whole queue with MSG_PEEK (the only read repair mode allows).

    A peek always starts at the head of the queue, so it is one call: the
    kernel copies across segments until the buffer is full.
    """
    if length == 0:
        return b""
    buf = bytearray(length)
    try:
        got = sock.recv_into(buf, length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        got = 0
    if got != length:
        raise OSError(errno.EIO, f"{which} queue: read {got} bytes, expected {length}")
    return bytes(buf)


def hold_address(state: TcpConnState) -> socket.socket:
    """A silent listener on the connection's local address and port.

    For a move within one host: create it before closing the frozen source
    socket and close it once the target socket is restored.  Meanwhile the
    peer's segments find this socket instead of none, and its drop-all filter
    discards them before TCP would answer with a reset.  The restored socket
    binds over it (repair mode forces reuse), and segments go to it at once.
    Fails with EADDRINUSE if another listener owns the port; silence that one
    instead (kernel.silence).
    """
    s = socket.socket(state.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        k.silence(s)
        s.bind(state.local)
        s.listen(1)
    except OSError as e:
        s.close()
        raise _fail("hold address", None, e) from e
    return s


# -- target side ------------------------------------------------------------


def new_socket(state: TcpConnState) -> socket.socket:
    """An unconnected socket for state, to be switched into repair mode."""
    # No SO_REUSEADDR: bind in repair mode forces reuse (SK_FORCE_REUSE),
    # and resume() sets it once repair mode is off.
    return socket.socket(state.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def restore(state: TcpConnState, switch: RepairSwitch) -> socket.socket:
    """Re-create one connection; the socket is returned still in repair mode."""
    s = new_socket(state)
    try:
        switch.set_repair([s], k.REPAIR_ON)
        apply(s, state)
    except BaseException:
        s.close()  # in repair mode or unconnected: silent either way
        raise
    return s


def restore_many(
    states: Sequence[TcpConnState], switch: RepairSwitch
) -> list[socket.socket | RepairError]:
    """Restore a batch with one repair-on round trip for all sockets.

    A connection that fails gives its RepairError in its slot (and its socket
    is closed); the others are unaffected.
    """
    socks = [new_socket(st) for st in states]
    out: list[socket.socket | RepairError] = []

    def restore_batch(start: int, batch: Sequence[socket.socket]) -> None:
        for s, st in zip(batch, states[start : start + len(batch)], strict=True):
            try:
                apply(s, st)
            except RepairError as e:
                s.close()
                out.append(e)
            else:
                out.append(s)

    try:
        switch.set_repair(socks, k.REPAIR_ON, restore_batch)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return out


def apply(sock: socket.socket, state: TcpConnState) -> None:
    """Restore state into an unconnected socket that is already in repair mode."""
    try:
        _apply(sock, state)
    except OSError as e:
        raise _fail("restore", sock, e) from e


def _apply(sock: socket.socket, st: TcpConnState) -> None:
    # Bind in repair mode: it forces address reuse, so a listener on the same
    # port (the usual case for accepted connections) does not get in the way.
    sock.bind(st.local)
    if st.options & OPT_TIMESTAMPS:
        sock.setsockopt(k.SOL_TCP, k.TCP_TIMESTAMP, _as_int(st.timestamp))
    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
    sock.setsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, _as_int(st.snd_seq))
    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_RECV_QUEUE)
    # The peer's FIN cannot be queued again, but its sequence number must stay
    # consumed or our ACKs would fall one short of what the peer already saw.
    rcv_start = (st.rcv_seq + int(st.state in FIN_RECEIVED)) & _SEQ_MASK
    sock.setsockopt(k.SOL_TCP, k.TCP_QUEUE_SEQ, _as_int(rcv_start))
    # The connect computes the cached MSS from the clamp it sees, and
    # TCP_REPAIR_OPTIONS can only set the clamp afterwards: without this, the
    # restored connection would send 536-byte segments until a PMTU change.
    # The option takes at most 32767 (loopback's 65495 gets that), and it is
    # cleared right after so that it does not outlive the connect as a
    # user-set MSS.
    sock.setsockopt(k.SOL_TCP, k.TCP_MAXSEG, min(st.mss, k.USER_MSS_MAX))
    sock.connect(st.remote)  # in repair mode: ESTABLISHED, no handshake
    sock.setsockopt(k.SOL_TCP, k.TCP_MAXSEG, 0)

    if st.recv_queue:
        _fill_queue(sock, st.recv_queue, send=False)  # still on the receive queue
    if st.sent_len:
        # Data written in repair mode counts as sent, not transmitted: it
        # waits in the retransmit queue for the peer's ACK or the RTO.
        sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_QUEUE, k.TCP_SEND_QUEUE)
        _fill_queue(sock, memoryview(st.send_queue)[: st.sent_len], send=True)
    # The queue left selected matters to nothing but repair-mode writes,
    # and there are none after this: not deselecting saves a system call.

    opts = [(k.TCPOPT_MAXSEG, st.mss)]
    if st.options & OPT_WSCALE:
        opts.append((k.TCPOPT_WINDOW, st.snd_wscale | st.rcv_wscale << 16))
    if st.options & OPT_SACK:
        opts.append((k.TCPOPT_SACK_PERM, 0))
    if st.options & OPT_TIMESTAMPS:
        opts.append((k.TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(k.SOL_TCP, k.TCP_REPAIR_OPTIONS, b"".join(k.REPAIR_OPT.pack(*o) for o in opts))
    sock.setsockopt(
        k.SOL_TCP,
        k.TCP_REPAIR_WINDOW,
        k.REPAIR_WINDOW.pack(st.snd_wl1, st.snd_wnd, st.max_window, st.rcv_wnd, st.rcv_wup),
    )


def _as_int(seq: int) -> int:
    """setsockopt takes a C int: wrap sequence numbers into its range."""
    return seq - (1 << 32) if seq & 0x80000000 else seq


def _fill_queue(sock: socket.socket, data: bytes | memoryview, *, send: bool) -> None:
    """Write data into the queue selected with TCP_REPAIR_QUEUE.

    The send queue is charged to a fresh socket's small send buffer, and in
    repair mode nothing drains it: grow the buffer first (the kernel caps it
    at 2 * net.core.wmem_max, no privilege needed; setting it also ends send
    buffer autotuning for this socket, so only when the queue needs it).  The
    receive queue needs no such thing.  When the kernel is short of memory,
    retry with smaller writes.
    """
    view = memoryview(data)
    if send:
        _grow_sndbuf(sock, len(view))
    chunk = _SEND_CHUNK
    while view:
        try:
            n = sock.send(view[:chunk], socket.MSG_DONTWAIT)
        except OSError as e:
            if e.errno in _SHORT_OF_MEMORY and chunk > _CHUNK_MIN:
                chunk //= 2
                continue
            raise
        view = view[n:]


def _grow_sndbuf(sock: socket.socket, length: int) -> None:
    need = 2 * length + (64 << 10)
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < need:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(need, 1 << 30))


def _send_tail(sock: socket.socket, data: memoryview, timeout: float) -> None:
    """Send the never-sent tail for real, waiting at most timeout for room."""
    _grow_sndbuf(sock, len(data))
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    finally:
        sock.settimeout(previous)


def thaw(sock: socket.socket, state: TcpConnState, switch: RepairSwitch) -> None:
    """Leave repair mode and resume: the peer sees a window probe, then data."""
    switch.set_repair([sock], k.REPAIR_OFF)
    resume(sock, state)


def thaw_many(
    pairs: Sequence[tuple[socket.socket, TcpConnState]], switch: RepairSwitch,
    thawed: Callable[[int, RepairError | None], None] | None = None,
) -> list[RepairError | None]:
    """thaw() for many, 253 sockets per repair-off round trip.

    thawed(index, error) runs for each as soon as its batch is back, while
    the helper switches the next batch: the caller can put it to work.
    """
    out: list[RepairError | None] = []

    def resume_batch(start: int, batch: Sequence[socket.socket]) -> None:
        for i, s in enumerate(batch, start):
            error: RepairError | None = None
            try:
                resume(s, pairs[i][1])
            except RepairError as e:
                error = e
            out.append(error)
            if thawed is not None:
                thawed(i, error)

    switch.set_repair([s for s, _ in pairs], k.REPAIR_OFF, resume_batch)
    return out


def resume(sock: socket.socket, st: TcpConnState, tail_timeout: float = 5.0) -> None:
    """The part of thaw after repair mode is off: unsent tail and FINs.

    - Our FIN was sent (FIN_WAIT1/2, CLOSING, LAST_ACK): shutdown(SHUT_WR)
      queues it again with its original sequence number, behind the unsent
      tail; the peer takes it as new or acknowledges it as a duplicate.
    - The peer's FIN was received (CLOSE_WAIT, LAST_ACK, CLOSING):
      shutdown(SHUT_RD) makes reads return end-of-file once the restored
      receive queue is drained, as on the source.  It sends nothing.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # leaving repair cleared it
        if st.unsent_len:
            _send_tail(sock, memoryview(st.send_queue)[st.sent_len :], tail_timeout)
        if st.state in FIN_RECEIVED:
            sock.shutdown(socket.SHUT_RD)
        if st.state in FIN_SENT:
            sock.shutdown(socket.SHUT_WR)
    except OSError as e:
        raise _fail("thaw", sock, e) from e
