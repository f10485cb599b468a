"""/metrics as the monitoring role's alerts read it: process start time, failures by reason, memory."""

from __future__ import annotations

import re
import time

import httpx
import yaml
from server_client import chat, samples
from server_harness import QWEN, model_entry, start_server

from tests.support import REPO_ROOT

__all__ = ["start_server"]

MONITORING_DEFAULTS = REPO_ROOT / "roles/monitoring/defaults/main.yml"


def rejected(values: dict, model: str, reason: str) -> float:
    return values[("rkllm_requests_rejected_total", frozenset({("model", model), ("reason", reason)}))]


def test_process_metrics_report_when_the_server_started(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        first = samples(http.get("/metrics").text)
        chat(http)
        second = samples(http.get("/metrics").text)
    started = first[("process_start_time_seconds", frozenset())]
    assert 0 < started <= time.time()
    assert second[("process_start_time_seconds", frozenset())] == started, "constant until a restart"
    assert second[("process_open_fds", frozenset())] > 0
    assert second[("process_cpu_seconds_total", frozenset())] > 0


def test_every_failure_series_exists_before_the_first_failure(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        values = samples(http.get("/metrics").text)
    for reason in ("queue_full", "model_unavailable", "run_error"):
        assert rejected(values, QWEN, reason) == 0, reason


def test_run_errors_are_counted_whole_or_streamed_and_are_not_completions(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, error_at_token=3)])
    with server.http() as http:
        whole = chat(http)
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": QWEN, "messages": [{"role": "user", "content": "x"}], "stream": True},
        ) as streamed:
            body = streamed.read().decode()
        ollama = http.post("/api/chat", json={"model": QWEN, "messages": [{"role": "user", "content": "y"}]})
        values = samples(http.get("/metrics").text)
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "run_error"
    assert '"code": "run_error"' in body
    assert '"error"' in ollama.text.splitlines()[-1], "Ollama streams by default: the error is the last line"
    assert rejected(values, QWEN, "run_error") == 3
    assert values.get(("rkllm_e2e_request_latency_seconds_count", frozenset({("model", QWEN)})), 0) == 0


def test_the_error_ratio_alert_counts_failures_and_not_back_pressure():
    regex = yaml.safe_load(MONITORING_DEFAULTS.read_text())["monitoring_alert_error_reasons_regex"]
    # Prometheus anchors label matchers: the whole reason must match.
    assert [r for r in ("run_error", "internal", "model_unavailable") if not re.fullmatch(regex, r)] == []
    assert not re.fullmatch(regex, "queue_full"), "a full queue is back-pressure, not an error"


def test_model_memory_follows_the_runtimes_perf_stats(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, memory_mb=1659)])
    model = frozenset({("model", QWEN)})
    with server.http() as http:
        assert chat(http).status_code == 200
        loaded = samples(http.get("/metrics").text)[("rkllm_model_memory_bytes", model)]
        unload = http.post("/api/generate", json={"model": QWEN, "prompt": "", "keep_alive": 0})
        assert unload.status_code == 200, unload.text
        unloaded = samples(http.get("/metrics").text)[("rkllm_model_memory_bytes", model)]
    assert loaded == 1659 * 1024 * 1024 and unloaded == 0


def test_metrics_parse_with_every_series_typed(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    text = httpx.get(f"{server.url}/metrics").text
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
    suffixes = ("", "_total", "_bucket", "_count", "_sum")
    untyped = {n for n in names if not any(n.removesuffix(s) in families for s in suffixes)}
    assert untyped == set()


def test_draining_gauge_follows_the_drain_file(start_server, make_model, tmp_path):
    drain_file = tmp_path / "drain"
    server = start_server([model_entry(make_model, QWEN)], drain_file=str(drain_file))
    with server.http() as http:
        serving = samples(http.get("/metrics").text)[("rkllm_draining", frozenset())]
        drain_file.touch()
        draining = samples(http.get("/metrics").text)[("rkllm_draining", frozenset())]
        refused = http.post("/v1/chat/completions", json={"model": QWEN, "max_tokens": 2,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        drain_file.unlink()
        resumed = samples(http.get("/metrics").text)[("rkllm_draining", frozenset())]
    assert (serving, draining, resumed) == (0, 1, 0)
    assert refused.status_code == 503
