"""Renders the monitoring role's templates with ansible-playbook (connection local) for the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support import REPO_ROOT

RENDER_PLAYBOOK = REPO_ROOT / "tests/component/ops_fixtures/render_monitoring.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"

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

# Scrape and evaluate every second, fire RkllmBoardDown after 3 s and notify within a second, for
# the live tests.
FAST_ALERTING = {
    "monitoring_scrape_interval": "1s", "monitoring_evaluation_interval": "1s",
    "monitoring_scrape_timeout": "1s", "monitoring_alert_board_down_for": "3s",
    "monitoring_alertmanager_group_wait": "1s", "monitoring_alertmanager_group_interval": "1s",
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
        [str(REPO_ROOT / ".venv/bin/ansible-playbook"), "-i", str(inventory_path), str(RENDER_PLAYBOOK),
         "-e", json.dumps(variables)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=False,
    )


@contextmanager
def _running(argv: Sequence[str], log_path: Path) -> Iterator[None]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def running_prometheus(config: Path, data_dir: Path, listen: str) -> Iterator[str]:
    """Debian's Prometheus binary on `listen` with a rendered configuration; yields its base URL."""
    with _running([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
                   f"--web.listen-address={listen}"], data_dir.parent / "prometheus.log"):
        yield f"http://{listen}"


@contextmanager
def running_alertmanager(config: Path, data_dir: Path, listen: str) -> Iterator[str]:
    """Debian's Alertmanager binary on `listen`, alone (no cluster port); yields its base URL."""
    with _running([ALERTMANAGER, f"--config.file={config}", f"--storage.path={data_dir}",
                   f"--web.listen-address={listen}", "--cluster.listen-address="],
                  data_dir.parent / "alertmanager.log"):
        yield f"http://{listen}"


@dataclass
class AlertWebhook:
    """What an HTTP server received from Alertmanager's webhook receiver."""

    url: str
    posts: list[dict[str, Any]] = field(default_factory=list)

    def notified(self, alertname: str, board: str, status: str) -> bool:
        return any(alert["status"] == status and alert["labels"].get("alertname") == alertname
                   and alert["labels"].get("board") == board
                   for post in list(self.posts) for alert in post["alerts"])


@contextmanager
def alert_webhook(address: str) -> Iterator[AlertWebhook]:
    """An HTTP server on `address` (a free port) collecting the JSON posted to it."""
    posts: list[dict[str, Any]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((address, 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield AlertWebhook(f"http://{address}:{server.server_address[1]}/alerts", posts)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


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
