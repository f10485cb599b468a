"""Hostile requests: each gets a 4xx in its API's error shape before any runtime call; nothing reloads.

Every test loads the model with one good request first, so "no INIT after it" in the double's log
proves that the hostile request cost the handle nothing.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from typing import Any

import httpx
import ollama
import openai
import pytest
from server_client import CHAT, assert_error_shape, chat_body, connect, metric, send_without_reading
from server_harness import QWEN, RunningServer, log_lines, model_entry, start_server

from rkllm_runtime.api import body as request_body
from rkllm_runtime.cli import (
    HEAD_TIMEOUT_SECONDS,
    KEEP_ALIVE_SECONDS,
    MAX_CONNECTIONS,
    STARTUP_FAILURE,
    HeadTimeoutProtocol,
    uvicorn_config,
)
from tests.support import wait_until

__all__ = ["start_server"]

@pytest.fixture
def loaded_server(start_server, make_model, double_log) -> RunningServer:
    server = start_server([model_entry(make_model, QWEN, reply_tokens=4)])
    with server.http() as http:
        assert http.post(CHAT["openai"], json=chat_body("openai")).status_code == 200
    assert len(log_lines(double_log, "INIT")) == 1
    return server


def internal_errors(server: RunningServer) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith('rkllm_requests_rejected_total{model=""'))
    return float(line.rsplit(" ", 1)[1])


def assert_unharmed(server: RunningServer, double_log) -> None:
    """No runtime re-init, nothing counted as internal, and the next request is served."""
    assert len(log_lines(double_log, "INIT")) == 1 and log_lines(double_log, "DESTROY") == []
    assert not internal_errors(server)
    with server.http() as http:
        assert http.get("/health").status_code == 200
        after = http.post(CHAT["openai"], json=chat_body("openai", max_tokens=2))
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2


def post_raw(server: RunningServer, path: str, raw: bytes) -> httpx.Response:
    with server.http() as http:
        return http.post(path, content=raw, headers={"content-type": "application/json"})


NAMELESS_TOOL = {"type": "function", "function": {}}
BAD_TOOLS = {
    "no function name": ([NAMELESS_TOOL], "tools.0.function.name"),
    "name with a quote": ([{"type": "function", "function": {"name": 'a"b'}}], "tools.0.function.name"),
    "parameters not an object schema": (
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
        'type "object"',
    ),
    "parameters a list": ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters"),
    "properties not schemas": (
        [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 1}}}}],
        "properties",
    ),
    "required not names": (
        [{"type": "function", "function": {"name": "f", "parameters": {"required": [1]}}}],
        "required",
    ),
    "not a function tool": ([{"type": "retrieval"}], "tools.0"),
}


@pytest.mark.parametrize("api", ["openai", "ollama"])
@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_invalid_tools_are_refused_before_the_runtime(loaded_server, double_log, api, case):
    tools, fragment = BAD_TOOLS[case]
    with loaded_server.http() as http:
        response = http.post(CHAT[api], json=chat_body(api, tools=tools))
    assert_error_shape(api, response, 400, fragment)
    assert log_lines(double_log, "TOOLS") == [], "set_function_tools was never called"
    assert_unharmed(loaded_server, double_log)


def test_nameless_tool_through_the_official_clients(loaded_server, double_log):
    client = openai.OpenAI(base_url=f"{loaded_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "x"}], tools=[NAMELESS_TOOL]
        )
    assert refused.value.body["param"] == "tools.0.function.name"
    with pytest.raises(ollama.ResponseError) as refused_ollama:
        ollama.Client(host=loaded_server.url).chat(
            model=QWEN, messages=[{"role": "user", "content": "x"}], tools=[NAMELESS_TOOL]
        )
    assert refused_ollama.value.status_code == 400 and "name" in refused_ollama.value.error
    assert_unharmed(loaded_server, double_log)


def test_a_valid_nested_tool_schema_still_reaches_the_runtime(loaded_server, double_log):
    schema: dict[str, Any] = {"type": "string"}
    for level in range(12):
        schema = {"type": "object", "properties": {f"level{level}": schema}}
    tool = {"type": "function", "function": {"name": "deep.tool:v1", "parameters": schema}}
    with loaded_server.http() as http:
        response = http.post(CHAT["openai"], json=chat_body("openai", tools=[tool]))
    assert response.status_code == 200
    assert "first_function=deep.tool:v1" in log_lines(double_log, "TOOLS")[-1]


@pytest.mark.parametrize("choice", ["sometimes", {"type": "function"}, {"type": "function", "function": {}}])
def test_malformed_tool_choice_is_a_400(loaded_server, double_log, choice):
    with loaded_server.http() as http:
        response = http.post(CHAT["openai"], json=chat_body("openai", tool_choice=choice))
    assert_error_shape("openai", response, 400, "tool_choice")
    assert_unharmed(loaded_server, double_log)


def test_forced_tool_choice_names_what_to_do_instead(loaded_server, double_log):
    with loaded_server.http() as http:
        response = http.post(CHAT["openai"], json=chat_body("openai", tool_choice="required"))
    assert_error_shape("openai", response, 400, "send 'auto'")
    assert response.json()["error"]["code"] == "unsupported_value"


@pytest.mark.parametrize("api", ["openai", "ollama"])
@pytest.mark.parametrize(
    ("where", "escaped"),
    [("content", "a\\ud800b"), ("content", "\\udfff"), ("content", "a\\u0000b"), ("key", "x\\u0000")],
)
def test_nul_and_lone_surrogates_are_refused_not_truncated(loaded_server, double_log, api, where, escaped):
    runs_before = len(log_lines(double_log, "RUN"))
    body = json.dumps(chat_body(api))
    if where == "content":
        raw = body.replace('"content": "hi"', f'"content": "{escaped}"')
    else:
        raw = body.replace('"model":', f'"{escaped}": 1, "model":')
    response = post_raw(loaded_server, CHAT[api], raw.encode())
    kind = "NUL" if "0000" in escaped else "lone surrogate"
    assert_error_shape(api, response, 400, kind)
    if where == "content" and api == "openai":
        assert response.json()["error"]["param"] == "messages.0.content"
    assert len(log_lines(double_log, "RUN")) == runs_before
    assert_unharmed(loaded_server, double_log)


def test_a_surrogate_pair_is_one_valid_character(loaded_server):
    raw = json.dumps(chat_body("openai")).replace('"hi"', '"smile \\ud83d\\ude00"')
    assert post_raw(loaded_server, CHAT["openai"], raw.encode()).status_code == 200


def test_nul_through_the_official_client_is_a_400(loaded_server, double_log):
    client = openai.OpenAI(base_url=f"{loaded_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=QWEN, messages=[{"role": "user", "content": "a\x00" + "b" * 400}]
        )
    assert refused.value.body["code"] == "invalid_string"
    assert_unharmed(loaded_server, double_log)


@pytest.mark.parametrize("api", ["openai", "ollama"])
@pytest.mark.parametrize("depth", [65, 100_000])
def test_deep_nesting_is_a_400(loaded_server, double_log, api, depth):
    raw = json.dumps(chat_body(api))[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    assert_error_shape(api, post_raw(loaded_server, CHAT[api], raw.encode()), 400, "nests deeper than 64")
    assert_unharmed(loaded_server, double_log)


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_message_and_tool_lists_are_bounded(loaded_server, double_log, api):
    tool = {"type": "function", "function": {"name": "f"}}
    too_many_messages = chat_body(api, messages=[{"role": "user", "content": "x"}] * 4097)
    too_many_tools = chat_body(api, tools=[tool] * 129)
    with loaded_server.http() as http:
        assert_error_shape(api, http.post(CHAT[api], json=too_many_messages), 400, "at most 4096")
        assert_error_shape(api, http.post(CHAT[api], json=too_many_tools), 400, "at most 128")
        accepted = http.post(CHAT[api], json=chat_body(api, tools=[tool] * 128))
    assert accepted.status_code == 200
    assert_unharmed(loaded_server, double_log)


def test_stop_lists_are_bounded(loaded_server, double_log):
    with loaded_server.http() as http:
        ollama_body = chat_body("ollama", options={"stop": [f"s{i}" for i in range(17)]})
        openai_body = chat_body("openai", stop=[f"s{i}" for i in range(5)])
        assert_error_shape("ollama", http.post(CHAT["ollama"], json=ollama_body), 400, "options.stop")
        assert_error_shape("openai", http.post(CHAT["openai"], json=openai_body), 400, "at most 4")
    assert_unharmed(loaded_server, double_log)


@pytest.mark.parametrize("api", ["openai", "ollama"])
@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_malformed_bodies_are_400(loaded_server, double_log, api, raw):
    response = post_raw(loaded_server, CHAT[api], raw)
    assert response.status_code == 400 and "error" in response.json()
    assert_unharmed(loaded_server, double_log)


@pytest.mark.parametrize("api", ["openai", "ollama"])
@pytest.mark.parametrize("declared", [True, False])
def test_bodies_over_the_limit_are_413(loaded_server, double_log, api, declared):
    raw = json.dumps(chat_body(api, padding="x" * (1 << 20))).encode()
    with loaded_server.http() as http:
        if declared:
            response = http.post(CHAT[api], content=raw)
        else:  # chunked: no Content-Length to refuse up front
            response = http.post(
                CHAT[api], content=iter([raw[i : i + 65536] for i in range(0, len(raw), 65536)])
            )
    assert_error_shape(api, response, 413, "exceeds the limit of 1048576 bytes")
    assert_unharmed(loaded_server, double_log)


def test_a_client_leaving_mid_body_is_no_error(loaded_server, double_log, caplog):
    caplog.set_level(logging.INFO)
    host, port = loaded_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b'{"model": "' + b"x" * 1000
        )
    wait_until(lambda: any("client disconnected" in r.getMessage() for r in caplog.records),
               "the disconnect logged")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert_unharmed(loaded_server, double_log)


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_clients_leaving_a_stream_or_a_whole_answer_are_no_errors(
    start_server, make_model, double_log, caplog, api
):
    caplog.set_level(logging.INFO)
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=50, reply_tokens=400)])
    with server.http() as http, http.stream("POST", CHAT[api], json=chat_body(api, stream=True)) as stream:
        next(stream.iter_lines())
    # The stream's request is over once it gives its turn back: its run aborted or, when the client
    # left before the run began (an OpenAI stream's first chunk precedes it), the run never started.
    with server.http() as http:
        wait_until(lambda: metric(http, "rkllm_requests_running") == 0, "the left stream's request ends")
    runs = len(log_lines(double_log, "RUN"))
    assert len(log_lines(double_log, "FINISH")) == runs <= 1
    # The whole-answer client leaves once its run has started (a fixed client timeout could expire
    # while the request still waits for the loaded machine, and then nothing runs).
    whole = send_without_reading(server, CHAT[api], chat_body(api, stream=False))
    wait_until(lambda: len(log_lines(double_log, "RUN")) == runs + 1, "the whole-answer request's run starts")
    whole.close()
    wait_until(lambda: len(log_lines(double_log, "FINISH")) == runs + 1, "the whole answer's run ends")
    assert all(
        "reason=abort" in line or "reason=callback" in line for line in log_lines(double_log, "FINISH")
    )
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not internal_errors(server)
    with server.http() as http:
        assert http.post(CHAT["openai"], json=chat_body("openai", max_tokens=1)).status_code == 200


class QuickHeadProtocol(HeadTimeoutProtocol):
    head_timeout_seconds = 0.5


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """True once the server closes conn (recv sees EOF) within `within` seconds."""
    conn.settimeout(within)
    try:
        while conn.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


def test_the_board_runs_with_the_documented_connection_limits():
    config = uvicorn_config(object(), "127.0.0.1", 8080, "info")
    assert (
        config.http is HeadTimeoutProtocol
        and HeadTimeoutProtocol.head_timeout_seconds == HEAD_TIMEOUT_SECONDS
    )
    assert (config.timeout_keep_alive, config.limit_concurrency) == (KEEP_ALIVE_SECONDS, MAX_CONNECTIONS)


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"])
def test_a_silent_or_trickling_client_is_cut_off_at_the_head_deadline(start_server, make_model, sent):
    server = start_server([model_entry(make_model, QWEN)], uvicorn_settings={"http": QuickHeadProtocol})
    with connect(server) as conn:
        conn.sendall(sent)
        assert closed_by_server(conn, within=5)
    with server.http() as http:
        assert http.get("/health").status_code == 200


def test_an_idle_keep_alive_connection_lives_past_the_head_deadline_then_closes(start_server, make_model):
    server = start_server(
        [model_entry(make_model, QWEN)],
        uvicorn_settings={"http": QuickHeadProtocol, "timeout_keep_alive": 2},
    )
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(server) as conn:
        conn.sendall(request)
        assert b"200 OK" in conn.recv(4096)
        # Idle longer than the head deadline: only the keep-alive timeout governs an idle connection.
        assert not closed_by_server(conn, within=1.0)
        conn.sendall(request)
        assert b"200 OK" in conn.recv(4096)
        assert closed_by_server(conn, within=5)


def test_a_body_that_never_completes_gets_a_408(loaded_server, double_log, monkeypatch):
    monkeypatch.setattr(request_body, "BODY_TIMEOUT_SECONDS", 0.5)
    with connect(loaded_server) as conn:
        conn.sendall(
            b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{"
        )
        conn.settimeout(10)
        answer = b""
        while not answer.endswith(b"}") and (chunk := conn.recv(4096)):
            answer += chunk
    assert (
        answer.startswith(b"HTTP/1.1 408") and b'{"error":"request body not received within 0.5 s"}' in answer
    )
    assert_unharmed(loaded_server, double_log)


def test_connections_over_the_cap_are_refused_and_the_rest_served(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)], uvicorn_settings={"limit_concurrency": 3})
    held = [connect(server) for _ in range(3)]
    try:
        with connect(server) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert extra.recv(4096).startswith(b"HTTP/1.1 503")
    finally:
        for conn in held:
            conn.close()
    with server.http() as http:
        wait_until(lambda: http.get("/health").status_code == 200, "/health answers 200")


def test_the_server_exits_with_uvicorns_startup_failure_status_when_it_cannot_bind(
    double_library_path, tmp_path
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "server.toml"
        config.write_text(f'library = "{double_library_path}"\nport = {taken.getsockname()[1]}\n')
        server = subprocess.run(
            [sys.executable, "-m", "rkllm_runtime", "--config", str(config), "--log-level", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert server.returncode == STARTUP_FAILURE and "address already in use" in server.stderr
