"""A real Prometheus (Debian's binary) scrapes two real rkllm-server processes: stopping one makes
RkllmBoardDown fire, starting it again clears it. Intervals and `for:` are shortened by variables."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from local_servers import LocalServer, local_servers
from monitoring_harness import PROMETHEUS, render_monitoring
from server_harness import free_port, wait_until

TINY = Path(__file__).resolve().parents[1] / "fakelib/models/tiny-flat.rkllm"


@pytest.fixture
def two_boards(double_library_path: Path, tmp_path: Path) -> Iterator[list[LocalServer]]:
    servers = [LocalServer(double_library_path, {"tiny": TINY}, tmp_path) for _ in range(2)]
    with local_servers(servers):
        yield servers


@pytest.fixture
def prometheus(two_boards: list[LocalServer], tmp_path: Path) -> Iterator[str]:
    listen = f"127.0.0.1:{free_port()}"
    inventory = {"all": {"children": {"rkllm_boards": {"hosts": {
        f"board{i + 1}": {"ansible_host": "127.0.0.1", "monitoring_rkllm_server_port": server.port}
        for i, server in enumerate(two_boards)
    }}}}}
    render = tmp_path / "prometheus"
    run = render_monitoring(render, {
        "monitoring_scrape_interval": "1s", "monitoring_evaluation_interval": "1s",
        "monitoring_scrape_timeout": "1s", "monitoring_alert_board_down_for": "2s",
        "monitoring_prometheus_listen_address": listen,
    }, inventory=inventory)
    assert run.returncode == 0, run.stdout + run.stderr
    log = (tmp_path / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={render / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address={listen}"], stdout=log, stderr=log,
    )
    log.close()
    try:
        yield f"http://{listen}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def api(prometheus: str, path: str) -> Any:
    try:
        response = httpx.get(f"{prometheus}/api/v1/{path}", timeout=2.0)
    except httpx.TransportError:
        return None
    return response.json()["data"] if response.status_code == 200 else None


def board_health(prometheus: str) -> dict[str, str]:
    targets = (api(prometheus, "targets") or {}).get("activeTargets", [])
    return {t["labels"]["board"]: t["health"] for t in targets if t["labels"]["job"] == "rkllm"}


def boards_down_alerts(prometheus: str) -> dict[str, str]:
    alerts = (api(prometheus, "alerts") or {}).get("alerts", [])
    return {a["labels"]["board"]: a["state"] for a in alerts if a["labels"]["alertname"] == "RkllmBoardDown"}


def test_board_down_alert_fires_and_clears(prometheus: str, two_boards: list[LocalServer]) -> None:
    wait_until(lambda: board_health(prometheus) == {"board1": "up", "board2": "up"}, timeout=30, interval=0.2)
    assert boards_down_alerts(prometheus) == {}

    two_boards[1].stop()
    wait_until(lambda: boards_down_alerts(prometheus) == {"board2": "firing"}, timeout=30, interval=0.2)
    assert board_health(prometheus)["board1"] == "up"

    two_boards[1].start()
    wait_until(lambda: boards_down_alerts(prometheus) == {}, timeout=30, interval=0.2)
    assert board_health(prometheus) == {"board1": "up", "board2": "up"}
