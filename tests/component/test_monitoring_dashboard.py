"""The provisioned Grafana dashboard: valid JSON, the panels the operator needs, PromQL that parses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from monitoring_harness import PROMTOOL

from tests.support import REPO_ROOT

DASHBOARD = REPO_ROOT / "roles/monitoring/files/rkllm-fleet-dashboard.json"


def test_dashboard_covers_the_fleet_questions() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("rknpu_load_percent", "rkllm_generation_tokens_total",
                   "rkllm_time_to_first_token_seconds_bucket", "rkllm_requests_waiting",
                   "rkllm_requests_rejected_total", "nginx_http_requests_total",
                   "rkllm_prompt_tokens_cached_total", "rkllm_kv_slot_state",
                   "rkllm_kv_slot_evictions_total", "rkllm_kv_slot_conversation_evictions_total"):
        assert metric in exprs
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_panel_query_parses(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    # promtool parses rule expressions; Grafana's interval macro becomes a literal range first.
    rules = [{"record": f"panel_{p['id']}_{t['refId']}", "expr": t["expr"].replace("$__rate_interval", "5m")}
             for p in dashboard["panels"] for t in p["targets"]]
    (tmp_path / "panels.yml").write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "panels.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(rules)} rules found" in check.stdout
