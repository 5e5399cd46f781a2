"""A live, busy TCP connection moves to another process, and to another "host".

Process A (source) holds a connection with a peer that streams a byte-exact
pattern both ways the whole time, also while A is frozen; process B (target)
restores it, in A's namespace or in another one that takes over A's address.
The real tether-repair helper switches repair mode for both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.repair.conftest import Proc, agent, start_helper
from tests.support import Netns, sh, wait_for

PORT = 5123
PEER_MSS = 1200  # not the default, so a preserved MSS is visible


def veth(a: Netns, b: Netns, a_addrs: list[str], b_addrs: list[str]) -> None:
    a.ip("link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b.name)
    for ns, dev, addrs in ((a, "va", a_addrs), (b, "vb", b_addrs)):
        for addr in addrs:
            ns.ip("addr", "add", addr, "dev", dev, *(["nodad"] if ":" in addr else []))
        ns.ip("link", "set", dev, "up")


def _drops(ns: Netns) -> str:
    out = sh(*ns.argv("nstat", "-asz"))
    keys = ("PAWS", "Drop", "Prune", "Collapse", "OutOfWindow", "Challenge", "Probe", "Reset")
    return " ".join(" ".join(line.split()[:2]) for line in out.splitlines()
                    if any(key in line for key in keys) and line.split()[1] != "0")


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_busy_connection_moves_between_processes(
    family: int, netns: Callable[[], Netns], procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    host, peer_ns = netns(), netns()
    veth(host, peer_ns, ["10.77.0.1/24", "fd77::1/64"], ["10.77.0.2/24", "fd77::2/64"])
    peer_addr = "10.77.0.2" if family == 4 else "fd77::2"
    move_stream(host, host, peer_ns, peer_addr, between=lambda: None, procs=procs,
                tmp_path=tmp_path)


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_busy_connection_moves_between_hosts(
    family: int, netns: Callable[[], Netns], procs: Callable[[list[str]], Proc], tmp_path: Path
) -> None:
    """Two "hosts" with the same address (only one up at a time) behind a
    bridge; the peer is on the bridge.  The address moves with the connection."""
    src, dst, peer_ns = netns(), netns(), netns()
    peer_ns.ip("link", "add", "br0", "type", "bridge")
    for ns, port, dev in ((src, "pa", "ea"), (dst, "pb", "eb")):
        peer_ns.ip("link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns.name)
        peer_ns.ip("link", "set", port, "master", "br0")
        peer_ns.ip("link", "set", port, "up")
        ns.ip("link", "set", dev, "address", "02:00:00:78:00:01")
        ns.ip("addr", "add", "10.78.0.1/24", "dev", dev)
        ns.ip("addr", "add", "fd78::1/64", "dev", dev, "nodad")
    peer_ns.ip("addr", "add", "10.78.0.2/24", "dev", "br0")
    peer_ns.ip("addr", "add", "fd78::2/64", "dev", "br0", "nodad")
    peer_ns.ip("link", "set", "br0", "up")
    src.ip("link", "set", "ea", "up")
    peer_addr = "10.78.0.2" if family == 4 else "fd78::2"

    def move_address() -> None:
        src.ip("link", "set", "ea", "down")
        dst.ip("link", "set", "eb", "up")

    move_stream(src, dst, peer_ns, peer_addr, between=move_address, procs=procs,
                tmp_path=tmp_path)


def move_stream(
    src: Netns, dst: Netns, peer_ns: Netns, peer_addr: str, *, between: Callable[[], None],
    procs: Callable[[list[str]], Proc], tmp_path: Path,
) -> None:
    """Stream both ways, move the connection from a process in src to one in
    dst (calling between() while nobody holds it), stream on, close; check."""
    peer = procs(agent(peer_ns, "peer", peer_addr, str(PORT), str(PEER_MSS)))
    assert peer.read()["listening"]
    source = procs(agent(src, "source", peer_addr, str(PORT)))
    source.read()
    wait_for(lambda: source.ask("status")["received"] > 500_000
             and peer.ask("status")["received"] > 500_000, 20, "traffic both ways")

    # Freeze and dump A through the real helper.
    out = tmp_path / "conn.state"
    assert source.ask(f"freeze {tmp_path / 'a.repair'} {out}")["listening"]
    helper_a = start_helper(tmp_path / "a.repair")
    frozen = source.read()
    assert frozen["error"] is None
    assert frozen["unacked_seen"] and frozen["sent_len"] > 0, "no sent-unacked data in the dump"
    assert frozen["unread_seen"] and frozen["rcvq_len"] > 0, "no unread data in the dump"
    assert helper_a.wait(10) == 0, helper_a.communicate()[1]

    # The peer kept writing: it holds bytes that A never saw, not even in
    # the dumped queue.  They must reach B.
    in_limbo = peer.ask("status")["sent"] - frozen["received"] - frozen["rcvq_len"]
    assert in_limbo > 0

    # B restores and carries on from exactly where A's application stopped.
    target = procs(agent(dst, "target"))
    if dst is not src:
        assert target.ask(f"hold {out}")["holding"]
    between()
    target.send(f"restore {tmp_path / 'b.repair'} {out} {frozen['sent']} {frozen['received']}")
    assert target.read()["listening"]
    helper_b = start_helper(tmp_path / "b.repair")
    restored = target.read()
    assert helper_b.wait(10) == 0, helper_b.communicate()[1]
    source.ask("release")

    # Window scaling, SACK, timestamps and MSS survive the move.
    before, after = frozen["info"], restored["info"]
    assert after["state"] == 1
    assert after["options"] & 7 == before["options"] & 7 == 7
    assert (after["snd_wscale"], after["rcv_wscale"]) == (before["snd_wscale"],
                                                           before["rcv_wscale"])
    assert after["snd_mss"] == before["snd_mss"]
    assert frozen["mss"] <= PEER_MSS

    try:
        wait_for(lambda: target.ask("status")["received"] > frozen["received"] + 500_000
                 and peer.ask("status")["received"] > frozen["sent"] + 500_000, 30,
                 "traffic both ways after the move")
    except AssertionError as e:
        raise AssertionError(f"{e}: frozen {frozen}, target {target.ask('status')}, "
                             f"peer {peer.ask('status')}, "
                             f"\n{sh(*dst.argv('ss', '-tinm'))}"
                             f"\n{sh(*peer_ns.argv('ss', '-tinm'))}"
                             f"\nhost {_drops(dst)}\npeer {_drops(peer_ns)}") from e

    target.send("finish")
    peer.send("finish")
    t_end, p_end = target.read(), peer.read()
    assert t_end["error"] is None and p_end["error"] is None, (t_end, p_end)
    assert t_end["eof"] and p_end["eof"]
    # Every byte once, in order (each receiver checked the pattern), none lost.
    assert p_end["received"] == t_end["sent"]
    assert t_end["received"] == p_end["sent"]
    assert src.tcp_out_rsts() == 0
    assert dst.tcp_out_rsts() == 0
    assert peer_ns.tcp_out_rsts() == 0
