"""Operations: /health, /ready, /metrics, bad input, model switching, the CLI and a library crash."""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx
import pytest
from server_client import chat, samples
from server_harness import QWEN, R1, log_lines, model_entry, start_server

from tests.support import free_port, wait_until

__all__ = ["start_server"]


def test_ready_exercises_the_runtime_of_pinned_models(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, config={"pinned": True})])
    with server.http() as http:
        assert http.get("/health").json() == {"status": "alive"}
        runs = len(log_lines(double_log, "RUN"))
        ready = http.get("/ready")
        assert ready.status_code == 200 and ready.json()["models"] == {QWEN: "ok"}
        assert len(log_lines(double_log, "RUN")) == runs + 1, "readiness ran a generation"


def test_ready_fails_when_the_runtime_fails_even_though_the_model_is_loaded(
    start_server, make_model, double_log
):
    server = start_server([model_entry(make_model, QWEN, error_at_token=0, config={"pinned": True})])
    with server.http() as http:
        assert http.get("/health").status_code == 200, "alive is not ready"
        ready = http.get("/ready")
    assert ready.status_code == 503 and QWEN in ready.json()["models"]
    assert len(log_lines(double_log, "INIT")) == 2, "the failing handle was re-initialised once"


def test_ready_reinitialises_a_broken_handle(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, config={"pinned": True})])
    server.scheduler.registry.get(QWEN).slots[0].engine.close()  # the handle is gone behind the server's back
    with server.http() as http:
        ready = http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert len(log_lines(double_log, "INIT")) == 2
        assert chat(http).status_code == 200


def test_metrics_report_requests_tokens_latencies_npu_and_build(start_server, make_model, tmp_path):
    load, version = tmp_path / "load", tmp_path / "version"
    load.write_text("NPU load:  Core0: 12%, Core1:  0%, Core2: 57%,\n")
    version.write_text("RKNPU driver: v0.9.8\n")
    server = start_server(
        [model_entry(make_model, QWEN, decode_tokens_per_second=500, config={"sha256": "cd" * 32})],
        rknpu={"load_path": str(load), "version_path": str(version)},
    )
    with server.http() as http:
        answer = chat(http).json()
        values = samples(http.get("/metrics").text)
    model = frozenset({("model", QWEN)})
    assert values[("rkllm_generation_tokens_total", model)] == answer["usage"]["completion_tokens"]
    assert values[("rkllm_prompt_tokens_total", model)] == answer["usage"]["prompt_tokens"]
    for histogram in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "request_queue_time_seconds",
        "e2e_request_latency_seconds",
        "decode_tokens_per_second",
        "model_load_seconds",
    ):
        assert values[(f"rkllm_{histogram}_count", model)] >= 1, histogram
    assert (
        values[("rkllm_inter_token_latency_seconds_count", model)] == answer["usage"]["completion_tokens"] - 1
    )
    assert values[("rkllm_requests_running", model)] == 0 and values[("rkllm_requests_waiting", model)] == 0
    assert values[("rkllm_npu_load_percent", frozenset({("core", "2")}))] == 57
    build = frozenset(
        {("server_version", "0.1.0"), ("server_revision", "unknown"), ("runtime", "1.2.3"),
         ("driver", "0.9.8"), ("model", QWEN), ("model_sha256", "cd" * 32)}
    )
    assert values[("rkllm_build_info", build)] == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", b'{"model": 5, "messages": []}', 400, "model"),
        ("/v1/chat/completions", b'{"model": "Qwen2.5-1.5B-Instruct", "messages": "hi"}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "gpt-4",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "Qwen2.5-1.5B-Instruct", "n": 2, "messages": [{"role": "user", "content": "x"}]}',
            400,
            "n=2",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "Qwen2.5-1.5B-Instruct", "logprobs": true, "messages": [{"role": "user"}]}',
            400,
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            b'{"model": "Qwen2.5-1.5B-Instruct", "temperature": 2.5, "messages": [{"role": "user"}]}',
            400,
            "temperature",
        ),
        ("/v1/completions", b'{"model": "Qwen2.5-1.5B-Instruct", "prompt": ["a", "b"]}', 400, "one prompt"),
        ("/api/chat", b"{oops", 400, "not valid JSON"),
        ("/api/generate", b'{"model": "Qwen2.5-1.5B-Instruct", "prompt": 7}', 400, "prompt"),
        (
            "/api/generate",
            b'{"model": "Qwen2.5-1.5B-Instruct", "prompt": "x", "format": "json"}',
            400,
            "format",
        ),
        ("/api/show", b'{"model": "nope"}', 404, "nope"),
    ],
)
def test_bad_input_gets_a_4xx_in_the_apis_own_shape(start_server, make_model, path, body, status, needle):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert isinstance(message, str) and needle in message


def test_prompt_over_the_context_is_refused_with_token_counts(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, max_context=512, config={"context_length": 512})])
    with server.http() as http:
        too_long = chat(http, text="word " * 600)
        ollama_too_long = http.post(
            "/api/generate", json={"model": QWEN, "prompt": "word " * 600, "stream": False}
        )
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in too_long.json()["error"]["message"] and "7" in too_long.json()["error"]["message"]
    assert ollama_too_long.status_code == 400 and "512 tokens" in ollama_too_long.json()["error"]
    assert log_lines(double_log, "RUN") == []


def test_oversized_bodies_are_refused(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)], max_body_bytes=1000)
    with server.http() as http:
        big = chat(http, text="x" * 2000)
        chunked = http.post("/api/chat", content=iter([b'{"model": "x", "messages": [', b" " * 2000, b"]}"]))
    assert big.status_code == 413 and "1000 bytes" in big.json()["error"]["message"]
    assert chunked.status_code == 413 and "1000 bytes" in chunked.json()["error"]


def test_unknown_routes_and_methods_keep_the_json_shape(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
        assert http.get("/v1/chat/completions").status_code == 405
        assert isinstance(http.get("/api/nothing").json()["error"], str)


def test_models_that_do_not_fit_together_are_swapped_lru(start_server, make_model, double_log):
    server = start_server(
        [
            model_entry(make_model, QWEN, config={"memory_mb": 600}),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", config={"memory_mb": 600}),
        ],
        npu_memory_budget_mb=1000,
    )
    with server.http() as http:
        assert chat(http, QWEN).json()["model"] == QWEN
        assert chat(http, R1).json()["model"] == R1
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [R1]
        assert len(log_lines(double_log, "DESTROY")) == 1, "the least recently used model was unloaded"
        assert chat(http, QWEN).status_code == 200
        loads = samples(http.get("/metrics").text)
    assert loads[("rkllm_model_load_seconds_count", frozenset({("model", QWEN)}))] == 2


def test_a_pinned_model_is_never_evicted(start_server, make_model):
    server = start_server(
        [
            model_entry(make_model, QWEN, config={"memory_mb": 600, "pinned": True}),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", config={"memory_mb": 600}),
        ],
        npu_memory_budget_mb=1000,
    )
    with server.http() as http:
        refused = chat(http, R1)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
        assert "pinned" in refused.json()["error"]["message"] and "retry-after" in refused.headers
        assert chat(http, QWEN).status_code == 200


def test_a_model_that_fails_to_init_is_a_503_naming_the_cause(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, fail_init="true")])
    with server.http() as http:
        failed = chat(http)
    assert failed.status_code == 503 and "rkllm_init failed" in failed.json()["error"]["message"]


def _run_cli(double_library_path, model_path, port, env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rkllm_runtime",
            "--lib",
            str(double_library_path),
            "--model",
            f"{QWEN}={model_path}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    def healthy() -> bool:
        assert process.poll() is None, process.stderr.read()
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, "the server healthy", deadline_s=20, interval=0.05)


def test_the_cli_starts_with_only_flags_and_the_double(double_library_path, make_model, double_log):
    port = free_port()
    process = _run_cli(double_library_path, make_model("cli"), port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            timeout=10,
            json={"model": QWEN, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM once shut down (systemd counts that as a clean stop).
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)
    assert log_lines(double_log, "DESTROY"), "the handle was destroyed on the way out"


def test_a_library_crash_kills_only_the_server_process(double_library_path, make_model):
    port = free_port()
    process = _run_cli(double_library_path, make_model("segv", segv_at_token=2), port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        with pytest.raises(httpx.TransportError):
            httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                timeout=10,
                json={"model": QWEN, "messages": [{"role": "user", "content": "hi"}]},
            )
        assert process.wait(timeout=20) == -signal.SIGSEGV
        assert "Segmentation fault" in process.stderr.read(), "faulthandler showed where Python was"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_refuses_a_bad_config_clearly(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("port = 'eighty'")
    result = subprocess.run(
        [sys.executable, "-m", "rkllm_runtime", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "port" in result.stderr and "Traceback" not in result.stderr


def test_a_request_finding_a_broken_handle_gets_a_fresh_one(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        assert chat(http).status_code == 200
        server.scheduler.registry.get(QWEN).slots[0].engine.close()
        healed = chat(http)
    assert healed.status_code == 200 and healed.json()["choices"][0]["message"]["content"]
    assert len(log_lines(double_log, "INIT")) == 2


def test_a_pinned_model_cannot_be_unloaded_through_ollama(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, config={"pinned": True})])
    with server.http() as http:
        refused = http.post("/api/generate", json={"model": QWEN, "prompt": "", "keep_alive": 0})
        assert refused.status_code == 400 and "pinned" in refused.json()["error"]
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [QWEN]


def test_an_internal_bug_is_a_counted_json_500_without_traceback(start_server, make_model, monkeypatch):
    server = start_server([model_entry(make_model, QWEN)])

    def broken(model: str):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.scheduler, "admit", broken)
    with server.http() as http:
        openai_shape = chat(http)
        ollama_shape = http.post(
            "/api/chat", json={"model": QWEN, "messages": [{"role": "user", "content": "x"}]}
        )
        values = samples(http.get("/metrics").text)
    internal = frozenset({("model", ""), ("reason", "internal")})
    assert values[("rkllm_requests_rejected_total", internal)] == 2, "the error-ratio alert sees bugs"
    assert openai_shape.status_code == 500 and openai_shape.json()["error"]["type"] == "server_error"
    assert ollama_shape.status_code == 500 and isinstance(ollama_shape.json()["error"], str)
    for response in (openai_shape, ollama_shape):
        assert "secret internals" not in response.text and "Traceback" not in response.text


def test_a_request_refused_after_parsing_leaves_the_handle_free(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http(timeout=5) as http:
        refused = chat(http, stop=["a", "b", "c", "d", "e"])
        assert refused.status_code == 400 and "stop" in refused.json()["error"]["message"]
        assert chat(http).status_code == 200
        assert 'rkllm_requests_running{model="Qwen2.5-1.5B-Instruct"} 0.0' in http.get("/metrics").text


def test_a_full_npu_domain_evicts_an_idle_model(start_server, make_model, double_log, monkeypatch):
    monkeypatch.setenv("RKLLM_DOUBLE_NPU_DOMAIN_MB", "1000")
    server = start_server(
        [
            model_entry(make_model, QWEN, memory_mb=600),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", memory_mb=600),
        ],
        base_domain_policy="shared",
    )
    with server.http() as http:
        assert chat(http, QWEN).status_code == 200
        answer = chat(http, R1)
        assert answer.status_code == 200 and answer.json()["model"] == R1
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [R1]
    assert any("INIT_FAILED" in line for line in double_log.read_text().splitlines())
