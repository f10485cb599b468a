"""Renders the monitoring role's templates with ansible-playbook (connection local) for the tests."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
RENDER_PLAYBOOK = REPO / "tests/unit/ops_fixtures/render_monitoring.yml"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"

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
        "monitoring_model_catalog": TEST_CATALOG,
        **(extra_vars or {}),
    }
    return subprocess.run(
        [str(REPO / ".venv/bin/ansible-playbook"), "-i", str(inventory_path), str(RENDER_PLAYBOOK),
         "-e", json.dumps(variables)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
