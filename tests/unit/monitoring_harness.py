"""Renders the monitoring role's templates with ansible-playbook (connection local) for the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
RENDER_PLAYBOOK = REPO / "tests/unit/ops_fixtures/render_monitoring.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"

# Two boards (4 GiB and 16 GiB class) and a balancer that is also the monitor host.
TEST_INVENTORY: dict[str, Any] = {
    "all": {
        "children": {
            "rkllm_boards": {
                "hosts": {
                    "board1": {"ansible_host": "10.0.0.11"},
                    "board2": {"ansible_host": "10.0.0.12", "rkllm_server_port": 8090},
                }
            },
            "rkllm_balancers": {"hosts": {"balancer1": {"ansible_host": "10.0.0.2"}}},
            "rkllm_monitor": {"hosts": {"balancer1": {}}},
        }
    }
}

# Scrape and evaluate every second and fire RkllmBoardDown after 3 s, for the live tests.
FAST_ALERTING = {
    "monitoring_scrape_interval": "1s", "monitoring_evaluation_interval": "1s",
    "monitoring_scrape_timeout": "1s", "monitoring_alert_board_down_for": "3s",
}

TEST_CATALOG = [
    {"name": "Qwen2.5-1.5B-Instruct", "memory_mb": 1659},
    {"name": "Phi-3-mini-4k-instruct", "memory_mb": 3748},
]


def render_monitoring(
    out_dir: Path, extra_vars: dict[str, Any] | None = None, inventory: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    """Render into out_dir (rules under out_dir/rules); returns the finished ansible-playbook run."""
    (out_dir / "rules").mkdir(parents=True, exist_ok=True)
    inventory_path = out_dir / "inventory.yml"
    inventory_path.write_text(yaml.safe_dump(inventory or TEST_INVENTORY))
    variables: dict[str, Any] = {
        "render_dir": str(out_dir),
        "monitoring_prometheus_config_dir": str(out_dir),
        "monitoring_prometheus_rules_dir": str(out_dir / "rules"),
        "monitoring_promtool_path": PROMTOOL,
        "monitoring_amtool_path": AMTOOL,
        "monitoring_model_catalog": TEST_CATALOG,
        **(extra_vars or {}),
    }
    return subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", str(inventory_path), str(RENDER_PLAYBOOK),
         "-e", json.dumps(variables)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )


@contextmanager
def running_prometheus(config: Path, data_dir: Path, listen: str) -> Iterator[str]:
    """Debian's Prometheus binary on `listen` with a rendered configuration; yields its base URL."""
    log = (data_dir.parent / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
         f"--web.listen-address={listen}"], stdout=log, stderr=log,
    )
    log.close()
    try:
        yield f"http://{listen}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def prometheus_api(prometheus: str, path: str) -> Any:
    """`data` of a Prometheus API answer, or None while it is not answering."""
    try:
        response = httpx.get(f"{prometheus}/api/v1/{path}", timeout=2.0)
    except httpx.TransportError:
        return None
    return response.json()["data"] if response.status_code == 200 else None


def board_health(prometheus: str) -> dict[str, str]:
    """Scrape health of each board's rkllm-server target."""
    targets = (prometheus_api(prometheus, "targets") or {}).get("activeTargets", [])
    return {t["labels"]["board"]: t["health"] for t in targets if t["labels"]["job"] == "rkllm"}


def board_down_alerts(prometheus: str) -> dict[str, str]:
    """State of RkllmBoardDown per board."""
    alerts = (prometheus_api(prometheus, "alerts") or {}).get("alerts", [])
    return {a["labels"]["board"]: a["state"] for a in alerts if a["labels"]["alertname"] == "RkllmBoardDown"}
