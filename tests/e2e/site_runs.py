"""site.yml runs on a simulated amd64 fleet, and one such fleet that several modules share.

test_site_refusals.py and test_driver_install.py need the same hardware (board3 with 8 GB of RAM,
board4 on rknpu 0.9.6): the refusals first, on pristine boards, then the driver install path on the
boards they provisioned. Each module still stands alone: a module that needs pristine boards gets a
freshly booted fleet whenever an earlier module has provisioned the shared one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from e2e.fleets import fleet_prefix
from fleet.sim import Fleet

from tests.support import REPO_ROOT

RECAP_LINE = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
# The shared fleet's hardware: what each module's docstring describes.
SHARED_BOARDS = ("board1", "board2", "board3", "board4")
SHARED_BOARD_RAM = ["b3=8192"]
SHARED_BOARD_DRIVER = ["b4=0.9.6"]
# Written by a provisioning run; absent on a pristine board.
PROVISIONED_PATHS = ("/opt/rkllm", "/opt/rkllm-server", "/etc/rkllm-server",
                     "/etc/systemd/system/rkllm-server.service", "/etc/ld.so.conf.d/rkllm.conf")


@dataclass(frozen=True)
class SiteRun:
    returncode: int
    output: str
    seconds: float

    def changed(self) -> dict[str, int]:
        lines = RECAP_LINE.findall(self.output)
        return {host: int(changed) for host, changed, _unreachable, _failed in lines}


@dataclass(frozen=True)
class SiteRunner:
    """Runs site.yml on `limit` unless told otherwise, with a controller cache of its own."""

    fleet: Fleet
    workdir: Path
    limit: tuple[str, ...] = SHARED_BOARDS

    def run(self, *extra: str, limit: tuple[str, ...] | None = None,
            inventories: tuple[Path, ...] = (), environment: dict[str, str] | None = None) -> SiteRun:
        sources = [arg for inventory in (self.fleet.inventory_path.parent, *inventories)
                   for arg in ("-i", str(inventory))]
        # A private controller cache keeps the fleet's first run cold; the source snapshot keeps
        # the wheel stable while the repository is being edited.
        settings = {"rkllm_lib_cache_dir": str(self.workdir / "cache"),
                    "rkllm_models_cache_dir": str(self.workdir / "cache"),
                    "rkllm_server_cache_dir": str(self.workdir / "cache"),
                    "rkllm_server_source_dir": str(self.workdir / "src")}
        hosts = self.limit if limit is None else limit
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), *sources, "site.yml",
                "--limit", ",".join(hosts), "-e", json.dumps(settings), *extra]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False,
                              env={**os.environ, **(environment or {})})
        return SiteRun(done.returncode, done.stdout + done.stderr, time.monotonic() - started)

    def assert_pristine(self, boards: tuple[str, ...] = SHARED_BOARDS) -> None:
        for name in boards:
            script = 'for p in "$@"; do [ -e "$p" ] && echo "$p"; done; true'
            present = self.fleet.board(name).exec(["sh", "-c", script, "-", *PROVISIONED_PATHS])
            assert present.stdout == "", f"{name} was changed: {present.stdout}"


def snapshot_server_source(workdir: Path) -> None:
    """Copy the server's source to workdir/src, which SiteRunner builds the board wheel from."""
    (workdir / "src").mkdir()
    shutil.copytree(REPO_ROOT / "rkllm_runtime", workdir / "src" / "rkllm_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_ROOT / "pyproject.toml", workdir / "src")


@dataclass
class SharedSiteFleet:
    """The session's shared fleet: booted on first use, replaced when a module needs it pristine again."""

    workdirs: Path
    booted: int = 0
    current: SiteRunner | None = None
    provisioned: bool = field(default=False)

    def pristine(self) -> SiteRunner:
        """The shared fleet, booted afresh unless nothing has provisioned it yet. Call provisioning()
        once the caller's provisioning runs start, so that a later pristine() does not reuse it."""
        if self.current is not None and self.provisioned:
            self.down()
        return self._runner()

    def provisioning(self) -> SiteRunner:
        """The shared fleet in whatever state earlier modules left it; from now on it is not pristine."""
        runner = self._runner()
        self.provisioned = True
        return runner

    def _runner(self) -> SiteRunner:
        if self.current is None:
            self.booted += 1
            workdir = self.workdirs / f"fleet{self.booted}"
            workdir.mkdir(parents=True)
            snapshot_server_source(workdir)
            fleet = Fleet.up(arch="amd64", boards=len(SHARED_BOARDS),
                             prefix=f"{fleet_prefix('es')}{self.booted}",
                             inventory_dir=workdir / "inventory", board_driver=SHARED_BOARD_DRIVER,
                             board_ram=SHARED_BOARD_RAM)
            self.current = SiteRunner(fleet, workdir)
            self.provisioned = False
        return self.current

    def down(self) -> None:
        if self.current is not None:
            self.current.fleet.down()
            self.current = None
