"""site.yml refuses bad inventories in preflight, before any board is touched, with one line per board;
on good boards check mode passes on pristine boards, a cold run provisions them and a second run
changes nothing. The module runs on pristine boards of the amd64 fleet it shares with
test_driver_install.py (tests/e2e/site_runs.py): board1/board2 are healthy, board3 has 8 GB of RAM and
board4 runs rknpu 0.9.6, so every refusal is a different inventory on the same boards."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from e2e.site_runs import REPO_ROOT, SHARED_BOARDS, SharedSiteFleet, SiteRun, SiteRunner

# A cold site.yml takes minutes on a loaded 2-core machine: more than the 300 s default per test.
pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

GOOD_BOARDS = ("board1", "board2", "board3")
ALL_BOARDS = SHARED_BOARDS


@pytest.fixture(scope="module")
def site(shared_site_fleet: SharedSiteFleet) -> SiteRunner:
    return dataclasses.replace(shared_site_fleet.pristine(), limit=GOOD_BOARDS)


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
    board2 = site.fleet.board("board2")
    board2.write_file(compatible, "radxa,rock-3a\0rockchip,rk3566\0")
    override = site.workdir / "rk3566.yml"
    override.write_text(yaml.safe_dump(
        {"all": {"hosts": {"board2": {"rknpu_driver_devicetree_compatible_path": compatible}}}}))
    try:
        output = refused(site.run(inventories=(override,)))
    finally:
        board2.exec(["rm", "-f", compatible])
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
def cold_run(shared_site_fleet: SharedSiteFleet, site: SiteRunner, check_run: SiteRun) -> SiteRun:
    shared_site_fleet.provisioning()
    return site.run()


def test_check_mode_passes_on_pristine_boards(site: SiteRunner, check_run: SiteRun) -> None:
    assert check_run.returncode == 0, check_run.output[-6000:]
    assert set(check_run.changed()) == set(GOOD_BOARDS)
    site.assert_pristine()


def test_cold_run_provisions_and_second_run_changes_nothing(site: SiteRunner, cold_run: SiteRun) -> None:
    assert cold_run.returncode == 0, cold_run.output[-6000:]
    assert all(cold_run.changed()[board] > 0 for board in GOOD_BOARDS), cold_run.changed()
    warm = site.run()
    print(f"[amd64 fleet] cold site.yml on 3 boards: {cold_run.seconds:.0f} s; "
          f"second run: {warm.seconds:.0f} s, changed {warm.changed()}")
    assert warm.returncode == 0, warm.output[-6000:]
    assert set(warm.changed()) == set(GOOD_BOARDS)
    assert all(changed == 0 for changed in warm.changed().values()), warm.output[-6000:]
    for board in GOOD_BOARDS:
        show = ["systemctl", "show", "-p", "ActiveState,User", "rkllm-server"]
        shown = site.fleet.board(board).exec(show).stdout
        assert "ActiveState=active" in shown and "User=rkllm" in shown, shown


# What ansible-core prints when a play runs on a strategy it does not ship, as Mitogen's.
FOREIGN_STRATEGY_WARNING = "Use of strategy plugins not included in ansible.builtin are deprecated"


def test_ansibles_own_executor_finds_nothing_to_change(site: SiteRunner, cold_run: SiteRun) -> None:
    """ansible.cfg runs the plays with Mitogen; docs/DEPLOYMENT.md gives ANSIBLE_STRATEGY=linear as the
    way back to Ansible's own executor, which must find the fleet Mitogen provisioned complete."""
    assert cold_run.returncode == 0, cold_run.output[-6000:]
    assert FOREIGN_STRATEGY_WARNING in cold_run.output
    stock = site.run(environment={"ANSIBLE_STRATEGY": "linear"})
    print(f"[amd64 fleet] site.yml on Ansible's own executor: {stock.seconds:.0f} s, "
          f"changed {stock.changed()}")
    assert stock.returncode == 0, stock.output[-6000:]
    assert FOREIGN_STRATEGY_WARNING not in stock.output
    assert set(stock.changed()) == set(GOOD_BOARDS)
    assert all(changed == 0 for changed in stock.changed().values()), stock.output[-6000:]


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
