"""Host -> guest through a real TCG guest: the guest's receive rate and
tether's CPU seconds per GB moved, over vhost-user.

    python bench/bench_vhost_vm.py [--seconds 10] [--size 65000]

The device runs in this process, on its own loop thread (so its CPU time is
the thread's), behind a GuestPort that answers ARP/ping like the test
responder and, on request, sends UDP datagrams of --size bytes to a closed
guest port as fast as the guest posts receive buffers (has_room /
guest_room_available flow control, as TCP will use it).  The guest kernel
verifies every checksum and counts the datagram (Udp NoPorts), so the rate
is what the guest really took in.  Guest MTU 65520, as passt's DHCP gives.

The guest -> host direction needs a traffic source in the guest (iperf3
through the network stack); it is left to the integrator.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from examples.vhost_user_responder import Responder  # noqa: E402
from tests.vm.guest import ensure_guest  # noqa: E402
from tests.vm.harness import Vm  # noqa: E402
from tether.loop import READ, Loop  # noqa: E402
from tether.transport.vhost_user.device import VhostUserNetDevice  # noqa: E402
from tether.transport.vhost_user.server import VhostUserServer  # noqa: E402


class Blaster(Responder):
    """The test responder plus a paced-by-the-guest datagram source."""

    def __init__(self, loop: Loop) -> None:
        super().__init__("10.0.2.2", loop)
        self.until = 0.0
        self.frame = b""
        self.sent_bytes = 0
        self.cpu = 0.0

    def blast(self, size: int, seconds: float) -> None:
        self.frame = self._udp_frame(7000, 9, bytes(size))
        self.until = time.monotonic() + seconds
        self.sent_bytes = 0
        self.cpu = -time.thread_time()
        self._pump()

    def _pump(self) -> None:
        sink = self.sink
        assert sink is not None
        if time.monotonic() >= self.until:
            if self.cpu < 0:
                self.cpu += time.thread_time()
            return
        sent = 0
        while sink.has_room() and sent < 64:
            if not sink.send_frame(self.frame):
                break
            sent += 1
        self.sent_bytes += sent * len(self.frame)
        sink.flush()
        if sent == 64 and self.loop is not None:
            self.loop.call_later(0.0, self._pump)  # let the loop poll in between

    def guest_room_available(self) -> None:
        if self.frame:
            self._pump()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=65000)
    args = parser.parse_args()
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    loop = Loop()
    blaster = Blaster(loop)
    device = VhostUserNetDevice(loop, blaster, state=blaster)
    blaster.sink = device
    server = VhostUserServer(loop, str(work / "be.sock"), device)
    # Commands from the main thread reach the loop thread through an eventfd.
    wake = os.eventfd(0, os.EFD_NONBLOCK)
    stop = threading.Event()

    def on_wake(events: int) -> None:
        os.eventfd_read(wake)
        if stop.is_set():
            loop.stop()
        else:
            blaster.blast(args.size, args.seconds)

    loop.add(wake, READ, on_wake)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    vm = Vm(work, "bench", work / "be.sock", guest)
    try:
        vm.wait_booted()
        status, out = vm.console.run("ip link set eth0 mtu 65520 && ping -c 1 10.0.2.2", 60)
        assert status == 0, out

        def rx_bytes() -> int:
            _, out = vm.console.run("grep eth0: /proc/net/dev", 30)
            return int(out.split("eth0:")[1].split()[0])

        before = rx_bytes()
        os.eventfd_write(wake, 1)
        time.sleep(args.seconds + 0.5)  # the run's duration itself, not a synchronisation
        after = rx_bytes()
        _, snmp = vm.console.run("grep Udp: /proc/net/snmp", 30)
    finally:
        vm.close()
        stop.set()
        os.eventfd_write(wake, 1)
        thread.join(10)
        server.close()
    moved = after - before
    gbit = moved * 8 / args.seconds / 1e9
    print(f"host -> guest, {args.size}-byte UDP datagrams, {args.seconds:.0f} s, TCG guest")
    print(f"  guest received   {moved / 1e6:10.1f} MB  = {gbit:.2f} Gbit/s")
    print(f"  tether offered   {blaster.sent_bytes / 1e6:10.1f} MB")
    print(f"  tether CPU       {blaster.cpu:10.2f} s  = {blaster.cpu / (moved / 1e9):.2f} CPU-s/GB"
          f"  ({100 * blaster.cpu / args.seconds:.0f} % of one core)")
    print(f"  device stats     {device.stats()}")
    print("  guest " + " ".join(snmp.split("\n")[-3:]).strip())


if __name__ == "__main__":
    main()
