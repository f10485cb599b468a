"""The monitoring role's Alertmanager configuration: rendered by Ansible, checked by amtool, routed as
the variables say; Prometheus's configuration sends its alerts there."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_harness import AMTOOL, PROMTOOL, render_monitoring

RECEIVERS = {
    "monitoring_alertmanager_webhook_urls": ["http://10.0.0.5:9099/alerts", "https://chat.example/hook/T0K3N"],
    "monitoring_alertmanager_email_to": ["oncall@example.org"],
    "monitoring_alertmanager_email_severities": ["critical"],
    "monitoring_alertmanager_email_from": "fleet@example.org",
    "monitoring_alertmanager_smtp_smarthost": "smtp.example.org:587",
    "monitoring_alertmanager_smtp_auth_username": "fleet",
    "monitoring_alertmanager_smtp_auth_password": 'p4ss "with" quotes',
}


def receivers_for(config: Path, *labels: str) -> list[str]:
    routed = subprocess.run([AMTOOL, "config", "routes", "test", f"--config.file={config}", *labels],
                            capture_output=True, text=True, timeout=60, check=True)
    return routed.stdout.strip().split(",")


@pytest.fixture(scope="module")
def with_receivers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("alertmanager")
    run = render_monitoring(out, RECEIVERS)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_alerts_reach_the_webhooks_and_critical_ones_the_mailbox(with_receivers: Path) -> None:
    config = with_receivers / "alertmanager.yml"
    assert receivers_for(config, "alertname=RkllmBoardDown", "severity=critical") == ["webhook", "email"]
    assert receivers_for(config, "alertname=RkllmHighTTFT", "severity=warning") == ["webhook"]
    rendered: dict[str, Any] = yaml.safe_load(config.read_text())
    webhooks = rendered["receivers"][1]["webhook_configs"]
    assert [(w["url"], w["send_resolved"]) for w in webhooks] == [
        (url, True) for url in RECEIVERS["monitoring_alertmanager_webhook_urls"]]
    assert rendered["global"]["smtp_auth_password"] == RECEIVERS["monitoring_alertmanager_smtp_auth_password"]
    assert rendered["global"]["smtp_require_tls"] is True


def test_without_receivers_alerts_stay_in_alertmanager(tmp_path: Path) -> None:
    run = render_monitoring(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert receivers_for(tmp_path / "alertmanager.yml", "alertname=RkllmBoardDown", "severity=critical") == [
        "unrouted"]
    assert "smtp" not in (tmp_path / "alertmanager.yml").read_text()


def test_mail_without_a_server_is_refused_and_not_installed(tmp_path: Path) -> None:
    run = render_monitoring(tmp_path, {"monitoring_alertmanager_email_to": ["oncall@example.org"]})
    assert run.returncode != 0
    assert "failed to validate" in run.stdout
    assert not (tmp_path / "alertmanager.yml").exists()


def test_prometheus_sends_alerts_to_the_local_alertmanager(with_receivers: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((with_receivers / "prometheus.yml").read_text())
    assert config["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]
    run = render_monitoring(tmp_path, {"monitoring_alertmanager_enabled": False})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "alerting" not in yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    check = subprocess.run([PROMTOOL, "check", "config", str(with_receivers / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
