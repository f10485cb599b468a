"""Board hardware fixtures: files standing in for debugfs, device tree and /proc/meminfo.

The rknpu debugfs directory is a link into a tmpfs that the board's boot-time writer fills from the
kernel it booted (tests/fleet/kernels.py), so a board's driver version changes only by a reboot.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import kernels
from .commands import SimError

FIXTURE_ROOT = "/srv/fixtures"
DEBUGFS_DIR = f"{FIXTURE_ROOT}/rknpu"
COMPATIBLE_PATH = f"{FIXTURE_ROOT}/device-tree/compatible"
MEMINFO_PATH = f"{FIXTURE_ROOT}/meminfo"
DEFAULT_DRIVER = "0.9.8"
DEFAULT_RAM_MB = 16384
# NUL-separated like /proc/device-tree/compatible on a Rock 5B.
COMPATIBLE_ROCK5B = "radxa,rock-5b\0rockchip,rk3588\0"


@dataclass(frozen=True)
class BoardHardware:
    driver_version: str = DEFAULT_DRIVER
    ram_mb: int = DEFAULT_RAM_MB

    def files(self) -> dict[str, str]:
        total_kb = self.ram_mb * 1024
        meminfo = (f"MemTotal:       {total_kb:>8} kB\nMemFree:        {total_kb * 9 // 10:>8} kB\n"
                   f"MemAvailable:   {total_kb * 9 // 10:>8} kB\nSwapTotal:             0 kB\n")
        return {
            **kernels.image_files(self.driver_version),
            COMPATIBLE_PATH: COMPATIBLE_ROCK5B,
            MEMINFO_PATH: meminfo,
        }

    def symlinks(self) -> dict[str, str]:
        return kernels.image_symlinks(DEBUGFS_DIR)


def board_index(key: str, boards: int) -> int:
    """'b2' or 'board2' -> 2, checked against the fleet size."""
    digits = key.removeprefix("board").removeprefix("b")
    if not digits.isdigit() or not 1 <= int(digits) <= boards:
        raise SimError(f"unknown board {key!r}: use b1..b{boards} (or board1..board{boards})")
    return int(digits)


def parse_overrides(pairs: list[str], boards: int) -> dict[int, str]:
    """['b2=0.9.6'] -> {2: '0.9.6'}."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise SimError(f"expected BOARD=VALUE, got {pair!r}")
        overrides[board_index(key, boards)] = value
    return overrides


def board_hardware(boards: int, drivers: dict[int, str], ram_mb: dict[int, str]) -> dict[int, BoardHardware]:
    hardware = {}
    for index in range(1, boards + 1):
        ram = ram_mb.get(index, str(DEFAULT_RAM_MB))
        if not ram.isdigit():
            raise SimError(f"board{index}: RAM must be a number of MiB, got {ram!r}")
        driver = kernels.check_driver(drivers.get(index, DEFAULT_DRIVER))
        hardware[index] = BoardHardware(driver, int(ram))
    return hardware
