"""Operating the simulated fleet: 3 amd64 boards provisioned by site.yml and ansible/balancer.yml.
The monitoring role installs the rknpu textfile collector on the boards (its packages need a
Debian mirror the offline boards do not have, so only the collector part runs here).
A real Prometheus on the controller, configured by the monitoring role's templates, scrapes the
boards: stopping board2's server fires RkllmBoardDown, starting it clears the alert. rkllm-bench
(ansible/benchmark.yml) flags board2, whose double decodes below 80 % of the catalog speed."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.playbooks import playbook
from fleet.sim import Fleet
from unit.monitoring_harness import (
    FAST_ALERTING,
    board_down_alerts,
    board_health,
    render_monitoring,
    running_prometheus,
)
from unit.server_harness import free_port, wait_until

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

REPO_ROOT = Path(__file__).resolve().parents[2]
QWEN, PHI = "Qwen2.5-1.5B-Instruct", "Phi-3-mini-3.8B"
CATALOG = "\n".join([
    "rkllm_models_catalog:",
    *[f"  - {{name: {name}, url: SET-ME, sha256: SET-ME, size_mb: {size}, memory_mb: {memory},"
      f" toolkit_version: '1.2.3', kind: quick, template: chatml, context_length: 4096,"
      f" expected_tokens_per_second: {speed}}}"
      for name, size, memory, speed in ((QWEN, 1900, 1660, 16.3), (PHI, 3900, 3748, 7.5))],
]) + "\n"


def controller_address(fleet: Fleet) -> str:
    return str(ipaddress.IPv4Network(fleet.state.subnet)[1])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prefix = f"op{os.getpid() % 0x10000:04x}"
    inventory = tmp_path_factory.mktemp("fleet") / "inventory"
    started = Fleet.up(arch="amd64", boards=3, prefix=prefix, inventory_dir=inventory,
                       board_ram=["board2=8192", "board3=6144"])
    try:
        for directory in ("group_vars", "host_vars"):
            (inventory / directory).mkdir()
        (inventory / "group_vars/rkllm_boards.yml").write_text(CATALOG)
        # The controller scrapes and benchmarks the boards directly.
        (inventory / "group_vars/all.yml").write_text(
            f"fleet_firewall_serving_extra_sources: ['{controller_address(started)}']\n")
        # board2 decodes at 9 tokens/s where 16.3 are expected: a board with unpinned clocks.
        (inventory / "host_vars/board2.yml").write_text("rkllm_server_environment: {RKLLM_DOUBLE_TPS: '9'}\n")
        (inventory / "host_vars/board3.yml").write_text(f"rkllm_models_enabled: [{PHI}]\n")
        playbook(started, "site.yml")
        playbook(started, "ansible/balancer.yml")
        yield started
    finally:
        started.down()


@pytest.fixture
def prometheus(fleet: Fleet, tmp_path: Path) -> Iterator[str]:
    listen = f"127.0.0.1:{free_port()}"
    render = tmp_path / "prometheus"
    run = render_monitoring(render, {**FAST_ALERTING, "monitoring_prometheus_listen_address": listen},
                            inventory=_inventory(fleet))
    assert run.returncode == 0, run.stdout + run.stderr
    with running_prometheus(render / "prometheus.yml", tmp_path / "tsdb", listen) as url:
        yield url


def _inventory(fleet: Fleet) -> dict[str, Any]:
    return {"all": {"children": {
        "rkllm_boards": {"hosts": {b.name: {"ansible_host": b.address} for b in fleet.boards}},
        "rkllm_balancers": {"hosts": {fleet.balancer.name: {"ansible_host": fleet.balancer.address}}},
    }}}


def test_board_down_alert_fires_and_clears_on_the_fleet(fleet: Fleet, prometheus: str) -> None:
    all_up = {"board1": "up", "board2": "up", "board3": "up"}
    wait_until(lambda: board_health(prometheus) == all_up, timeout=60, interval=0.5)
    assert board_down_alerts(prometheus) == {}
    fleet.board("board2").exec(["systemctl", "stop", "rkllm-server"])
    try:
        wait_until(lambda: board_down_alerts(prometheus) == {"board2": "firing"}, timeout=60, interval=0.5)
    finally:
        fleet.board("board2").exec(["systemctl", "start", "rkllm-server"])
    wait_until(lambda: board_down_alerts(prometheus) == {}, timeout=90, interval=0.5)
    assert board_health(prometheus) == all_up


def test_benchmark_flags_the_slow_board(fleet: Fleet, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    playbook(fleet, "ansible/benchmark.yml", "-e", json.dumps({"bench_output_dir": str(out),
                                                               "bench_max_tokens": 16}))
    report = (out / "report.md").read_text()
    slow_section = report.split("## Boards below 80%")[1].split("\n## ")[0]
    assert f"**board2** running **{QWEN}**" in slow_section
    assert "board1" not in slow_section and "board3" not in slow_section
    assert f"| 3.8B | Phi3-3.8B | 1022 | 7.50 | 3748 | {PHI} |" in report
    through = [line for line in report.splitlines() if line.startswith((f"| {QWEN} |", f"| {PHI} |"))]
    assert len(through) == 6 and all(" | 200 | " in line for line in through)
    for chart in ("tokens_per_second.png", "ttft.png", "memory.png"):
        assert (out / chart).stat().st_size > 5000


def test_rknpu_textfile_collector_runs_on_the_boards(fleet: Fleet) -> None:
    fixtures = "/srv/fixtures/rknpu"
    playbook(fleet, "ansible/monitoring.yml", "--tags", "monitoring_rknpu", "-e", json.dumps({
        "monitoring_rknpu_load_path": f"{fixtures}/load", "monitoring_rknpu_freq_path": f"{fixtures}/freq",
        "monitoring_rknpu_version_path": f"{fixtures}/version",
    }))
    for board in fleet.boards:
        timer = board.exec(["systemctl", "is-active", "rknpu-textfile-collector.timer"], check=False)
        assert timer.stdout.strip() == "active"
        published = board.exec(["cat", "/var/lib/prometheus/node-exporter/rknpu.prom"]).stdout
        assert "rknpu_driver_version_code 908" in published
        assert 'rknpu_load_percent{core="2"}' in published
        assert 'rknpu_collector_file_readable{file="version"} 1' in published
