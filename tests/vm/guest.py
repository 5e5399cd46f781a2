"""Build the test guest (kernel + busybox initramfs) from Debian packages.

Reproducible: the packages come from the machine's apt sources by name
(`apt-get download`), are unpacked with `dpkg-deb -x`, and the initramfs is
a newc cpio written here with fixed owners and mtimes, gzip'd with mtime 0.
The result is cached outside git (default ~/.cache/tether/guest, or
$TETHER_GUEST_DIR) with a MANIFEST of package versions and sha256 sums; it
is rebuilt when a file is missing or does not match its sum.

Run `python tests/vm/guest.py` to build it by hand (about a minute, most of
it downloading the kernel package).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

KERNEL_META = "linux-image-cloud-amd64"
PACKAGES_FIXED = ["busybox-static"]
# The cloud kernel builds these as modules; their dependencies (read from
# each module's modinfo "depends=") are added and loaded first.
MODULES = ["virtio_pci", "virtio_net"]

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
READY_MARKER = "TETHER-GUEST-READY"

INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
ip link set lo up
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ip route add default via {GATEWAY_IP}
# A wide terminal, so the shell never wraps the commands the tests type.
stty cols 4096 rows 50
echo {READY_MARKER}
exec sh
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def cache_dir() -> Path:
    env = os.environ.get("TETHER_GUEST_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tether" / "guest"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recipe() -> str:
    """What the image is built from, so a changed recipe forces a rebuild."""
    text = "\n".join([KERNEL_META, *PACKAGES_FIXED, *MODULES, INIT])
    return hashlib.sha256(text.encode()).hexdigest()


def _manifest_ok(directory: Path) -> bool:
    manifest = directory / "MANIFEST"
    if not manifest.exists():
        return False
    lines = manifest.read_text().splitlines()
    if f"recipe {_recipe()}" not in lines:
        return False
    for line in lines:
        if line.startswith("file "):
            _, name, digest = line.split()
            path = directory / name
            if not path.exists() or _sha256(path) != digest:
                return False
    return True


def ensure_guest() -> GuestImage:
    """The cached guest, built first if missing or damaged."""
    directory = cache_dir()
    if not _manifest_ok(directory):
        build(directory)
    return GuestImage(directory / "vmlinuz", directory / "initrd.img")


def _run(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _kernel_package() -> str:
    for attempt in range(2):
        result = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True,
                                text=True, check=False)
        match = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", result.stdout)
        if match:
            return match.group(1)
        if attempt == 0:
            # A fresh machine may have no package lists yet.
            _run("apt-get", "update", "-q")
    raise RuntimeError(f"cannot resolve {KERNEL_META}:\n{result.stdout}{result.stderr}")


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc ("070701") archive: (name, mode, data); owners root, mtime 0."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * (-n % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(header + encoded)
        pad(len(header) + len(encoded))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def _add_module(moddir: Path, name: str, order: list[str],
                entries: list[tuple[str, int, bytes]]) -> None:
    """Add a module after its dependencies (depth first)."""
    if name in order:
        return
    found = list(moddir.rglob(f"{name}.ko*"))
    if len(found) != 1:
        raise RuntimeError(f"module {name}: found {found}")
    data = found[0].read_bytes()
    if found[0].suffix == ".xz":
        data = lzma.decompress(data)
    match = re.search(rb"depends=([\w,-]*)\0", data)
    for dep in (match.group(1).decode().split(",") if match else []):
        if dep:
            _add_module(moddir, dep, order, entries)
    order.append(name)
    entries.append((f"lib/modules/{name}.ko", 0o100644, data))


def build(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "MANIFEST").unlink(missing_ok=True)
    kernel_pkg = _kernel_package()
    with tempfile.TemporaryDirectory(prefix="tether-guest-") as tmp:
        work = Path(tmp)
        _run("apt-get", "download", kernel_pkg, *PACKAGES_FIXED, cwd=work)
        debs = sorted(work.glob("*.deb"))
        root = work / "root"
        for deb in debs:
            _run("dpkg-deb", "-x", str(deb), str(root))
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        config = (root / "boot" / f"config-{release}").read_text()
        for option in ("CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_NET"):
            if f"{option}=y" not in config and f"{option}=m" not in config:
                raise RuntimeError(f"{kernel_pkg}: {option} is not configured")
        if "CONFIG_SERIAL_8250_CONSOLE=y" not in config:
            raise RuntimeError(f"{kernel_pkg}: no serial console built in")
        moddir = root / "lib" / "modules" / release
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o40755, b"") for d in ("bin", "lib", "lib/modules", "dev", "proc", "sys")
        ]
        entries.append(("init", 0o100755, INIT.encode()))
        entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
        order: list[str] = []
        for module in MODULES:
            _add_module(moddir, module, order, entries)
        entries.append(("lib/modules/order", 0o100644, " ".join(order).encode()))
        initrd = gzip.compress(_cpio_newc(entries), mtime=0)
        (directory / "initrd.img").write_bytes(initrd)
        shutil.copyfile(vmlinuz, directory / "vmlinuz")
        lines = [f"recipe {_recipe()}", f"kernel-release {release}"]
        for deb in debs:
            lines.append(f"deb {deb.name} {_sha256(deb)}")
        for name in ("vmlinuz", "initrd.img"):
            lines.append(f"file {name} {_sha256(directory / name)}")
        (directory / "MANIFEST").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    image = ensure_guest()
    print((cache_dir() / "MANIFEST").read_text(), end="")
    print(image, file=sys.stderr)
