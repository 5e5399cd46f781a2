"""tether's main job, shown end to end: a VM on tether live-migrates to another
tether instance while TCP connections carry checked data both ways.

    ./dev demo            (as root: namespaces, QEMU, the tether-repair helper)

What it does, all on this machine, inside a network namespace it creates:
boots a small Linux guest (built from Debian packages, cached) under QEMU 10
on tether 1 over vhost-user; the guest takes its address by DHCP from
tether; one stream runs guest -> host service, one host -> guest through
tether's -t port forwarding; QEMU migrates the VM to a second QEMU on
tether 2; both streams end and both ends check every byte.  Then it prints
what happened: downtime, state size, bytes before and after, connections kept.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm.guest import build_tstream, ensure_guest
from tests.vm.harness import qemu_missing_reason
from tests.vm.migration_lab import (
    SOURCE,
    TARGET,
    Lab,
    migrate,
    start_streams,
    stream_results,
)
from tests.vm.tetherlab import host_namespace


def main() -> int:
    if os.geteuid() != 0:
        print("demo: needs root (network namespaces, QEMU, tether-repair)", file=sys.stderr)
        return 1
    reason = qemu_missing_reason()
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 1
    print("tether demo: live migration of a VM with open TCP connections")
    print("  building the guest image (cached after the first run)...")
    guest = ensure_guest()
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as tmp:
        work = Path(tmp)
        tstream = build_tstream(work / "tstream")
        with host_namespace("tdemo") as ns:
            lab = Lab(work, ns, tstream, guest)
            try:
                return run(lab)
            finally:
                lab.close()


def run(lab: Lab) -> int:
    t1, t2, vm1, vm2 = lab.pair(SOURCE, TARGET)
    print("  booting the guest on tether 1 (vhost-user, TCG: about 10 s)...")
    streams = start_streams(lab, vm1)
    _, out = vm1.console.run("ip -4 addr show eth0 | grep inet; ip route | grep default")
    for line in out.splitlines()[1:]:
        if line.strip():
            print(f"  guest: {line.strip()}")
    up_before, down_before = streams.bytes_so_far()
    print(f"  streams flowing: guest->host {up_before} bytes, host->guest {down_before} "
          "bytes so far")
    print("  migrating vm1 (tether 1) -> vm2 (tether 2)...")
    info = migrate(lab, vm1, vm2)
    up_at, down_at = streams.bytes_so_far()
    if info.get("status") != "completed":
        print(f"  migration {info.get('status')}: {info}")
        print(lab.logs())
        return 1
    results = stream_results(streams, vm2)
    vm1.close()
    t1.wait_log("migration complete")
    saved = re.search(r"state saved, (\d+) bytes, (\d+) TCP", t1.text())
    resumed = re.search(r"resumed (\d+) of (\d+) TCP connections", t2.text())
    print(f"  migration completed: total {info.get('total-time')} ms, downtime "
          f"{info.get('downtime')} ms (QMP)")
    if saved:
        print(f"  tether's state: {saved.group(1)} bytes for {saved.group(2)} TCP connections")
    if resumed:
        print(f"  connections kept: {resumed.group(1)} of {resumed.group(2)}")
    ok = True
    for name, host, guest_end in (("guest->host", results.up, results.guest_up),
                                  ("host->guest", results.down, results.guest_down)):
        receiver = host if name == "guest->host" else guest_end
        sender = guest_end if name == "guest->host" else host
        good = receiver.get("result") == "ok" and receiver.get("bytes") == sender.get("bytes")
        ok &= good
        before = up_at if name == "guest->host" else down_at
        print(f"  {name}: {before} bytes before the switch-over, {receiver.get('bytes')} in "
              f"all; {'every byte checked, in order, no reset' if good else receiver}")
    print("  result:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
