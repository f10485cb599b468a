"""Draining a node for maintenance: the drain file refuses new work with a retryable 503 while
admitted requests (running and queued) finish; removing the file takes the node back."""

from __future__ import annotations

import threading

import httpx
from server_harness import QWEN, model_entry, start_server

from tests.support import wait_until

__all__ = ["start_server"]

CHAT = {"model": QWEN, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6}


def stream_text(server_url: str, results: list[str]) -> None:
    with httpx.Client(base_url=server_url, timeout=30) as http, http.stream(
        "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        results.append(f"{response.status_code} " + "".join(response.iter_lines()))


def test_a_draining_node_refuses_new_work_and_finishes_what_it_admitted(start_server, make_model, tmp_path):
    drain_file = tmp_path / "drain"
    # 6 tokens at 20 tok/s: a stream stays in flight long enough to drain around it.
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=20)],
                          drain_file=str(drain_file))
    streams: list[str] = []
    running = [threading.Thread(target=stream_text, args=(server.url, streams)) for _ in range(2)]
    for thread in running:
        thread.start()
    with server.http() as http:
        # One request runs, the other waits in the queue.
        wait_until(lambda: f'rkllm_requests_waiting{{model="{QWEN}"}} 1.0' in http.get("/metrics").text,
                   "one request waiting")
        drain_file.touch()

        refused = http.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "draining"
        assert int(refused.headers["retry-after"]) >= 1
        ollama = http.post("/api/chat", json={**CHAT, "stream": False})
        assert ollama.status_code == 503 and "draining" in ollama.json()["error"]
        ready = http.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "draining", "models": {QWEN: "ok"}}

        for thread in running:
            thread.join(timeout=30)
        # Both admitted requests (one running, one queued) completed their streams.
        assert len(streams) == 2 and all(s.startswith("200 ") and "[DONE]" in s for s in streams), streams
        assert 'reason="draining"' in http.get("/metrics").text

        drain_file.unlink()
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert http.get("/ready").status_code == 200
