"""Make sure foreign-arch (arm64) binaries run on this host through qemu-user-static."""

from __future__ import annotations

import platform
from pathlib import Path

from .commands import SimError, run

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU_AARCH64 = Path("/usr/bin/qemu-aarch64-static")
# ELF64 little-endian, e_machine = EM_AARCH64 (183); same magic/mask as Debian's qemu-user-static entry.
AARCH64_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
AARCH64_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


def _entry_ok(entry: Path) -> bool:
    if not entry.exists():
        return False
    text = entry.read_text()
    flags = next((line.split(":", 1)[1] for line in text.splitlines() if line.startswith("flags:")), "")
    # F (fix-binary) opens the interpreter at registration time, so it works inside chroots and
    # containers whose rootfs has no qemu binary.
    return text.startswith("enabled") and "F" in flags


def ensure_arch_runnable(debian_arch: str) -> None:
    """Register qemu-aarch64 with the F flag when arm64 is asked for on a non-arm64 host."""
    if debian_arch != "arm64" or platform.machine() == "aarch64":
        return
    if not (BINFMT_DIR / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)])
    entry = BINFMT_DIR / "qemu-aarch64"
    if _entry_ok(entry):
        return
    run(["update-binfmts", "--enable", "qemu-aarch64"], check=False)
    if _entry_ok(entry):
        return
    if entry.exists():
        entry.write_text("-1")
    if not QEMU_AARCH64.exists():
        raise SimError(f"{QEMU_AARCH64} missing: apt-get install qemu-user-static binfmt-support")
    registration = f":qemu-aarch64:M::{AARCH64_MAGIC}:{AARCH64_MASK}:{QEMU_AARCH64}:FP"
    (BINFMT_DIR / "register").write_text(registration)
    if not _entry_ok(entry):
        raise SimError("could not register qemu-aarch64 with binfmt_misc (flag F)")
