"""The monitoring role's Prometheus files: rendered by Ansible, checked and unit-tested by promtool."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from monitoring_harness import PROMTOOL, render_monitoring

B1 = {"board": "board1", "instance": "10.0.0.11:8080", "job": "rkllm", "role": "board"}
B2 = {"board": "board2", "instance": "10.0.0.12:8090", "job": "rkllm", "role": "board"}
N1 = {"board": "board1", "instance": "10.0.0.11:9100", "job": "node", "role": "board"}
N2 = {"board": "board2", "instance": "10.0.0.12:9100", "job": "node", "role": "board"}
N3 = {"board": "board3", "instance": "10.0.0.13:9100", "job": "node", "role": "board"}
LB_NGINX = {"board": "balancer1", "instance": "10.0.0.2:9113", "job": "nginx", "role": "balancer"}
LB_NODE = {"board": "balancer1", "instance": "10.0.0.2:9100", "job": "node", "role": "balancer"}
ROOT_FS = {"device": "/dev/mmcblk0p2", "fstype": "ext4", "mountpoint": "/"}
PHI3 = "Phi-3-mini-4k-instruct"
RKNPU_FILE = "/var/lib/prometheus/node-exporter/rknpu.prom"


def series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    return {"series": f"{name}{{{body}}}", "values": values}


def drop(labels: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in labels.items() if k not in keys}


# alert -> (input series, [(eval time, [expected labels of each firing alert])]); every case shows the
# alert quiet, then firing, then cleared.
CASES: dict[str, list[tuple[list[dict[str, str]], list[tuple[str, list[dict[str, str]]]]]]] = {
    "RkllmBoardDown": [(
        [series("up", B1, "1 1 0 0 0 0 1 1 1"), series("up", B2, "1x8")],
        [("3m", []), ("4m", [{**B1, "severity": "critical"}]), ("8m", [])],
    )],
    "RkllmServerRestarting": [(
        [series("process_start_time_seconds", B1, "100 100 400 400 700x25"),
         series("node_systemd_service_restart_total", {**N2, "name": "rkllm-server.service"}, "0 0 1 2 3x25"),
         series("node_systemd_service_restart_total", {**N1, "name": "ssh.service"}, "0 1 2 3 4x25")],
        [("1m", []),
         ("5m", [{**B1, "severity": "warning"},
                 {**N2, "name": "rkllm-server.service", "severity": "warning"}]),
         ("25m", [])],
    )],
    "RkllmHighTTFT": [(
        [series("rkllm_time_to_first_token_seconds_bucket", {**B1, "model": "m", "le": "1"},
                "0+1x15 25+10x24"),
         series("rkllm_time_to_first_token_seconds_bucket", {**B1, "model": "m", "le": "10"}, "0+10x40"),
         series("rkllm_time_to_first_token_seconds_bucket", {**B1, "model": "m", "le": "+Inf"}, "0+10x40")],
        [("10m", []), ("12m", [{"board": "board1", "model": "m", "severity": "warning"}]), ("25m", [])],
    )],
    "RkllmFleetSaturated": [(
        [series("up", B1, "1x30"), series("up", B2, "1x30"),
         series("rkllm_requests_running", {**B1, "model": "m"}, "1x30"),
         series("rkllm_requests_running", {**B2, "model": "m"}, "1x10 0x20"),
         series("rkllm_requests_rejected_total", {**B1, "model": "m", "reason": "queue_full"}, "0+2x30")],
        [("4m", []), ("7m", [{"severity": "warning"}]), ("12m", [])],
    ), (
        # The balancer refuses the overflow itself: every board busy with a full queue.
        [series("up", B1, "1x30"), series("up", B2, "1x30"),
         series("rkllm_requests_running", {**B1, "model": "m"}, "1x30"),
         series("rkllm_requests_running", {**B2, "model": "m"}, "1x30"),
         series("rkllm_requests_waiting", {**B1, "model": "m"}, "8x30"),
         series("rkllm_requests_waiting", {**B2, "model": "m"}, "8x10 3x20"),
         series("rkllm_requests_rejected_total", {**B1, "model": "m", "reason": "draining"}, "0+2x30")],
        [("4m", []), ("7m", [{"severity": "warning"}]), ("12m", [])],
    )],
    "RkllmErrorRatio": [(
        [series("rkllm_e2e_request_latency_seconds_count", {**B1, "model": "m"}, "0+10x30"),
         series("rkllm_requests_rejected_total", {**B1, "model": "m", "reason": "run_error"}, "0+2x10 20x20"),
         series("rkllm_requests_rejected_total", {**B1, "model": "m", "reason": "queue_full"}, "0+5x30"),
         series("rkllm_e2e_request_latency_seconds_count", {**B2, "model": "m"}, "0+10x30"),
         series("rkllm_requests_rejected_total", {**B2, "model": "m", "reason": "queue_full"}, "0+50x30")],
        [("4m", []), ("7m", [{"board": "board1", "severity": "warning"}]), ("17m", [])],
    )],
    "RknpuMetricsStale": [
        (
            [series("node_textfile_mtime_seconds", {**N1, "file": RKNPU_FILE}, "0+60x10 600x14 1500+60x10"),
             series("up", N1, "1x40")],
            [("15m", []), ("22m", [{**N1, "file": RKNPU_FILE, "severity": "warning"}]), ("26m", [])],
        ),
        (
            [series("up", N2, "1x18"), series("up", N3, "1x18"),
             series("node_textfile_mtime_seconds", {**N3, "file": RKNPU_FILE}, "0+60x18"),
             series("rknpu_collector_file_readable", {**N3, "file": "load"}, "0x8 1x10"),
             series("rknpu_collector_file_readable", {**N3, "file": "version"}, "1x18")],
            [("4m", []),
             ("6m", [{**N2, "severity": "warning"}, {"board": "board3", "severity": "warning"}]),
             ("10m", [{**N2, "severity": "warning"}])],
        ),
    ],
    "RknpuDriverTooOld": [(
        [series("rknpu_driver_version_code", N1, "906x5 908x5"),
         series("rknpu_driver_version_code", N2, "908x10")],
        [("2m", [{**N1, "severity": "critical"}]), ("7m", [])],
    )],
    "RkllmModelMemoryNearRam": [(
        [series("node_memory_MemTotal_bytes", N1, "4294967296x15"),
         series("node_memory_MemTotal_bytes", N2, "17179869184x15"),
         series("rkllm_build_info", {**B1, "model": PHI3, "driver": "0.9.8"}, "1x6 stale"),
         series("rkllm_build_info", {**B1, "model": "Qwen2.5-1.5B-Instruct", "driver": "0.9.8"}, "_x6 1x8"),
         series("rkllm_build_info", {**B2, "model": PHI3, "driver": "0.9.8"}, "1x15")],
        [("3m", []), ("5m", [{"board": "board1", "severity": "warning"}]), ("9m", [])],
    )],
    "RkllmBalancerDown": [
        (  # nginx stops: the exporter answers with nginx_up 0.
            [series("nginx_up", LB_NGINX, "1x3 0x5 1x10"), series("up", LB_NGINX, "1x18"),
             series("up", LB_NODE, "1x18")],
            [("2m", []), ("6m", [{"board": "balancer1", "severity": "critical"}]), ("10m", [])],
        ),
        (  # The whole host is unreachable: both scrapes fail.
            [series("up", LB_NGINX, "1x3 0x5 1x10"), series("up", LB_NODE, "1x3 0x5 1x10")],
            [("2m", []), ("6m", [{"board": "balancer1", "severity": "critical"}]), ("10m", [])],
        ),
    ],
    "RkllmDiskFilling": [
        (  # Below 10 % free for longer than 15 minutes; a full tmpfs does not count.
            [series("node_filesystem_avail_bytes", {**N1, **ROOT_FS}, "5x25 50x20"),
             series("node_filesystem_size_bytes", {**N1, **ROOT_FS}, "100x45"),
             series("node_filesystem_avail_bytes", {**N1, "device": "tmpfs", "fstype": "tmpfs",
                                                    "mountpoint": "/run"}, "1x45"),
             series("node_filesystem_size_bytes", {**N1, "device": "tmpfs", "fstype": "tmpfs",
                                                   "mountpoint": "/run"}, "100x45")],
            [("5m", []), ("20m", [{**N1, **ROOT_FS, "severity": "warning"}]), ("35m", [])],
        ),
        (  # Plenty free, but losing a byte a minute: full well within a day. Cleaned up at 21m.
            [series("node_filesystem_avail_bytes", {**N2, **ROOT_FS}, "90-1x20 95x40"),
             series("node_filesystem_size_bytes", {**N2, **ROOT_FS}, "100x60")],
            [("10m", []), ("18m", [{**N2, **ROOT_FS, "severity": "warning"}]), ("60m", [])],
        ),
    ],
    "RkllmSocHot": [(
        # board1 has thermal zones (its hwmon twin of the soc zone is not reported again);
        # board2 only an hwmon sensor.
        [series("node_thermal_zone_temp", {**N1, "type": "soc-thermal", "zone": "0"}, "50x3 90x10 50x5"),
         series("node_thermal_zone_temp", {**N1, "type": "npu-thermal", "zone": "6"}, "45x18"),
         series("node_hwmon_temp_celsius", {**N1, "chip": "thermal_thermal_zone0", "sensor": "temp1"},
                "50x3 90x10 50x5"),
         series("node_hwmon_temp_celsius", {**N2, "chip": "platform_thermal", "sensor": "temp1"},
                "40x3 95x10 40x5")],
        [("2m", []),
         ("10m", [{"board": "board1", "type": "soc-thermal", "severity": "warning"},
                  {"board": "board2", "chip": "platform_thermal", "severity": "warning"}]),
         ("15m", [])],
    )],
    "RkllmDrainForgotten": [(
        # board1 drains at 5m and stays drained until 46m (with or without traffic); board2 drains
        # for 10 minutes during an update and is resumed.
        [series("rkllm_draining", B1, "0x5 1x40 0x10"),
         series("rkllm_draining", B2, "0x5 1x10 0x40")],
        [("20m", []), ("45m", [{"board": "board1", "severity": "warning"}]), ("58m", [])],
    )],
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("monitoring")
    run = render_monitoring(out)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def alert_rules(rendered: Path) -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load((rendered / "rules/rkllm.yml").read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"] if "alert" in rule}


def expand(annotation: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), annotation)


def group_names(rendered: Path) -> list[str]:
    return [group["name"] for group in yaml.safe_load((rendered / "rules/rkllm.yml").read_text())["groups"]]


def promtool_tests(rendered: Path, alert: str, flip: bool = False) -> dict[str, Any]:
    rules = alert_rules(rendered)
    tests = []
    for input_series, checks in CASES[alert]:
        alert_tests = []
        for eval_time, expected in checks:
            if flip:
                expected = [] if expected else [{"severity": "never"}]
            alert_tests.append({
                "eval_time": eval_time, "alertname": alert,
                "exp_alerts": [{
                    "exp_labels": labels,
                    "exp_annotations": {k: expand(v, labels) for k, v in rules[alert]["annotations"].items()},
                } for labels in expected],
            })
        tests.append({"interval": "1m", "input_series": input_series, "alert_rule_test": alert_tests})
    # Without group_eval_order promtool evaluates the groups in Go map order, which changes from run
    # to run: when the alerts group goes first, the catalog's recorded model sizes do not exist yet
    # at 0m and RkllmModelMemoryNearRam fires one interval late.
    return {"rule_files": ["rules/rkllm.yml"], "evaluation_interval": "1m",
            "group_eval_order": group_names(rendered), "tests": tests}


def run_promtool_test(rendered: Path, name: str, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    test_file = rendered / f"{name}_test.yml"
    test_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return subprocess.run([PROMTOOL, "test", "rules", test_file.name], cwd=rendered, capture_output=True,
                          text=True, timeout=60, check=False)


def test_rendered_config_passes_full_promtool_check(rendered: Path) -> None:
    check = subprocess.run([PROMTOOL, "check", "config", str(rendered / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((rendered / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    rkllm_targets = {t["labels"]["board"]: t["targets"][0] for t in jobs["rkllm"]["static_configs"]}
    assert rkllm_targets == {"board1": "10.0.0.11:8080", "board2": "10.0.0.12:8090"}
    node_boards = [t["labels"]["board"] for t in jobs["node"]["static_configs"]]
    # balancer1 is balancer and monitor: scraped once.
    assert node_boards == ["board1", "board2", "balancer1"]
    assert [t["targets"] for t in jobs["nginx"]["static_configs"]] == [["10.0.0.2:9113"]]


def test_catalog_becomes_model_memory_records(rendered: Path) -> None:
    groups = yaml.safe_load((rendered / "rules/rkllm.yml").read_text())["groups"]
    records = {r["labels"]["model"]: r["expr"] for g in groups for r in g["rules"] if "record" in r}
    assert records == {"Qwen2.5-1.5B-Instruct": f"vector({1659 * 1048576})",
                       "Phi-3-mini-4k-instruct": f"vector({3748 * 1048576})"}


def test_every_alert_has_a_promtool_case(rendered: Path) -> None:
    assert set(alert_rules(rendered)) == set(CASES)


@pytest.mark.parametrize("alert", sorted(CASES))
def test_alert_fires_and_clears(rendered: Path, alert: str) -> None:
    run = run_promtool_test(rendered, alert, promtool_tests(rendered, alert))
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_harness_catches_wrong_expectations(rendered: Path) -> None:
    flipped = promtool_tests(rendered, "RkllmBoardDown", flip=True)
    run = run_promtool_test(rendered, "flipped", flipped)
    assert run.returncode != 0
    assert "FAILED" in run.stdout + run.stderr


def test_broken_rule_is_refused_and_not_installed(tmp_path: Path) -> None:
    run = render_monitoring(tmp_path, {"monitoring_alert_ttft_p95_seconds": "5 +"})
    assert run.returncode != 0
    assert "failed to validate" in run.stdout
    assert not (tmp_path / "rules/rkllm.yml").exists()


def test_empty_fleet_still_renders_valid_files(tmp_path: Path) -> None:
    run = render_monitoring(tmp_path, {"monitoring_model_catalog": []},
                            inventory={"all": {"hosts": {"monitor1": {}}}})
    assert run.returncode == 0, run.stdout + run.stderr
    check = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
