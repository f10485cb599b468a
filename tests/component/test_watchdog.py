"""The hung-runtime watchdog over the real binding and the C double's "hang at token k" fault.

Bounds are made short through the server config (a 256-token context at 2000 tokens/s plus 0.25 s
of slack: a 0.38 s stall bound), so a hang is judged within a second and no test sleeps.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_client import Conversation, cached, metric
from server_harness import QWEN, log_lines, model_entry, start_server

from rkllm_runtime.config import WatchdogConfig, parse_config
from rkllm_runtime.watchdog import SystemdNotifier
from tests.support import free_port, wait_until

__all__ = ["start_server"]

HANG = "HANG"  # the double hangs only on prompts containing this (hang_trigger)
SHORT_WATCHDOG = {"prefill_tokens_per_second": 2000.0, "slack_seconds": 0.25, "abort_grace_seconds": 5.0}


def hanging_model(make_model: Any, *, ignores_abort: bool, kv_slots: int = 1) -> dict[str, Any]:
    return model_entry(
        make_model,
        QWEN,
        hang_at_token=2,
        hang_trigger=HANG,
        hang_ignores_abort=str(ignores_abort).lower(),
        config={"kv_slots": kv_slots, "context_length": 256},
    )


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": QWEN, "messages": [{"role": "user", "content": text}], **extra}


def test_the_default_bound_allows_a_whole_context_prefill_at_40_tokens_per_second() -> None:
    assert WatchdogConfig().stall_seconds(4096) == pytest.approx(4096 / 40 + 15)
    assert parse_config({"watchdog": {"prefill_tokens_per_second": 100}}).watchdog.stall_seconds(2000) == 35


def test_a_prefill_of_almost_the_whole_context_at_the_slowest_rate_is_not_judged_hung(
    start_server, make_model, double_log
):
    """The double prefills at 10 ms/token, exactly the configured slowest rate (100 tokens/s)."""
    entry = model_entry(make_model, QWEN, prefill_ms_per_token=10, config={"context_length": 256})
    watchdog = {"prefill_tokens_per_second": 100.0, "slack_seconds": 0.25}  # bound: 2.81 s
    server = start_server([entry], watchdog=watchdog)
    with server.http() as http:
        answer = http.post("/v1/chat/completions", json=chat("x" * 880))
        assert answer.status_code == 200, answer.text
        prefilled = int(re.search(r"prefill_tokens=(\d+)", log_lines(double_log, "RUN")[-1]).group(1))
        assert prefilled > 200, "the prompt should fill most of the 256-token context"
        assert metric(http, "rkllm_watchdog_fired_total") == 0
        assert metric(http, "rkllm_watchdog_checks_total", frozenset()) > 0, "the watchdog was looking"


def test_a_hang_honouring_abort_fails_its_request_and_the_model_serves_on(
    start_server, make_model, double_log
):
    entry = hanging_model(make_model, ignores_abort=False, kv_slots=2)
    server = start_server([entry], watchdog=SHORT_WATCHDOG)
    with server.http() as http:
        kept = Conversation("a conversation whose cache must survive")
        kept.turn(http, 1)

        whole = http.post("/v1/chat/completions", json=chat(f"{HANG} please"))
        assert whole.status_code == 500, whole.text
        error = whole.json()["error"]
        assert error["code"] == "run_error"
        assert "watchdog: no progress from the NPU runtime" in error["message"]

        with http.stream("POST", "/v1/chat/completions", json=chat(f"{HANG} again", stream=True)) as stream:
            assert stream.status_code == 200
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        tokens = [json.loads(e) for e in events if e != "[DONE]" and "error" not in json.loads(e)]
        assert any(t["choices"][0]["delta"].get("content") for t in tokens), "the stream had started"
        last = json.loads(events[-1])
        assert "watchdog" in last["error"]["message"], events[-1]

        ollama = http.post("/api/chat", json=chat(f"{HANG} ollama", stream=False))
        assert ollama.status_code == 500 and "watchdog" in ollama.json()["error"], ollama.text

        assert metric(http, "rkllm_watchdog_fired_total") == 3
        assert len(log_lines(double_log, "HANG")) == 3
        assert metric(http, "rkllm_watchdog_runtime_stuck", frozenset()) == 0

        # The conversation on the other slot still continues from its cache.
        assert cached(kept.turn(http, 2)) > 0
        inits = len(log_lines(double_log, "INIT"))
        fresh = http.post("/v1/chat/completions", json=chat("a new conversation"))
        assert fresh.status_code == 200 and fresh.json()["choices"][0]["message"]["content"]
        assert len(log_lines(double_log, "INIT")) == inits + 1, "the hung slot's handle is re-created"
        assert log_lines(double_log, "DESTROY"), "the hung handle was destroyed"
        assert http.get("/ready").status_code == 200


class NotifySocket:
    """A stand-in for systemd's notification socket: records every sd_notify datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self.messages: list[str] = []

    def receive_until(self, wanted: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in "\n".join(self.messages):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {wanted!r} from the server within {timeout} s: {self.messages}")
            self._sock.settimeout(remaining)
            self.messages.append(self._sock.recv(4096).decode())

    def drain(self) -> None:
        self._sock.setblocking(False)
        try:
            while True:
                self.messages.append(self._sock.recv(4096).decode())
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_a_hang_ignoring_abort_stops_the_systemd_pings(
    make_model, double_library_path, double_log, notify_socket, tmp_path
):
    """Its rkllm_run never returns, so only a restart helps: the server runs as its own process here
    (as under systemd) and is killed at the end, as systemd's watchdog would."""
    watchdog = {**SHORT_WATCHDOG, "abort_grace_seconds": 0.3}
    entry = hanging_model(make_model, ignores_abort=True)
    config = tmp_path / "server.toml"
    config.write_text(
        f"library = {json.dumps(str(double_library_path))}\n"
        "[watchdog]\n" + "".join(f"{k} = {v}\n" for k, v in watchdog.items()) + "[[models]]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in entry.items())
    )
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "3000000"}
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        server = subprocess.Popen(
            [sys.executable, "-m", "rkllm_runtime", "--config", str(config), "--port", str(port)],
            env=env, stderr=stderr, stdout=stderr,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            wait_until(lambda: _answers(http), "the server answers", deadline_s=30)
            notify_socket.receive_until("WATCHDOG=1")
            assert http.post("/v1/chat/completions", json=chat("fine")).status_code == 200

            hung = http.post("/v1/chat/completions", json=chat(f"{HANG} forever"))
            assert hung.status_code == 500 and "watchdog" in hung.json()["error"]["message"], hung.text
            assert metric(http, "rkllm_watchdog_runtime_stuck", frozenset()) == 1
            assert metric(http, "rkllm_watchdog_fired_total") == 1
            notify_socket.receive_until("STATUS=NPU runtime stuck")
            assert "the runtime is stuck" in log.read_text()

            refused = http.post("/v1/chat/completions", json=chat("after the hang"))
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "runtime_hung"
            assert "Retry-After" in refused.headers
            assert http.get("/ready").status_code == 503

            # The watchdog goes on checking, but never pings again.
            status_at = len(notify_socket.messages)
            checks = metric(http, "rkllm_watchdog_checks_total", frozenset())
            wait_until(lambda: metric(http, "rkllm_watchdog_checks_total", frozenset()) >= checks + 5,
                       "five more watchdog checks")
            notify_socket.drain()
            after = notify_socket.messages[status_at:]
            assert "WATCHDOG=1" not in after, after
    finally:
        server.kill()
        server.wait(timeout=30)


def _answers(http: httpx.Client) -> bool:
    try:
        return http.get("/health").status_code == 200
    except httpx.TransportError:
        return False


def test_notifications_reach_an_abstract_socket_and_only_the_named_process_pings() -> None:
    name = f"rkllm-watchdog-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        ours = SystemdNotifier({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "4000000"})
        assert ours.watchdog_seconds == 4.0
        assert ours.notify("WATCHDOG=1") and listener.recv(64) == b"WATCHDOG=1"
    other = {"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert SystemdNotifier(other).watchdog_seconds is None, "the watchdog belongs to another process"
    assert not SystemdNotifier({}).notify("WATCHDOG=1"), "not under systemd: nothing to notify"
