"""Build and cache the Debian 12 root filesystems the simulated hosts boot from.

The base image (per arch) is an mmdebstrap tree; boards and the balancer each add a layer (an overlayfs
upper dir) stacked on the same base, so their packages are preinstalled without a second bootstrap:
the offline hosts then hold what the roles would apt-get, and the roles' install tasks change nothing.
Everything is built in a temp dir and renamed into place, so an interrupted build leaves no cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .binfmt import ensure_arch_runnable
from .commands import SimError, log, mounts_under, run

# Bump when the build steps change so old caches are not reused.
BUILD_SCRIPT_VERSION = 5
SUITE = "bookworm"
DEFAULT_CACHE = Path("/var/cache/rkllm-fleet")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ARCHES = ("arm64", "amd64")

BASE_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv",
    # Ansible's apt module imports python3-apt and would try to apt-get it (no network on boards).
    "python3-apt",
    "nftables", "iproute2", "ca-certificates", "sudo", "curl", "procps", "iputils-ping",
    # become_user to an unprivileged user needs setfacl for Ansible's temp files.
    "acl",
)
# The monitoring role's packages: node_exporter everywhere, and the balancer doubles as the monitor host
# (Prometheus + promtool); keepalived for the balancer_vip role. amd64 balancer, so only node_exporter is
# ever installed under qemu.
LAYER_PACKAGES = {
    "board": ("prometheus-node-exporter",),
    "balancer": ("nginx", "libnginx-mod-http-js", "keepalived", "prometheus-node-exporter",
                 "prometheus-nginx-exporter", "prometheus", "prometheus-alertmanager"),
}
# Installing these enables them; they stay off until the monitoring role turns them on, so hosts that
# are not monitored boot and run as before.
LAYER_DISABLED_UNITS = ("prometheus.service", "prometheus-node-exporter.service",
                        "prometheus-nginx-exporter.service", "prometheus-alertmanager.service")

# Units that only cost boot time (or fail) in a container without hardware or a console.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "apt-daily.service", "apt-daily-upgrade.service",
    "e2scrub_all.timer", "e2scrub_all.service", "e2scrub_reap.service", "fstrim.timer",
    "dpkg-db-backup.timer", "getty@tty1.service", "console-getty.service", "serial-getty@.service",
    "systemd-networkd-wait-online.service", "man-db.timer",
)
SSHD_DROPIN = "UseDNS no\nMaxStartups 64:30:128\n"
# qemu-user cannot set up systemd credentials (units fail at step CREDENTIALS with EINVAL); the
# Debian units that load optional credentials run fine without them.
NO_CREDENTIALS_DROPIN = "[Service]\nLoadCredential=\n"
NO_SERVICE_START = "#!/bin/sh\n# fleet-sim image build: never start services in the build chroot\nexit 101\n"


@dataclass(frozen=True)
class Image:
    """Read-only lower dirs (top first) for a host's overlayfs, plus what is in them."""

    arch: str
    flavor: str
    lowerdirs: tuple[Path, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("RKLLM_FLEET_CACHE", str(DEFAULT_CACHE)))


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses (only Debian's registry is reachable)."""
    override = os.environ.get("RKLLM_FLEET_DEBIAN_MIRROR")
    if override:
        return override
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for source in sources:
        if not source.is_file():
            continue
        text = source.read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        one_line = re.search(rf"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M)
        if one_line:
            return one_line.group(1)
    return DEFAULT_MIRROR


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _build_lock(root: Path, arch: str) -> Iterator[None]:
    """One build per arch at a time: `make test` builds the arm64 images in the background while the
    amd64 fleets of the first tests build and boot theirs."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".lock-{arch}").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _tmp_root(root: Path, arch: str) -> Path:
    return root / f"tmp-{arch}"


def _discard_stale_builds(tmp_root: Path) -> None:
    """Called under the arch's lock, so any temp build left in its temp root was interrupted."""
    if not tmp_root.exists():
        return
    for mount in mounts_under(tmp_root):
        run(["umount", "-l", mount], check=False)
    shutil.rmtree(tmp_root)


def _configure_base(root: Path, arch: str, seconds: float) -> None:
    run(["systemctl", f"--root={root}", "mask", *MASKED_UNITS])
    for unit in sorted((root / "lib/systemd/system").glob("*.service")):
        if "\nLoadCredential=" in unit.read_text():
            dropin = root / "etc/systemd/system" / f"{unit.name}.d" / "fleet-sim-no-credentials.conf"
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text(NO_CREDENTIALS_DROPIN)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/fleet-sim.conf").write_text(SSHD_DROPIN)
    # Empty machine-id: every booted copy gets its own transient id instead of sharing one.
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").unlink(missing_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    info = {"suite": SUITE, "arch": arch, "packages": list(BASE_PACKAGES),
            "build_seconds": round(seconds, 1), "script_version": BUILD_SCRIPT_VERSION}
    (root / "etc/fleet-sim-image.json").write_text(json.dumps(info, indent=2) + "\n")


def _bootstrap(target: Path, arch: str) -> None:
    # mmdebstrap installs every package in one apt run; debootstrap's second stage configured them in
    # several dpkg passes, which under qemu took 252 s for arm64 where mmdebstrap takes 138 s.
    run(["mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={arch}",
         "--include=" + ",".join(BASE_PACKAGES), SUITE, str(target), debian_mirror()])


def base_image(arch: str) -> Path:
    """Return the cached base rootfs for arch, building it (timed) if missing."""
    if arch not in ARCHES:
        raise SimError(f"unsupported arch {arch!r}; choose one of {', '.join(ARCHES)}")
    ensure_arch_runnable(arch)
    root = cache_dir()
    final = root / "rootfs" / f"{SUITE}-{arch}-{_key(BUILD_SCRIPT_VERSION, SUITE, arch, BASE_PACKAGES)}"
    if final.is_dir():
        return final
    with _build_lock(root, arch):
        if final.is_dir():
            return final
        _discard_stale_builds(_tmp_root(root, arch))
        tmp = _tmp_root(root, arch) / final.name
        tmp.parent.mkdir(parents=True)
        log(f"building {arch} rootfs (mmdebstrap {SUITE} from {debian_mirror()}) ...")
        start = time.monotonic()
        _bootstrap(tmp, arch)
        seconds = time.monotonic() - start
        _configure_base(tmp, arch, seconds)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(final)
        log(f"{arch} rootfs built in {seconds:.0f}s: {final}")
    return final


@contextlib.contextmanager
def _chroot_mounts(merged: Path) -> Iterator[None]:
    run(["mount", "-t", "proc", "proc", str(merged / "proc")])
    try:
        yield
    finally:
        run(["umount", str(merged / "proc")], check=False)


def _build_layer(base: Path, upper: Path, work: Path, merged: Path, packages: tuple[str, ...],
                 debs: Path) -> None:
    for directory in (upper, work, merged):
        directory.mkdir(parents=True)
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={base},upperdir={upper},workdir={work}", str(merged)])
    try:
        policy = merged / "usr/sbin/policy-rc.d"
        policy.write_text(NO_SERVICE_START)
        policy.chmod(0o755)
        shutil.copy("/etc/resolv.conf", merged / "etc/resolv.conf")
        (debs / "partial").mkdir(parents=True, exist_ok=True)
        with _chroot_mounts(merged):
            # The layers' downloads are kept in a per-arch cache for the next layer build.
            run(["mount", "--bind", str(debs), str(merged / "var/cache/apt/archives")])
            try:
                env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                run(["chroot", str(merged), "apt-get", "update", "-q"], env=env)
                run(["chroot", str(merged), "apt-get", "install", "-y", "-q", "--no-install-recommends",
                     *packages], env=env)
            finally:
                run(["umount", str(merged / "var/cache/apt/archives")], check=False)
        installed = [unit for unit in LAYER_DISABLED_UNITS if (merged / "lib/systemd/system" / unit).exists()]
        if installed:
            run(["systemctl", f"--root={merged}", "disable", *installed])
        policy.unlink()
    finally:
        run(["umount", str(merged)], check=False)


def layered_image(arch: str, flavor: str) -> Image:
    """The base image for arch, plus the flavor's package layer when it has one."""
    base = base_image(arch)
    packages = LAYER_PACKAGES.get(flavor)
    if not packages:
        return Image(arch, flavor, (base,))
    root = cache_dir()
    key = _key(base.name, BUILD_SCRIPT_VERSION, packages, LAYER_DISABLED_UNITS)
    final = root / "layers" / f"{arch}-{flavor}-{key}"
    if final.is_dir():
        return Image(arch, flavor, (final, base))
    with _build_lock(root, arch):
        if not final.is_dir():
            _discard_stale_builds(_tmp_root(root, arch))
            tmp = _tmp_root(root, arch) / final.name
            log(f"building {arch} {flavor} layer ({', '.join(packages)}) ...")
            start = time.monotonic()
            _build_layer(base, tmp / "upper", tmp / "work", tmp / "merged", packages, root / "debs" / arch)
            final.parent.mkdir(parents=True, exist_ok=True)
            (tmp / "upper").rename(final)
            shutil.rmtree(tmp)
            log(f"{arch} {flavor} layer built in {time.monotonic() - start:.0f}s: {final}")
    return Image(arch, flavor, (final, base))


if __name__ == "__main__":
    # `python3 -m tests.fleet.rootfs arm64-board amd64-balancer`: build (or reuse) images ahead of the
    # fleets that boot them, as .ci/run and `make test` do in the background.
    import sys

    for image in sys.argv[1:]:
        image_arch, _, image_flavor = image.partition("-")
        print(layered_image(image_arch, image_flavor).lowerdirs[0], flush=True)
