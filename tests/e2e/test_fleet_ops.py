"""Operating the simulated fleet: 3 amd64 boards and the balancer provisioned by site.yml, then
ansible/monitoring.yml as an operator runs it. The balancer doubles as the monitor host (group
rkllm_monitor) and the images carry the Debian packages the role installs, so the role's installs are
no-ops here and everything else (exporters, the rknpu collector timer, Prometheus with its rules)
is applied for real. The test reads that Prometheus through an SSH tunnel: every target up, the
NPU textfile reaching it, every dashboard panel's query answering, RkllmBoardDown firing when
board2's server stops and clearing when it is back, both delivered by the role's Alertmanager to a
webhook receiver on the controller. rkllm-bench (ansible/benchmark.yml) flags board2, whose
double decodes below 80 % of the catalog speed. Day-2 runs under a continuous streaming client:
site.yml re-run with a changed server setting and a new server build restarts the boards one batch at
a time and fails no request, and ansible/rollback.yml returns them to the old build; a canary board
pinned to another runtime library with --limit, then the whole fleet, where nothing restarts. A model
added to two of three boards with rolling_update.yml answers through nginx from its first answer (a
board without it answers 404, which nginx passes on), and rollback.yml returns the two boards to
their previous model set under load. An unreachable board stops site.yml before any change, or is
left out within site_unreachable_boards_max_percent."""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import yaml
from component.monitoring_harness import (
    FAST_ALERTING,
    AlertWebhook,
    alert_webhook,
    board_down_alerts,
    board_health,
    prometheus_api,
)
from e2e.fleets import booted_fleet
from e2e.playbooks import playbook
from fleet.host import Host
from fleet.sim import Fleet

from tests.support import REPO_ROOT, free_port, wait_until

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

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
    with booted_fleet(tmp_path_factory.mktemp("fleet"), "op", arch="amd64", boards=3,
                      board_ram=["board2=8192", "board3=6144"]) as started:
        inventory = started.inventory_path.parent
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
        yield started


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
        wait_until(lambda: prometheus_api(url, "status/buildinfo") is not None,
                   "Prometheus answers its API", deadline_s=30, interval=0.5)
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
    wait_until(lambda: target_health(prometheus) == expected,
               "every scrape target healthy", deadline_s=60, interval=0.5)
    # The nginx exporter reads the balancer's stub_status (nginx_up is 0 when it cannot).
    assert sample(prometheus, "nginx_up") == {"balancer1": 1.0}
    assert sample(prometheus, "nginx_connections_accepted")["balancer1"] >= 1


def test_board_down_alert_fires_and_clears_on_the_fleet(fleet: Fleet, prometheus: str,
                                                        webhook: AlertWebhook) -> None:
    all_up = {"board1": "up", "board2": "up", "board3": "up"}
    wait_until(lambda: board_health(prometheus) == all_up,
               "every board up in Prometheus", deadline_s=60, interval=0.5)
    assert board_down_alerts(prometheus) == {}
    assert not webhook.notified("RkllmBoardDown", "board2", "firing")
    fleet.board("board2").exec(["systemctl", "stop", "rkllm-server"])
    try:
        wait_until(lambda: board_down_alerts(prometheus) == {"board2": "firing"},
                   "RkllmBoardDown firing for board2", deadline_s=60, interval=0.5)
        # Prometheus -> Alertmanager on the monitor host -> the webhook on the controller.
        wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "firing"),
                   "the webhook notified of board2 firing", deadline_s=60, interval=0.5)
    finally:
        fleet.board("board2").exec(["systemctl", "start", "rkllm-server"])
    wait_until(lambda: board_down_alerts(prometheus) == {},
               "no RkllmBoardDown alert", deadline_s=90, interval=0.5)
    assert board_health(prometheus) == all_up
    wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "resolved"),
               "the webhook notified of board2 resolved", deadline_s=60, interval=0.5)
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
                       f"finite values of {expression}", deadline_s=30, interval=0.5)
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
               "every board's collector reads the NPU load", deadline_s=60, interval=0.5)
    assert sample(prometheus, "rknpu_driver_version_code") == {b.name: 908.0 for b in fleet.boards}
    assert sample(prometheus, "rknpu_frequency_hz") == {b.name: 1e9 for b in fleet.boards}
    # The timer keeps the file current: a new load on board1 reaches Prometheus.
    board1.exec(["sh", "-c", f"echo 'NPU load:  Core0:  0%, Core1: 37%, Core2:  0%,' > {DEBUGFS}/load"])
    try:
        core1 = 'rknpu_load_percent{board="board1",core="1"}'
        wait_until(lambda: sample(prometheus, core1) == {"board1": 37.0},
                   "board1's core 1 load at 37 %", deadline_s=60, interval=0.5)
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


# Day-2 operations. The fleet restarts servers from here on, so these tests come last.
LOAD_SCRIPT = Path(__file__).with_name("fleet_load.py")
BOARDS = ("board1", "board2", "board3")
CANARY_VERSION = "1.2.4"


def server_unit(fleet: Fleet, board: str, *props: str) -> list[str]:
    properties = [f"-p{p}" for p in props]
    shown = fleet.board(board).exec(["systemctl", "show", "--value", *properties, "rkllm-server"])
    return shown.stdout.split("\n")[:len(props)]


def server_pids(fleet: Fleet) -> dict[str, str]:
    return {b: server_unit(fleet, b, "MainPID")[0] for b in BOARDS}


def nginx_processes(fleet: Fleet) -> set[str]:
    return set(fleet.balancer.exec(["pgrep", "nginx"]).stdout.split())


def build_info(fleet: Fleet, board: str) -> dict[str, str]:
    metrics = fleet.board(board).exec(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/metrics"])
    metrics = metrics.stdout
    labels = re.search(r"^rkllm_build_info\{([^}]*)\} 1\.0$", metrics, re.M)
    assert labels, metrics[-2000:]
    return dict(re.findall(r'(\w+)="([^"]*)"', labels.group(1)))


def failed_requests(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in records if r.get("status") != 200 or not r.get("complete")]


@contextmanager
def continuous_client(fleet: Fleet, stop_file: Path, model: str = QWEN,
                      interval: float = 0.0) -> Iterator[Callable[[], list[dict[str, object]]]]:
    """Two streaming clients of `model` back to back through the balancer, each starting a request at
    most every `interval` seconds; the yielded function stops them and returns every request's record
    (start and end time, status)."""
    load = subprocess.Popen(
        ["ip", "netns", "exec", fleet.client_netns, sys.executable, str(LOAD_SCRIPT),
         f"http://{fleet.balancer.address}", "continuous", "--concurrency", "2", "--max-tokens", "8",
         "--model", model, "--seconds", "900", "--stop-file", str(stop_file), "--interval", str(interval)],
        stdout=subprocess.PIPE, text=True)

    def stop() -> list[dict[str, object]]:
        stop_file.touch()
        out, _ = load.communicate(timeout=180)
        records: list[dict[str, object]] = json.loads(out)["records"]
        return sorted(records, key=lambda r: float(str(r["start"])))

    try:
        yield stop
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()


@contextmanager
def streaming_clients(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[[], list[dict[str, object]]]]:
    """continuous_client of the fleet's main model; the yielded function returns the failed requests
    (each asserted after the block, with the count printed)."""
    with continuous_client(fleet, tmp_path / "stop-load") as stop_records:
        def stop() -> list[dict[str, object]]:
            records = stop_records()
            failed = failed_requests(records)
            print(f"continuous client: {len(records)} requests, {len(failed)} failed")
            return failed

        yield stop


def restart_times(fleet: Fleet) -> dict[str, float]:
    """When each board's server last started, in seconds of the monotonic clock the boards share."""
    return {b: int(server_unit(fleet, b, "ActiveEnterTimestampMonotonic")[0]) / 1e6 for b in BOARDS}


def server_copy(directory: Path, version: str) -> Path:
    """The server's sources at another package version (not a git checkout)."""
    directory.mkdir()
    shutil.copytree(REPO_ROOT / "rkllm_runtime", directory / "rkllm_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "requirements", directory / "requirements")
    (directory / "pyproject.toml").write_text(
        (REPO_ROOT / "pyproject.toml").read_text().replace('version = "0.1.0"', f'version = "{version}"'))
    return directory


# One site.yml run carries a changed setting and a new server build, so that the suite pays for one
# rolling restart of the fleet instead of two.
def test_changed_setting_and_server_build_restart_batch_by_batch_then_roll_back_under_load(
        fleet: Fleet, tmp_path: Path) -> None:
    pids, balancer = server_pids(fleet), nginx_processes(fleet)
    old = build_info(fleet, "board1")
    assert old["server_version"] == "0.1.0" and old["server_revision"] != "unknown", old
    source = server_copy(tmp_path / "server-0.1.1", "0.1.1")
    with (fleet.inventory_path.parent / "group_vars/rkllm_boards.yml").open("a") as group_vars:
        group_vars.write("rkllm_server_max_body_bytes: 2097152\n")
    with streaming_clients(fleet, tmp_path) as stop:
        started = time.monotonic()
        run = playbook(fleet, "site.yml", "-e", f"rkllm_server_source_dir={source}")
        took = time.monotonic() - started
        restarted = restart_times(fleet)
        upgraded = {b: build_info(fleet, b) for b in BOARDS}
        upgraded_pids, balancer_after_site = server_pids(fleet), nginx_processes(fleet)
        playbook(fleet, "ansible/rollback.yml", "-e", "rollback_component=server")
        failed = stop()
    order = sorted(BOARDS, key=restarted.__getitem__)
    first = restarted[order[0]]
    print(f"site.yml with a changed setting and server build in {took:.0f}s; batches (server started, "
          f"seconds after the first): " + ", ".join(f"{b} +{restarted[b] - first:.1f}" for b in order))
    assert failed == [], failed[:3]
    assert all(upgraded_pids[b] != pids[b] for b in BOARDS)
    # One board per batch: each started only after the previous one was back and rejoined (6 s).
    assert all(restarted[b] - restarted[a] >= 6 for a, b in itertools.pairwise(order)), restarted
    assert balancer_after_site == balancer, "site.yml did not reload the balancer"
    assert nginx_processes(fleet) == balancer, "rollback.yml did not reload the balancer"
    config = fleet.board("board1").exec(["cat", "/etc/rkllm-server/config.toml"]).stdout
    assert "max_body_bytes = 2097152" in config
    assert "board1: restart due for config.toml, server release 0.1.1-" in run.stdout
    assert {b: i["server_version"] for b, i in upgraded.items()} == dict.fromkeys(BOARDS, "0.1.1")
    # The copy is not a git checkout: its build says so instead of inventing a revision.
    assert upgraded["board1"]["server_revision"] == "unknown"
    assert {b: build_info(fleet, b)["server_version"] for b in BOARDS} == dict.fromkeys(BOARDS, "0.1.0")
    assert build_info(fleet, "board1")["server_revision"] == old["server_revision"]


def canary_library(fleet: Fleet) -> tuple[str, str]:
    """Another runtime release on the mirror: the double's library with trailing bytes (a loader
    ignores them) unique to this fleet, so the controller's cache has not seen it. Returns its URL
    and sha256."""
    variables = yaml.safe_load(fleet.inventory_path.read_text())["all"]["vars"]
    with urllib.request.urlopen(variables["rkllm_lib_url"], timeout=30) as response:
        library = response.read() + f"\0{fleet.prefix} {time.time_ns()}".encode()
    path = fleet.run_dir / "mirror" / "canary" / "librkllmrt.so"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(library)
    return fleet.state.mirror_url + "canary/librkllmrt.so", hashlib.sha256(library).hexdigest()


def fetched(output: str) -> list[tuple[str, str]]:
    """(result, item) of each runtime file the controller fetched in a run."""
    task = "TASK [controller_fetch : Download and verify the files of rkllm_lib]"
    section = output.split(task, 1)[1].split("TASK [", 1)[0]
    return sorted(re.findall(r"^(\w+): \[\S+ -> localhost\] => \(item=([^)]+)\)", section, re.M))


def test_canary_library_on_one_board_then_the_whole_fleet(fleet: Fleet) -> None:
    url, sha256 = canary_library(fleet)
    host_vars = fleet.inventory_path.parent / "host_vars/board2.yml"
    host_vars.write_text(host_vars.read_text() + yaml.safe_dump(
        {"rkllm_lib_version": CANARY_VERSION, "rkllm_lib_url": url, "rkllm_lib_sha256": sha256}))
    pids = server_pids(fleet)
    canary = playbook(fleet, "site.yml", "--limit", "board2").stdout
    # rkllm.h is the same file in both releases: the cache holds it already.
    assert fetched(canary) == [("changed", f"librkllmrt.so {CANARY_VERSION}"),
                               ("ok", f"rkllm.h {CANARY_VERSION}")]
    assert build_info(fleet, "board2")["runtime"] == CANARY_VERSION
    after_canary = server_pids(fleet)
    assert after_canary["board2"] != pids["board2"]
    assert {b: after_canary[b] for b in ("board1", "board3")} == {b: pids[b] for b in ("board1", "board3")}
    # The whole fleet, two releases in one run: each fetched once, from the cache; nothing restarts.
    whole = playbook(fleet, "site.yml").stdout
    assert fetched(whole) == [("ok", "librkllmrt.so 1.2.3"), ("ok", f"librkllmrt.so {CANARY_VERSION}"),
                              ("ok", "rkllm.h 1.2.3")]
    assert server_pids(fleet) == after_canary, "a run with nothing to change restarted a server"
    assert {b: build_info(fleet, b)["runtime"] for b in BOARDS} == {
        "board1": "1.2.3", "board2": CANARY_VERSION, "board3": "1.2.3"}


DEEPSEEK = "DeepSeek-R1-Distill-Qwen-1.5B"


def retried_model_not_found(fleet: Fleet) -> int:
    """Requests the balancer logged as a board's 404 passed on to a board that answered 200."""
    log = fleet.balancer.exec(["cat", "/var/log/nginx/access.log"]).stdout
    return len(re.findall(r'us="(?:[^"]*, )?404(?:, [^"]*)?, 200"', log))


@pytest.mark.timeout(2400)
def test_a_model_added_to_two_of_three_boards_is_served_from_its_first_answer(fleet: Fleet,
                                                                             tmp_path: Path) -> None:
    """Section 11 of DEPLOYMENT.md: catalog entry, enable on two boards, rolling_update.yml limited to
    them and the balancers, under clients of the new model and of the old one."""
    inventory = fleet.inventory_path.parent
    group_vars = inventory / "group_vars/rkllm_boards.yml"
    tree = yaml.safe_load(group_vars.read_text())
    tree["rkllm_models_catalog"].append({
        "name": DEEPSEEK, "url": "SET-ME", "sha256": "SET-ME", "size_mb": 1900, "memory_mb": 1660,
        "toolkit_version": "1.2.3", "kind": "reasoning", "template": "deepseek-r1", "context_length": 4096,
        "expected_tokens_per_second": 16.3})
    group_vars.write_text(yaml.safe_dump(tree))
    for board in ("board1", "board2"):
        host_vars = inventory / f"host_vars/{board}.yml"
        before = host_vars.read_text() if host_vars.exists() else ""
        host_vars.write_text(before + yaml.safe_dump({"rkllm_models_enabled": [QWEN, DEEPSEEK]}))
    retried_before = retried_model_not_found(fleet)
    # Paced: until a board has the model its 404s come at once, and an unpaced client would exceed
    # the balancer's per-client rate limit (30 requests/s), which the other client shares.
    with (continuous_client(fleet, tmp_path / "stop-new", DEEPSEEK, interval=0.2) as stop_new,
          # Paced too, so it opens a connection per request: the play reloads nginx for the new map.
          continuous_client(fleet, tmp_path / "stop-old", interval=0.25) as stop_old):
        started = time.time()
        playbook(fleet, "ansible/rolling_update.yml", "--limit", "board1:board2:rkllm_balancers")
        finished = time.time()
        new, old = stop_new(), stop_old()
    answered = [r for r in new if r.get("status") == 200]
    assert answered, new[-3:]
    first = float(str(answered[0]["start"]))
    after_first = [r for r in new if float(str(r["start"])) >= first]
    not_found = [r for r in after_first if r.get("status") == 404]
    retried = retried_model_not_found(fleet) - retried_before
    print(f"{DEEPSEEK} added in {finished - started:.0f}s, first answer {first - started:.1f}s into the run; "
          f"from then on {len(after_first)} requests, {len(not_found)} answered 404, "
          f"{len(failed_requests(after_first))} failed; before it {len(new) - len(after_first)} "
          f"(404: no board had it); {retried} answered after a board's 404; {QWEN}: {len(old)} requests, "
          f"{len(failed_requests(old))} failed")
    assert not_found == [], not_found[:3]
    # While one board serves the model, its queue may be full: back-pressure (503 with Retry-After),
    # never an error.
    errors = [r for r in failed_requests(after_first) if r.get("status") != 503 or not r.get("retry_after")]
    assert errors == [], errors[:3]
    assert failed_requests(old) == [], failed_requests(old)[:3]
    # The boards served the model before nginx's map knew it: a board without it answered 404 and
    # nginx passed the request on.
    assert retried > 0
    # The map now sends the model to the two boards only.
    config = fleet.balancer.exec(["cat", "/etc/nginx/nginx.conf"]).stdout
    upstream = config.split(f"# model {DEEPSEEK.lower()}", 1)[1].split("}", 1)[0]
    assert sorted(re.findall(r"# (board\d)", upstream)) == ["board1", "board2"]
    served = {b: DEEPSEEK in fleet.board(b).exec(["curl", "-sS", "http://127.0.0.1:8080/v1/models"]).stdout
              for b in BOARDS}
    assert served == {"board1": True, "board2": True, "board3": False}


RECAP_COUNTS = re.compile(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def site_run(fleet: Fleet, *extra: str) -> subprocess.CompletedProcess[str]:
    """site.yml as playbook() runs it, whatever its exit status."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(fleet.inventory_path.parent),
         "site.yml", *extra], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800, check=False)


def recap(output: str) -> dict[str, tuple[int, int, int]]:
    """(changed, unreachable, failed) per host."""
    return {host: (int(changed), int(unreachable), int(failed))
            for host, changed, unreachable, failed in RECAP_COUNTS.findall(output)}


@pytest.mark.timeout(2400)
def test_an_unreachable_board_is_left_out_within_the_budget_and_stops_the_run_beyond_it(
        fleet: Fleet) -> None:
    host_vars = fleet.inventory_path.parent / "host_vars/board3.yml"
    saved = host_vars.read_text()
    pids = server_pids(fleet)
    # Nothing may reach the discard port (the board's firewall drops it): board3's SSH never
    # connects, its server keeps running.
    host_vars.write_text(saved + "ansible_port: 9\n")
    try:
        beyond = site_run(fleet, "-e", "site_connect_timeout_seconds=5")
        within = site_run(fleet, "-e", "site_connect_timeout_seconds=5",
                          "-e", "site_unreachable_boards_max_percent=34")
    finally:
        host_vars.write_text(saved)
    # wait_for_connection reports the board as failed, naming its SSH error.
    refused = re.compile(r'^fatal: \[board3\]: FAILED! => \{.*"msg": "timed out waiting for ping', re.M)
    # The default budget (0 %): the run stops after the reachability check, before any preflight.
    assert beyond.returncode != 0
    ssh_error = re.search(r"timed out waiting for ping module test: .*Connection (timed out|refused)",
                          beyond.stdout)
    assert refused.search(beyond.stdout) and ssh_error, beyond.stdout[-3000:]
    assert "PLAY [Preflight every board before anything is changed]" not in beyond.stdout
    assert recap(beyond.stdout) == {"board1": (0, 0, 0), "board2": (0, 0, 0), "board3": (0, 0, 1)}, \
        beyond.stdout[-3000:]
    # One board of three (33 %) within a 34 % budget: reported, the others are provisioned,
    # smoke-tested and balanced; the run still exits non-zero.
    assert within.returncode != 0
    assert refused.search(within.stdout)
    counts = recap(within.stdout)
    assert counts["board3"] == (0, 0, 1), within.stdout[-3000:]
    assert [counts[host][1:] for host in ("board1", "board2", "balancer1")] == [(0, 0)] * 3, counts
    smoke = within.stdout.split("PLAY [Smoke test every board with a chat completion]", 1)[1]
    smoke = smoke.split("PLAY [", 1)[0]
    assert set(re.findall(r"^ok: \[(board\d)\]", smoke, re.M)) == {"board1", "board2"}
    assert "PLAY [Smoke test the fleet endpoint with a chat completion through the balancer]" in within.stdout
    assert server_pids(fleet) == pids, "nothing changed, so no server restarted"


def served_models(fleet: Fleet, board: str) -> set[str]:
    listed = fleet.board(board).exec(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/v1/models"])
    return {model["id"] for model in json.loads(listed.stdout)["data"]} - {"auto"}


@pytest.mark.timeout(2400)
def test_model_set_rollback_under_load(fleet: Fleet, tmp_path: Path) -> None:
    """After the model was added to board1 and board2: rollback.yml returns them to the set they
    served before, drained, without failing a request of the model both sets serve."""
    pair = ("board1", "board2")
    assert [served_models(fleet, b) for b in pair] == [{QWEN, DEEPSEEK}] * 2
    models = "/opt/rkllm/models"
    links = ["readlink", f"{models}/current", f"{models}/previous"]
    before = fleet.board("board1").exec(links).stdout.split()
    with streaming_clients(fleet, tmp_path) as stop:
        playbook(fleet, "ansible/rollback.yml", "-e", "rollback_component=models", "--limit", "board1:board2")
        failed = stop()
    assert failed == [], failed[:3]
    assert [served_models(fleet, b) for b in pair] == [{QWEN}] * 2
    assert fleet.board("board1").exec(links).stdout.split() == before[::-1]
    config = fleet.board("board1").exec(["cat", "/etc/rkllm-server/config.toml"]).stdout
    assert DEEPSEEK not in config and f"{models}/current/{QWEN}.rkllm" in config
    # Both sets' files stay on the board for the next rollback.
    stored = fleet.board("board1").exec(["find", f"{models}/files", "-name", "*.rkllm"]).stdout.split()
    assert sorted(Path(line).name for line in stored) == sorted([f"{QWEN}.rkllm", f"{DEEPSEEK}.rkllm"])
