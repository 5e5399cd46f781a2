"""Build the test guest (kernel + busybox initramfs) from Debian packages.

Reproducible: the packages come from the machine's apt sources by name
(`apt-get download`), are unpacked with `dpkg-deb -x`, and the initramfs is
a newc cpio written here with fixed owners and mtimes, gzip'd with mtime 0.
The result is cached outside git (default ~/.cache/tether/guest, or
$TETHER_GUEST_DIR) with a MANIFEST of package versions and sha256 sums; it
is rebuilt when a file is missing or does not match its sum.

Run `python tests/vm/guest.py` to build it by hand (about a minute, most of
it downloading the kernel package).

Tools in the image besides busybox: iperf3 (from Debian, with exactly the
shared libraries its ELF NEEDED entries reach, and the glibc loader) and
tstream (tests/vm/tstream.c, compiled statically with the host's gcc).
Each recipe gets its own cache subdirectory, so worktrees with different
recipes never rebuild each other's image.
"""

from __future__ import annotations

import functools
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
# Dynamically linked tools: package -> the program taken from it.  Their
# libraries come from the packages' Depends, level by level, until every
# NEEDED soname is found; only the files the ELF closure reaches go in.
TOOLS = {"iperf3": "usr/bin/iperf3"}
LIB_DIRS = ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib"]
TSTREAM_SRC = Path(__file__).with_name("tstream.c")
# Fixed flags: the same compiler and source give the same binary.
TSTREAM_CFLAGS = ["-Wall", "-Wextra", "-Werror", "-O2", "-static", "-s"]
# The cloud kernel builds these as modules; their dependencies (read from
# each module's modinfo "depends=") are added and loaded first.
MODULES = ["virtio_pci", "virtio_net"]

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
READY_MARKER = "TETHER-GUEST-READY"
DHCP_ARG = "tether.net=dhcp"  # on the kernel command line: udhcpc instead of static
UDHCPC_SCRIPT_PATH = "usr/share/udhcpc/default.script"

# Called by udhcpc with $1 = deconfig|bound|renew|leasefail|nak and the lease
# in the environment ($ip, $mask as a prefix length, $router, $mtu, $dns, ...).
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    # A renewal of the same address must not disturb the routes or sockets.
    if ! ip -4 addr show dev "$interface" | grep -q " $ip/${mask:-24} "; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" broadcast "${broadcast:-+}" dev "$interface"
    fi
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    if [ -n "$router" ]; then
        while ip route del default dev "$interface" 2>/dev/null; do :; done
        set -- $router
        ip route add default via "$1" dev "$interface"
    fi
    mkdir -p /etc
    : > /etc/resolv.conf
    [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
    for ns in $dns; do echo "nameserver $ns" >> /etc/resolv.conf; done
    echo "udhcpc: $interface $ip/${mask:-24} router ${router%% *} mtu ${mtu:-none} dns ${dns:-none}"
    ;;
leasefail|nak)
    echo "udhcpc: $1 on $interface"
    ;;
esac
exit 0
"""

INIT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
ip link set lo up
ip link set eth0 up
if grep -qw {DHCP_ARG} /proc/cmdline; then
    # Stays in the foreground until the first lease (or 5 tries), then renews
    # in the background.
    udhcpc -i eth0 -b -t 5 -T 1 -O mtu -s /{UDHCPC_SCRIPT_PATH}
else
    ip addr add {GUEST_IP}/24 dev eth0
    ip route add default via {GATEWAY_IP}
fi
# A wide terminal, so the shell never wraps the commands the tests type.
stty cols 4096 rows 50
echo {READY_MARKER}
exec sh
"""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path


def cache_root() -> Path:
    env = os.environ.get("TETHER_GUEST_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "tether" / "guest"


def cache_dir() -> Path:
    """Where this recipe's image lives (one subdirectory per recipe)."""
    return cache_root() / _recipe()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _toolchain() -> str:
    """The compiler and static libc tstream is built with (part of the recipe)."""
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    libc = subprocess.run(["dpkg-query", "-W", "libc6-dev"], capture_output=True, text=True,
                          check=False)
    return (gcc.stdout.splitlines() or ["gcc: missing"])[0] + " " + libc.stdout.strip()


@functools.cache
def _recipe() -> str:
    """What the image is built from, so a changed recipe forces a rebuild."""
    text = "\n".join([KERNEL_META, *PACKAGES_FIXED, *MODULES, INIT, UDHCPC_SCRIPT,
                      *(f"{p}:{f}" for p, f in TOOLS.items()), *TSTREAM_CFLAGS,
                      TSTREAM_SRC.read_text(), _toolchain(),
                      # the build code itself: how the files are chosen and laid out
                      Path(__file__).read_text()])
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


def build_tstream(out_dir: Path) -> Path:
    """Compile tstream.c statically with the host's gcc into out_dir."""
    if shutil.which("gcc") is None:
        raise RuntimeError("gcc not installed (./dev setup installs it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Compiled from a copy under a fixed name, so no host path gets in.
    shutil.copyfile(TSTREAM_SRC, out_dir / "tstream.c")
    result = subprocess.run(["gcc", *TSTREAM_CFLAGS, "-o", "tstream", "tstream.c"],
                            cwd=out_dir, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cannot compile tstream.c:\n{result.stderr}")
    return out_dir / "tstream"


def _in_root(root: Path, rel: str) -> Path:
    """rel inside root, following symlinks (absolute ones relative to root)."""
    path = Path(os.path.normpath(root / rel.lstrip("/")))
    for _ in range(40):
        if not path.is_symlink():
            return path
        target = os.readlink(path)
        joined = root / target.lstrip("/") if target.startswith("/") else path.parent / target
        path = Path(os.path.normpath(joined))
    raise RuntimeError(f"symlink loop at {rel}")


def _elf_info(path: Path) -> tuple[str | None, list[str]]:
    """(program interpreter, NEEDED sonames) of an ELF file, from readelf."""
    out = _run("readelf", "-W", "-l", "-d", str(path))
    interp = re.search(r"Requesting program interpreter: (\S+)\]", out)
    return (interp.group(1) if interp else None,
            re.findall(r"\(NEEDED\)\s+Shared library: \[(\S+)\]", out))


def _elf_closure(root: Path, programs: list[str]) -> tuple[dict[str, Path], set[str]]:
    """Files to install (image path -> file in root) for programs, and the
    sonames not found in root yet."""
    files: dict[str, Path] = {}
    missing: set[str] = set()
    interps: set[str] = set()
    queue = [(p, _in_root(root, p)) for p in programs]
    while queue:
        name, path = queue.pop()
        if name in files:
            continue
        files[name] = path
        interp, needed = _elf_info(path)
        if interp and interp.lstrip("/") not in files:
            loader = _in_root(root, interp)
            if loader.is_file():
                interps.add(interp.lstrip("/"))
                queue.append((interp.lstrip("/"), loader))
            else:
                missing.add(interp)
        for soname in needed:
            image_path = f"lib/x86_64-linux-gnu/{soname}"
            if image_path in files:
                continue
            found = [_in_root(root, f"{d}/{soname}") for d in LIB_DIRS]
            found = [f for f in found if f.is_file()]
            if found:
                queue.append((image_path, found[0]))
            else:
                missing.add(soname)
    # libc NEEDs the loader by soname: the interpreter, already loaded, serves.
    for interp in interps:
        if interp != (copy := f"lib/x86_64-linux-gnu/{Path(interp).name}"):
            files.pop(copy, None)
    return files, missing


def _depends(deb: Path) -> list[str]:
    """Package names of a .deb's Depends and Pre-Depends (first alternatives)."""
    names = []
    for field in ("Pre-Depends", "Depends"):
        text = _run("dpkg-deb", "-f", str(deb), field)
        for item in text.split(","):
            first = item.split("|")[0].split()
            if first:
                names.append(first[0].split(":")[0])
    return names


def _fetch_tools(work: Path) -> tuple[dict[str, Path], list[Path]]:
    """Download the tools and, level by level, the Depends that provide their
    libraries; return the files to install and the .debs used."""
    debdir, root = work / "tool-debs", work / "tool-root"
    debdir.mkdir()
    fetched: dict[str, Path] = {}
    owner: dict[str, str] = {}  # path in root -> package
    missing: set[str] = set()
    wanted = list(TOOLS)
    while True:
        new = sorted({p for p in wanted if p not in fetched})
        if not new:
            raise RuntimeError(f"no dependency of {sorted(fetched)} provides {sorted(missing)}")
        before = set(debdir.glob("*.deb"))
        _run("apt-get", "download", *new, cwd=debdir)
        for deb in sorted(set(debdir.glob("*.deb")) - before):
            package = _run("dpkg-deb", "-f", str(deb), "Package").strip()
            fetched[package] = deb
            _run("dpkg-deb", "-x", str(deb), str(root))
            for line in _run("dpkg-deb", "-c", str(deb)).splitlines():
                path = line.split(None, 5)[5].split(" -> ")[0]
                owner[os.path.normpath(path)] = package
        files, missing = _elf_closure(root, list(TOOLS.values()))
        if not missing:
            return files, sorted(fetched.values())
        # A missing soname is needed by a file in the closure, so it comes
        # from a dependency of a package that owns one.
        users = {owner.get(str(f.relative_to(root)), "") for f in files.values()}
        wanted = [d for p in sorted(users - {""}) for d in _depends(fetched[p])]


def build(directory: Path) -> None:
    """Build into a fresh directory beside `directory`, then rename it into
    place: a concurrent build or reader never sees half an image."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _build_into(staging)
        staging.chmod(0o755)
        if _manifest_ok(directory):
            return  # a concurrent build finished first: keep the one in use
        if directory.exists():
            shutil.rmtree(directory)  # damaged
        try:
            staging.rename(directory)
        except OSError:
            if not _manifest_ok(directory):  # lost a race to a good build: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_into(directory: Path) -> None:
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
        tool_files, tool_debs = _fetch_tools(work)
        tstream = build_tstream(work / "tstream")
        dirs = {"bin", "lib", "lib/modules", "dev", "proc", "sys", "etc",
                str(Path(UDHCPC_SCRIPT_PATH).parent)}
        for name in tool_files:
            dirs.add(str(Path(name).parent))
        for d in list(dirs):  # and every parent
            dirs.update(str(p) for p in Path(d).parents if str(p) != ".")
        entries: list[tuple[str, int, bytes]] = [(d, 0o40755, b"") for d in sorted(dirs)]
        entries.append(("init", 0o100755, INIT.encode()))
        entries.append(("bin/busybox", 0o100755, (root / "bin" / "busybox").read_bytes()))
        entries.append(("bin/tstream", 0o100755, tstream.read_bytes()))
        entries.append((UDHCPC_SCRIPT_PATH, 0o100755, UDHCPC_SCRIPT.encode()))
        for name, path in sorted(tool_files.items()):
            entries.append((name, 0o100755, path.read_bytes()))
        order: list[str] = []
        for module in MODULES:
            _add_module(moddir, module, order, entries)
        entries.append(("lib/modules/order", 0o100644, " ".join(order).encode()))
        initrd = gzip.compress(_cpio_newc(entries), mtime=0)
        (directory / "initrd.img").write_bytes(initrd)
        shutil.copyfile(vmlinuz, directory / "vmlinuz")
        lines = [f"recipe {_recipe()}", f"kernel-release {release}",
                 f"toolchain {_toolchain()}"]
        for deb in [*debs, *tool_debs]:
            lines.append(f"deb {deb.name} {_sha256(deb)}")
        lines.append(f"tstream {_sha256(tstream)}")
        lines += [f"image-file {name}" for name in sorted(tool_files)]
        for name in ("vmlinuz", "initrd.img"):
            lines.append(f"file {name} {_sha256(directory / name)}")
        (directory / "MANIFEST").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    image = ensure_guest()
    print((cache_dir() / "MANIFEST").read_text(), end="")
    print(f"initrd.img {image.initrd.stat().st_size} bytes", file=sys.stderr)
    print(image, file=sys.stderr)
