"""What tests send to a running server and read back: chat requests, error shapes, metric samples."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from server_harness import QWEN, RunningServer

QWEN_LABELS = frozenset({("model", QWEN)})
CHAT = {"openai": "/v1/chat/completions", "ollama": "/api/chat"}


def chat_body(api: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": QWEN, "messages": [{"role": "user", "content": "hi"}], **fields}
    if api == "ollama":
        body.setdefault("stream", False)
    return body


def chat(http: httpx.Client, model: str = QWEN, text: str = "hi", **extra) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}], **extra},
    )


def assert_error_shape(api: str, response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if api == "openai":
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        assert isinstance(error, str)
        message = error
    assert fragment in message, message


class Conversation:
    """One chat's messages; each turn sends the whole history, as OpenAI clients do."""

    def __init__(self, opening: str) -> None:
        self.opening = opening
        self.messages: list[dict[str, str]] = []

    def turn(self, http: httpx.Client, index: int) -> dict[str, Any]:
        self.messages.append({"role": "user", "content": f"{self.opening}, turn {index}"})
        answer = http.post("/v1/chat/completions", json={"model": QWEN, "messages": self.messages})
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        self.messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        return body


def cached(body: dict[str, Any]) -> int:
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def samples(metrics_text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    }


def metric(http: httpx.Client, name: str, labels: frozenset = QWEN_LABELS) -> float:
    return samples(http.get("/metrics").text).get((name, labels), 0.0)


def connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


def send_without_reading(server: RunningServer, path: str, body: dict[str, Any]) -> socket.socket:
    """POST body and leave the answer unread: the caller closes the socket when it wants the client
    gone (a client timeout could expire before a loaded machine even starts the request's run)."""
    conn = connect(server)
    payload = json.dumps(body).encode()
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return conn
