"""Shared fixtures: the C test double (built once per session) and its paths, fake models, its log."""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_models import write_model
from xdist.scheduler import LoadScopeScheduling

from tests.support import REPO_ROOT

FAKELIB_DIR = REPO_ROOT / "tests" / "fakelib"
DOUBLE_BUILD_DIR = REPO_ROOT / "build"


@pytest.fixture(scope="session")
def fakelib_dir() -> Path:
    return FAKELIB_DIR


@pytest.fixture(scope="session")
def double_build() -> Path:
    """Build the test double (host and aarch64) once; returns the build directory.

    Each pytest-xdist worker asks; the lock keeps two makes from writing the same objects at once."""
    DOUBLE_BUILD_DIR.mkdir(exist_ok=True)
    with (DOUBLE_BUILD_DIR / ".double-build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        subprocess.run(["make", "-s", "-C", str(FAKELIB_DIR)], check=True, capture_output=True, text=True)
    return DOUBLE_BUILD_DIR


@pytest.fixture(scope="session")
def double_library_path(double_build: Path) -> Path:
    return double_build / "host" / "librkllmrt.so"


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(name="tiny", reply_tokens=5, ...) -> path of a fresh fake model file."""

    def make(name: str = "tiny", **fields: object) -> Path:
        return write_model(tmp_path, name, **fields)

    return make


@pytest.fixture
def double_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point RKLLM_DOUBLE_LOG at a fresh file (read by the double at rkllm_init)."""
    log = tmp_path / "double.log"
    monkeypatch.setenv("RKLLM_DOUBLE_LOG", str(log))
    return log


# `make test` runs two pytest-xdist workers. A module runs whole on one worker, so its fixtures (a
# booted fleet, a real nginx) are set up once; the modules that share the amd64 fleet of
# tests/e2e/site_runs.py count as one. Workers take modules in collection order: the longest go first
# so that the short ones fill the end, and a fleet's idle waits (drains, timeouts, token-paced
# streams) overlap the other worker's CPU-bound work.
# The refusals need pristine boards, the driver install path provisions them: in that order.
SHARED_FLEET_MODULES = ("test_site_refusals.py", "test_driver_install.py")
LONGEST_FIRST = ("test_deployment_commands.py", "test_fleet_balancer.py", "test_fleet_ops.py",
                 "test_molecule.py", "test_fleet_ha.py", "test_site_refusals.py", "test_fleet_arm64.py")


def _module_unit(nodeid: str) -> str:
    """What runs whole on one worker: the test's module, or the group of modules sharing a fleet."""
    module_path = nodeid.split("::", 1)[0]
    return "shared-site-fleet" if Path(module_path).name in SHARED_FLEET_MODULES else module_path


class ModuleScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return _module_unit(nodeid)


@pytest.hookimpl(optionalhook=True)  # also runs without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> ModuleScheduling:
    # In collection order (below), not xdist's default of the units with the most tests first: the
    # longest units (a fleet's proofs, the Molecule run) have few tests each.
    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


def _order(item: pytest.Item) -> tuple[int, int]:
    """Longest first; the shared fleet's modules in the order they use it (pristine boards first)."""
    name = item.path.name
    if name in SHARED_FLEET_MODULES:
        return LONGEST_FIRST.index(SHARED_FLEET_MODULES[0]), SHARED_FLEET_MODULES.index(name)
    return (LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)), 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_order)  # stable: a module's own order stays


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _print_measurements(terminalreporter)
    _print_time_per_unit(terminalreporter)


def _print_measurements(terminalreporter: pytest.TerminalReporter) -> None:
    """What passing tests printed (their measurements), which a quiet run would otherwise drop."""
    printed = [report for report in terminalreporter.stats.get("passed", [])
               if report.when == "call" and report.capstdout.strip()]
    if not printed:
        return
    terminalreporter.section("measured by passing tests")
    for report in sorted(printed, key=lambda report: report.nodeid):
        terminalreporter.write_line(report.nodeid)
        for line in report.capstdout.strip().splitlines():
            terminalreporter.write_line(f"    {line}")


def _print_time_per_unit(terminalreporter: pytest.TerminalReporter) -> None:
    """Each worker's total and its units of 10 s or more (setup, calls and teardown), longest
    first: where the critical path of a run goes."""
    seconds: dict[tuple[str, str], float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if not isinstance(report, pytest.TestReport):
                continue
            gateway = getattr(getattr(report, "node", None), "gateway", None)
            key = (str(getattr(gateway, "id", "main")), _module_unit(report.nodeid))
            seconds[key] = seconds.get(key, 0.0) + report.duration
    if not seconds:
        return
    terminalreporter.section("time per unit and worker")
    for worker in sorted({worker for worker, _ in seconds}):
        units = {unit: spent for (owner, unit), spent in seconds.items() if owner == worker}
        terminalreporter.write_line(f"{worker}: {sum(units.values()) / 60:.1f} min")
        for unit, spent in sorted(units.items(), key=lambda item: -item[1]):
            if spent >= 10:
                terminalreporter.write_line(f"    {spent:7.1f} s  {unit}")
