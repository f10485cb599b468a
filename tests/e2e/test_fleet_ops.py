"""Operating the simulated fleet: 3 amd64 boards provisioned by site.yml and ansible/balancer.yml,
then ansible/monitoring.yml as an operator runs it. The balancer doubles as the monitor host (group
rkllm_monitor) and the images carry the Debian packages the role installs, so the role's installs are
no-ops here and everything else (exporters, the rknpu collector timer, Prometheus with its rules)
is applied for real. The test reads that Prometheus through an SSH tunnel: every target up, the
NPU textfile reaching it, every dashboard panel's query answering, RkllmBoardDown firing when
board2's server stops and clearing when it is back, both delivered by the role's Alertmanager to a
webhook receiver on the controller. rkllm-bench (ansible/benchmark.yml) flags board2, whose
double decodes below 80 % of the catalog speed."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml
from e2e.playbooks import playbook
from fleet.host import Host
from fleet.sim import Fleet
from unit.monitoring_harness import (
    FAST_ALERTING,
    AlertWebhook,
    alert_webhook,
    board_down_alerts,
    board_health,
    prometheus_api,
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
# Seconds instead of minutes, so alerts and the collector timer are observable within a test.
MONITORING_VARS = {**FAST_ALERTING, "monitoring_rknpu_collector_interval_seconds": 2}
DEBUGFS = "/srv/fixtures/rknpu"
TEXTFILE_DIR = "/var/lib/prometheus/node-exporter"
COLLECTOR = "/usr/local/libexec/rknpu-textfile-collector"
HOSTS = ("board1", "board2", "board3", "balancer1")
DASHBOARD = REPO_ROOT / "roles/monitoring/files/rkllm-fleet-dashboard.json"
ALERTMANAGER_CONFIG = "/etc/prometheus/alertmanager.yml"
SMTP_PASSWORD = "smtp-S3CRET-never-printed"
RECAP = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=\d+\s+failed=\d+\s+skipped=\d+\s+"
                   r"rescued=(\d+)", re.M)


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
        # The controller benchmarks the boards directly.
        (inventory / "group_vars/all.yml").write_text(yaml.safe_dump({
            "fleet_firewall_serving_extra_sources": [controller_address(started)], **MONITORING_VARS}))
        # board2 decodes at 9 tokens/s where 16.3 are expected: a board with unpinned clocks.
        (inventory / "host_vars/board2.yml").write_text("rkllm_server_environment: {RKLLM_DOUBLE_TPS: '9'}\n")
        (inventory / "host_vars/board3.yml").write_text(f"rkllm_models_enabled: [{PHI}]\n")
        playbook(started, "site.yml")
        playbook(started, "ansible/balancer.yml")
        yield started
    finally:
        started.down()


@pytest.fixture(scope="module")
def webhook(fleet: Fleet) -> Iterator[AlertWebhook]:
    """The alert receiver, on the controller's bridge address the monitor host reaches."""
    with alert_webhook(controller_address(fleet)) as receiver:
        yield receiver


@dataclass(frozen=True)
class MonitoringRuns:
    """ansible/monitoring.yml in check mode, then twice for real; what check mode left behind."""

    check_mode_traces: dict[str, str]
    first: str
    second: str
    check: str


@pytest.fixture(scope="module")
def monitoring_runs(fleet: Fleet, webhook: AlertWebhook) -> MonitoringRuns:
    for board in fleet.boards:
        # Like debugfs on a real board: only root may read the rknpu files.
        board.exec(["chmod", "0700", DEBUGFS])
    # An e-mail receiver holding a password, for severities no alert has (there is no mail server
    # here), so the secret's handling is seen without mail being sent.
    receivers = json.dumps({
        "monitoring_alertmanager_webhook_urls": [webhook.url],
        "monitoring_alertmanager_email_to": ["oncall@example.org"],
        "monitoring_alertmanager_email_severities": ["page"],
        "monitoring_alertmanager_email_from": "fleet@example.org",
        "monitoring_alertmanager_smtp_smarthost": "smtp.example.org:587",
        "monitoring_alertmanager_smtp_auth_username": "fleet",
        "monitoring_alertmanager_smtp_auth_password": SMTP_PASSWORD,
    })
    check = playbook(fleet, "ansible/monitoring.yml", "-e", receivers, "--check", "--diff").stdout
    board1, monitor = fleet.board("board1"), fleet.balancer
    traces = {
        "collector script": board1.exec(["ls", COLLECTOR], check=False).stdout,
        "prometheus": monitor.exec(["systemctl", "is-active", "prometheus"], check=False).stdout.strip(),
        "alertmanager": monitor.exec(["systemctl", "is-active", "prometheus-alertmanager"],
                                     check=False).stdout.strip(),
        "rules": monitor.exec(["ls", "/etc/prometheus/rules"], check=False).stdout,
    }
    first = playbook(fleet, "ansible/monitoring.yml", "-e", receivers, "--diff").stdout
    second = playbook(fleet, "ansible/monitoring.yml", "-e", receivers).stdout
    return MonitoringRuns(traces, first, second, check)


@contextmanager
def ssh_tunnel(host: Host, remote: str) -> Iterator[str]:
    """`ssh -L` from the controller to `remote` as seen on host (how an operator opens Prometheus)."""
    port = free_port()
    ssh = host.ssh_args()
    forward = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"127.0.0.1:{port}:{remote}"]
    process = subprocess.Popen([ssh[0], *forward, *ssh[1:]], stdin=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, monitoring_runs: MonitoringRuns) -> Iterator[str]:
    """The Prometheus the role runs on the monitor host (listening on its loopback)."""
    with ssh_tunnel(fleet.balancer, "127.0.0.1:9090") as url:
        wait_until(lambda: prometheus_api(url, "status/buildinfo") is not None, timeout=30, interval=0.5)
        yield url


def target_health(prometheus: str) -> dict[tuple[str, str], str]:
    targets = (prometheus_api(prometheus, "targets") or {}).get("activeTargets", [])
    return {(t["labels"]["job"], t["labels"].get("board", "")): t["health"] for t in targets}


def sample(prometheus: str, expression: str) -> dict[str, float]:
    """Value per board of an instant query."""
    result = (prometheus_api(prometheus, f"query?query={quote(expression)}") or {}).get("result", [])
    return {r["metric"].get("board", ""): float(r["value"][1]) for r in result}


def changed_and_rescued(output: str) -> dict[str, tuple[int, int]]:
    return {host: (int(changed), int(rescued)) for host, changed, rescued in RECAP.findall(output)}


def task_results(output: str, task: str) -> list[str]:
    """The per-host result lines ("ok: [board1]") of one task of a playbook run."""
    section = output.split(f"TASK [monitoring : {task}]", 1)[1].split("TASK [", 1)[0]
    return sorted(re.findall(r"^(\w+): \[(\S+)\]", section, re.M))


def test_monitoring_playbook_installs_nothing_here_and_is_idempotent(monitoring_runs: MonitoringRuns) -> None:
    nothing_applied = {"collector script": "", "prometheus": "inactive", "alertmanager": "inactive",
                       "rules": ""}
    assert monitoring_runs.check_mode_traces == nothing_applied
    # The packages are in the images: the install task finds them, the lists are never refreshed.
    assert task_results(monitoring_runs.first, "Install from the current package lists") == [
        ("ok", host) for host in sorted(HOSTS)]
    first = changed_and_rescued(monitoring_runs.first)
    assert set(first) == set(HOSTS)
    assert all(changed > 0 and rescued == 0 for changed, rescued in first.values()), first
    assert changed_and_rescued(monitoring_runs.second) == {host: (0, 0) for host in HOSTS}


def test_smtp_password_is_never_printed_nor_world_readable(fleet: Fleet,
                                                           monitoring_runs: MonitoringRuns) -> None:
    for run in (monitoring_runs.check, monitoring_runs.first, monitoring_runs.second):
        assert SMTP_PASSWORD not in run
    # --diff did show the other files it changed.
    assert "+++ after: " in monitoring_runs.first
    monitor = fleet.balancer
    assert monitor.exec(["stat", "-c", "%U %G %a", ALERTMANAGER_CONFIG]).stdout == "root prometheus 640\n"
    assert SMTP_PASSWORD in monitor.exec(["cat", ALERTMANAGER_CONFIG]).stdout
    as_nobody = monitor.exec(["runuser", "-u", "nobody", "--", "cat", ALERTMANAGER_CONFIG], check=False)
    assert as_nobody.returncode != 0


def test_prometheus_on_the_monitor_host_scrapes_every_target(fleet: Fleet, prometheus: str) -> None:
    expected = {("prometheus", ""): "up", ("nginx", "balancer1"): "up",
                **{("rkllm", b.name): "up" for b in fleet.boards},
                **{("node", host): "up" for host in HOSTS}}
    wait_until(lambda: target_health(prometheus) == expected, timeout=60, interval=0.5)
    # The nginx exporter reads the balancer's stub_status (nginx_up is 0 when it cannot).
    assert sample(prometheus, "nginx_up") == {"balancer1": 1.0}
    assert sample(prometheus, "nginx_connections_accepted")["balancer1"] >= 1


def test_board_down_alert_fires_and_clears_on_the_fleet(fleet: Fleet, prometheus: str,
                                                        webhook: AlertWebhook) -> None:
    all_up = {"board1": "up", "board2": "up", "board3": "up"}
    wait_until(lambda: board_health(prometheus) == all_up, timeout=60, interval=0.5)
    assert board_down_alerts(prometheus) == {}
    assert not webhook.notified("RkllmBoardDown", "board2", "firing")
    fleet.board("board2").exec(["systemctl", "stop", "rkllm-server"])
    try:
        wait_until(lambda: board_down_alerts(prometheus) == {"board2": "firing"}, timeout=60, interval=0.5)
        # Prometheus -> Alertmanager on the monitor host -> the webhook on the controller.
        wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "firing"),
                   timeout=60, interval=0.5)
    finally:
        fleet.board("board2").exec(["systemctl", "start", "rkllm-server"])
    wait_until(lambda: board_down_alerts(prometheus) == {}, timeout=90, interval=0.5)
    assert board_health(prometheus) == all_up
    wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "resolved"),
               timeout=60, interval=0.5)
    assert not any(webhook.notified("RkllmBoardDown", board, "firing")
                   for board in ("board1", "board3"))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard query; Grafana's rate interval becomes a minute
    (the fleet is scraped every second)."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"].replace("$__rate_interval", "1m"))
            for panel in dashboard["panels"] for target in panel["targets"]]


def finite_values(prometheus: str, expression: str) -> list[float]:
    result = (prometheus_api(prometheus, f"query?query={quote(expression)}") or {}).get("result", [])
    return [value for value in (float(r["value"][1]) for r in result) if math.isfinite(value)]


def test_every_dashboard_panel_shows_data_on_the_fleet(fleet: Fleet, prometheus: str) -> None:
    # Latency and speed panels need requests within their rate window: one per board.
    served = {"board1": QWEN, "board2": QWEN, "board3": PHI}
    for board, model in served.items():
        reply = httpx.post(f"http://{fleet.board(board).address}:8080/v1/chat/completions", timeout=60,
                           json={"model": model, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "dashboard"}]})
        assert reply.status_code == 200, reply.text
    empty = []
    for title, expression in panel_queries():
        try:
            wait_until(lambda expression=expression: finite_values(prometheus, expression) != [],
                       timeout=30, interval=0.5)
        except AssertionError:
            empty.append(f"{title}: {expression}")
    assert empty == []


def test_root_only_npu_files_reach_prometheus_through_the_collector_timer(fleet: Fleet,
                                                                          prometheus: str) -> None:
    board1 = fleet.board("board1")
    # node_exporter's user cannot read the NPU files; the root collector writes what it may read.
    as_exporter = board1.exec(["runuser", "-u", "prometheus", "--", "cat", f"{DEBUGFS}/load"], check=False)
    assert as_exporter.returncode != 0
    assert board1.exec(["stat", "-c", "%U %a", TEXTFILE_DIR, f"{TEXTFILE_DIR}/rknpu.prom"]).stdout == \
        "root 755\nroot 644\n"
    assert board1.exec(["systemctl", "is-active", "rknpu-textfile-collector.timer"]).stdout == "active\n"
    every_board = {b.name: 1.0 for b in fleet.boards}
    wait_until(lambda: sample(prometheus, 'rknpu_collector_file_readable{file="load"}') == every_board,
               timeout=60, interval=0.5)
    assert sample(prometheus, "rknpu_driver_version_code") == {b.name: 908.0 for b in fleet.boards}
    assert sample(prometheus, "rknpu_frequency_hz") == {b.name: 1e9 for b in fleet.boards}
    # The timer keeps the file current: a new load on board1 reaches Prometheus.
    board1.exec(["sh", "-c", f"echo 'NPU load:  Core0:  0%, Core1: 37%, Core2:  0%,' > {DEBUGFS}/load"])
    try:
        core1 = 'rknpu_load_percent{board="board1",core="1"}'
        wait_until(lambda: sample(prometheus, core1) == {"board1": 37.0}, timeout=60, interval=0.5)
    finally:
        board1.exec(["sh", "-c", f"echo 'NPU load:  Core0:  0%, Core1:  0%, Core2:  0%,' > {DEBUGFS}/load"])


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
