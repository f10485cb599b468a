"""Simulated board kernels: fake kernel images, the boot-time writer of the NPU fixtures, kernel .debs.

A board "boots" the newest /boot/vmlinuz-* (like an extlinux menu's default entry; older kernels
stay in the menu). A fake kernel image is a text file naming its NPU driver; at every container boot
a oneshot unit writes what that kernel would report (rknpu debugfs `version` and `load`, the kernel
release, /sys/module/rocket for mainline kernels) into a tmpfs, so installing a kernel package
changes nothing the board reports until it reboots.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from .commands import SimError

BOOT_DIR = "/run/fleet-sim-boot"
RKNPU_DIR = f"{BOOT_DIR}/rknpu"
KERNEL_RELEASE_PATH = f"{BOOT_DIR}/osrelease"
ROCKET_MODULE_PATH = f"{BOOT_DIR}/module/rocket"
# The kernel the board image ships with (Radxa's 6.1.43 BSP kernels reported rknpu 0.9.6).
IMAGE_KERNEL_RELEASE = "6.1.43-fleetsim"
ROCKET = "rocket"
NPU_LOAD_IDLE = "NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,\n"
NPU_FREQUENCY_HZ = 1_000_000_000
# Kernel packages on the mirror: rknpu version -> kernel release (newer releases sort after the image's).
PACKAGED_KERNELS = {"0.9.8": "6.1.84-fleetsim", "0.9.7": "6.1.75-fleetsim"}
WRITER_PATH = "/usr/local/libexec/fleet-sim-boot"
UNIT_NAME = "fleet-sim-boot.service"
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")

BOOT_WRITER = f"""#!/bin/sh
# fleet-sim: what the booted kernel reports, written once per boot into a tmpfs.
set -eu
out={BOOT_DIR}
rm -rf "$out"
mkdir -p "$out"
image=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
[ -n "$image" ] || exit 0
printf '%s\\n' "${{image#/boot/vmlinuz-}}" > "$out/osrelease"
npu=$(sed -n 's/^npu //p' "$image")
case "$npu" in
    {ROCKET}) mkdir -p "$out/module/rocket" ;;
    rknpu\\ *)
        mkdir -p "$out/rknpu"
        printf 'RKNPU driver: v%s\\n' "${{npu#rknpu }}" > "$out/rknpu/version"
        printf '%s\\n' '{NPU_LOAD_IDLE.rstrip(chr(10))}' > "$out/rknpu/load"
        printf '%s\\n' {NPU_FREQUENCY_HZ} > "$out/rknpu/freq" ;;
esac
"""

BOOT_UNIT = f"""[Unit]
Description=fleet-sim: NPU fixtures of the booted kernel
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target ssh.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh {WRITER_PATH}

[Install]
WantedBy=sysinit.target
"""


def check_driver(driver: str) -> str:
    """A `--board-driver` value: an rknpu version (0.9.6) or `rocket` (a mainline kernel)."""
    if driver != ROCKET and not _VERSION.match(driver):
        raise SimError(f"driver must be an rknpu version like 0.9.6 or {ROCKET!r}, got {driver!r}")
    return driver


def kernel_image(release: str, driver: str) -> str:
    """Content of a fake /boot/vmlinuz-<release> whose NPU driver is rknpu <driver> (or rocket)."""
    npu = ROCKET if driver == ROCKET else f"rknpu {driver}"
    return f"fleet-sim kernel {release}\nnpu {npu}\n"


def image_files(driver: str) -> dict[str, str]:
    """Files of a board image whose kernel carries driver, plus the boot-time writer."""
    return {
        f"/boot/vmlinuz-{IMAGE_KERNEL_RELEASE}": kernel_image(IMAGE_KERNEL_RELEASE, driver),
        WRITER_PATH: BOOT_WRITER,
        f"/etc/systemd/system/{UNIT_NAME}": BOOT_UNIT,
    }


def image_symlinks(debugfs_dir: str) -> dict[str, str]:
    """Symlinks of a board image: the unit's enablement and the debugfs fixture dir into the tmpfs.

    The debugfs link is relative so that following it from the host stays inside the board's root.
    """
    depth = debugfs_dir.strip("/").count("/")
    return {
        f"/etc/systemd/system/sysinit.target.wants/{UNIT_NAME}": f"/etc/systemd/system/{UNIT_NAME}",
        debugfs_dir: "../" * depth + RKNPU_DIR.lstrip("/"),
    }


def package_name(release: str) -> str:
    return f"linux-image-{release}"


def build_kernel_deb(release: str, driver: str, arch: str, target_dir: Path) -> Path:
    """A real kernel-like .deb (dpkg-deb) installing /boot/vmlinuz-<release>; returns its path."""
    name = package_name(release)
    target = target_dir / f"{name}_1.0_{arch}.deb"
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / name
        (tree / "DEBIAN").mkdir(parents=True)
        (tree / "boot").mkdir()
        (tree / "boot" / f"vmlinuz-{release}").write_text(kernel_image(release, driver))
        (tree / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: 1.0\nArchitecture: {arch}\nSection: kernel\nPriority: optional\n"
            f"Maintainer: rkllm-fleet simulator <fleet-sim@localhost>\n"
            f"Description: simulated vendor kernel {release} with rknpu {driver}\n")
        target_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(target)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SimError(f"dpkg-deb --build {name} failed: {done.stderr.strip()}")
    return target
