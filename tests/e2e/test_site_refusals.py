"""site.yml refuses bad inventories in preflight, before any board is touched, with one line per board;
on good boards check mode passes on pristine boards, a cold run provisions them and a second run
changes nothing. One amd64 fleet is booted for the module: board1/board2 are healthy, board3 has
8 GB of RAM and board4 runs rknpu 0.9.6, so every refusal is a different inventory on the same boards."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from fleet.sim import Fleet

pytestmark = pytest.mark.fleet

REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD_BOARDS = ("board1", "board2", "board3")
ALL_BOARDS = (*GOOD_BOARDS, "board4")
RECAP_LINE = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
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
    fleet: Fleet
    workdir: Path

    def run(self, *extra: str, limit: tuple[str, ...] = GOOD_BOARDS,
            inventories: tuple[Path, ...] = ()) -> SiteRun:
        sources = [arg for inventory in (self.fleet.inventory_path.parent, *inventories)
                   for arg in ("-i", str(inventory))]
        # A private controller cache keeps the module's first run cold; the source snapshot keeps
        # the wheel stable while the repository is being edited.
        settings = {"rkllm_lib_cache_dir": str(self.workdir / "cache"),
                    "rkllm_models_cache_dir": str(self.workdir / "cache"),
                    "rkllm_server_cache_dir": str(self.workdir / "cache"),
                    "rkllm_server_source_dir": str(self.workdir / "src")}
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), *sources, "site.yml",
                "--limit", ",".join(limit), "-e", json.dumps(settings), *extra]
        started = time.monotonic()
        done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False)
        return SiteRun(done.returncode, done.stdout + done.stderr, time.monotonic() - started)

    def assert_pristine(self, boards: tuple[str, ...] = ALL_BOARDS) -> None:
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


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SiteRunner]:
    workdir = tmp_path_factory.mktemp("site")
    snapshot_server_source(workdir)
    fleet = Fleet.up(arch="amd64", boards=4, prefix=f"er{os.getpid() % 0x10000:04x}",
                     inventory_dir=workdir / "inventory", board_driver=["b4=0.9.6"], board_ram=["b3=8192"])
    try:
        yield SiteRunner(fleet, workdir)
    finally:
        fleet.down()


def refused(run: SiteRun) -> str:
    assert run.returncode != 0, run.output[-4000:]
    assert "PLAY [Provision the boards]" not in run.output, "the run went past preflight"
    return run.output


def test_wrong_library_checksum_is_refused_and_nothing_is_cached(site: SiteRunner) -> None:
    wrong = "0" * 64
    output = refused(site.run("-e", f"rkllm_lib_sha256={wrong}"))
    mismatch = r"rkllm_lib: librkllmrt.so from \S+/librkllmrt.so failed: sha256 did not match " + wrong
    assert re.search(mismatch, output), output[-4000:]
    assert "nothing was installed on any board" in output
    assert not (site.workdir / "cache" / "lib" / wrong / "librkllmrt.so").exists()
    site.assert_pristine()


def test_unknown_model_is_refused_on_every_board(site: SiteRunner) -> None:
    output = refused(site.run("-e", json.dumps({"rkllm_models_enabled": ["Llama-9000"]})))
    for board in GOOD_BOARDS:
        line = (f"{board}: unknown model Llama-9000 in rkllm_models_enabled; the catalog has "
                "Qwen2.5-1.5B-Instruct, DeepSeek-R1-Distill-Qwen-1.5B")
        assert line in output, output[-4000:]
    site.assert_pristine()


def test_board_with_another_soc_is_refused(site: SiteRunner) -> None:
    compatible = "/srv/fixtures/device-tree/compatible-rk3566"
    site.fleet.board("board2").write_file(compatible, "radxa,rock-3a\0rockchip,rk3566\0")
    override = site.workdir / "rk3566.yml"
    override.write_text(yaml.safe_dump(
        {"all": {"hosts": {"board2": {"rknpu_driver_devicetree_compatible_path": compatible}}}}))
    output = refused(site.run(inventories=(override,)))
    assert (f"board2: unsupported board: {compatible} says radxa,rock-3a rockchip,rk3566; RKLLM 1.2.3 fleets "
            "need one of rockchip,rk3588, rockchip,rk3588s") in output, output[-4000:]
    assert "board1: unsupported board" not in output
    site.assert_pristine()


def test_x86_board_is_refused_when_aarch64_is_required(site: SiteRunner) -> None:
    output = refused(site.run("-e", "rknpu_driver_require_aarch64=true"))
    line = "board1: architecture is x86_64, RKLLM 1.2.3 needs an aarch64 RK3588 board"
    assert line in output, output[-4000:]
    site.assert_pristine()


def test_old_driver_stops_the_whole_fleet(site: SiteRunner) -> None:
    run = site.run(limit=(*ALL_BOARDS, "balancer1"))
    output = refused(run)
    assert "balancer1" not in run.changed(), "the balancer plays must not start after a failed preflight"
    assert ("board4: rknpu driver 0.9.6 is too old for RKLLM 1.2.3 (needs >= 0.9.7): boot a Rockchip vendor "
            "kernel (5.10 or 6.1) that ships rknpu 0.9.8") in output, output[-4000:]
    assert re.search(r"^fatal: \[board4\]", output, re.M)
    assert not re.search(r"^fatal: \[board[123]\]", output, re.M), "healthy boards must not be refused"
    site.assert_pristine()


def test_7b_model_is_refused_on_the_8gb_board_with_the_numbers(site: SiteRunner) -> None:
    defaults = yaml.safe_load((REPO_ROOT / "roles/rkllm_models/defaults/main.yml").read_text())
    seven_b = {**defaults["rkllm_models_catalog"][1], "name": "DeepSeek-R1-Distill-Qwen-7B", "size_mb": 8100,
               "memory_mb": 8200, "expected_tokens_per_second": 4.0, "sha256": "ab" * 32,
               "url": "https://models.example.internal/DeepSeek-R1-Distill-Qwen-7B_w8a8_rk3588.rkllm"}
    catalog = [*defaults["rkllm_models_catalog"], seven_b]
    output = refused(site.run("-e", json.dumps({"rkllm_models_catalog": catalog,
                                                "rkllm_models_enabled": ["DeepSeek-R1-Distill-Qwen-7B"]})))
    assert ("board3: model DeepSeek-R1-Distill-Qwen-7B needs 8200 MB of RAM but the board has 8192 MB "
            "(MemTotal 8388608 kB in /srv/fixtures/meminfo) minus 1024 MB reserved = 7168 MB") in output, \
        output[-4000:]
    assert "board1: model DeepSeek-R1-Distill-Qwen-7B needs" not in output
    site.assert_pristine()


@pytest.fixture(scope="module")
def check_run(site: SiteRunner) -> SiteRun:
    return site.run("--check")


@pytest.fixture(scope="module")
def cold_run(site: SiteRunner, check_run: SiteRun) -> SiteRun:
    return site.run()


def test_check_mode_passes_on_pristine_boards(site: SiteRunner, check_run: SiteRun) -> None:
    assert check_run.returncode == 0, check_run.output[-6000:]
    assert set(check_run.changed()) == set(GOOD_BOARDS)
    site.assert_pristine()


def test_cold_run_provisions_and_second_run_changes_nothing(site: SiteRunner, cold_run: SiteRun,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert cold_run.returncode == 0, cold_run.output[-6000:]
    assert all(cold_run.changed()[board] > 0 for board in GOOD_BOARDS), cold_run.changed()
    warm = site.run()
    with capsys.disabled():
        print(f"\n[amd64 fleet] cold site.yml on 3 boards: {cold_run.seconds:.0f} s; "
              f"second run: {warm.seconds:.0f} s, changed {warm.changed()}")
    assert warm.returncode == 0, warm.output[-6000:]
    assert set(warm.changed()) == set(GOOD_BOARDS)
    assert all(changed == 0 for changed in warm.changed().values()), warm.output[-6000:]
    for board in GOOD_BOARDS:
        show = ["systemctl", "show", "-p", "ActiveState,User", "rkllm-server"]
        shown = site.fleet.board(board).exec(show).stdout
        assert "ActiveState=active" in shown and "User=rkllm" in shown, shown


def test_bad_model_checksum_leaves_the_installed_model_serving(site: SiteRunner, cold_run: SiteRun) -> None:
    assert cold_run.returncode == 0, cold_run.output[-6000:]
    inventory = yaml.safe_load(site.fleet.inventory_path.read_text())
    good = inventory["all"]["vars"]["rkllm_models_catalog_overrides"]["Qwen2.5-1.5B-Instruct"]
    wrong = "f" * 64
    overrides = {"Qwen2.5-1.5B-Instruct": {"url": good["url"], "sha256": wrong}}
    output = refused(site.run("-e", json.dumps({"rkllm_models_catalog_overrides": overrides})))
    mismatch = r"rkllm_models: Qwen2.5-1.5B-Instruct from \S+ failed: sha256 did not match " + wrong
    assert re.search(mismatch, output), output[-4000:]
    model = "/opt/rkllm/models/current/Qwen2.5-1.5B-Instruct.rkllm"
    for board in GOOD_BOARDS:
        host = site.fleet.board(board)
        assert host.exec(["sha256sum", model]).stdout.split()[0] == good["sha256"]
        assert host.exec(["systemctl", "is-active", "rkllm-server"]).stdout.strip() == "active"
