"""The flow table's keys: what thousands of long-lived flows hold in memory."""

from __future__ import annotations

from tether.net import flows
from tether.net.flows import FlowTable


def _key(guest: str, guest_port: int, remote: str, remote_port: int) -> flows.FlowKey:
    # Fresh objects each time, as parsing a frame or a migration record makes them.
    return (6, bytes.fromhex(guest), int(str(guest_port)), bytes.fromhex(remote),
            int(str(remote_port)))


def test_flows_to_one_service_share_their_addresses_and_port() -> None:
    table = FlowTable(10)
    first = table.canonical(_key("0a000002", 40000, "0a000001", 8080))
    second = table.canonical(_key("0a000002", 40001, "0a000001", 8080))
    assert first == _key("0a000002", 40000, "0a000001", 8080)  # the same key, by value
    assert second[1] is first[1] and second[3] is first[3]
    assert second[2] == 40001
    if flows.__file__.endswith(".py"):
        # The compiled build keeps a tuple's ints unboxed, and boxes them afresh.
        assert second[4] is first[4]


def test_the_shared_objects_are_bounded_however_many_addresses_a_guest_uses() -> None:
    table = FlowTable(10)
    for i in range(3 * flows._SHARED_MAX):
        key = _key("0a000002", 40000, f"{i:08x}", 1000 + i)
        assert table.canonical(key) == key
    assert len(table._addresses) <= flows._SHARED_MAX
    assert len(table._ports) <= flows._SHARED_MAX
