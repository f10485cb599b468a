"""rkllm_runtime.client (sync and async) and the rkllm-chat terminal loop, against a real server."""

from __future__ import annotations

import io
import itertools
import threading
import time

import httpx
import pytest
from server_harness import QWEN, log_lines, model_entry, start_server

from rkllm_runtime.client import AsyncRkllmClient, RkllmClient, RkllmClientError
from rkllm_runtime.client_cli import chat_loop

__all__ = ["start_server"]

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def server(start_server, make_model):
    return start_server([model_entry(make_model, QWEN, reply_tokens=12)])


def test_chat_and_generate_whole_and_streamed(server):
    with RkllmClient(server.url, model=QWEN) as client:
        whole = client.chat(HELLO)
        pieces = list(client.chat(HELLO, stream=True))
        assert len(pieces) > 1 and "".join(pieces) == whole and whole
        generated = client.generate("Hello", max_tokens=4)
        streamed = list(client.generate("Hello", stream=True, max_tokens=4))
        assert "".join(streamed) == generated and len(streamed) > 1


async def test_async_client_streams_the_same_text(server):
    async with AsyncRkllmClient(server.url, model=QWEN) as client:
        whole = await client.chat(HELLO)
        pieces = [p async for p in await client.chat(HELLO, stream=True)]
        assert "".join(pieces) == whole and len(pieces) > 1
        generated = await client.generate("Hi", max_tokens=3)
        assert "".join([p async for p in await client.generate("Hi", stream=True, max_tokens=3)]) == generated


def test_errors_carry_the_servers_message(server):
    with RkllmClient(server.url) as client, pytest.raises(RkllmClientError) as error:
        client.chat(HELLO, model="missing")
    assert error.value.status == 404 and "missing" in str(error.value)


def test_a_503_is_retried_after_retry_after(start_server, make_model):
    # One run of ~1 s holds the only slot (queue_size 0): the first attempt is refused.
    server = start_server(
        [
            model_entry(
                make_model, QWEN, decode_tokens_per_second=20, reply_tokens=20, config={"queue_size": 0}
            )
        ]
    )
    with (
        RkllmClient(server.url, model=QWEN) as busy,
        RkllmClient(server.url, model=QWEN, retries=0) as impatient,
    ):
        stream = busy.chat(HELLO, stream=True)
        first = next(stream)
        drain = threading.Thread(target=lambda: list(stream))
        drain.start()
        with pytest.raises(RkllmClientError) as refused:
            impatient.chat(HELLO)
        assert refused.value.status == 503
        with RkllmClient(server.url, model=QWEN, retries=3) as patient:
            started = time.monotonic()
            answer = patient.chat(HELLO, max_tokens=2)
            waited = time.monotonic() - started
        drain.join()
    assert first and answer and waited >= 0.9, "waited for Retry-After (at least 1 s) before retrying"


def test_retry_after_is_honoured_and_capped():
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            return httpx.Response(503, headers={"Retry-After": "7"}, json={"error": {"message": "busy"}})
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}}]})

    client = RkllmClient("http://board", transport=httpx.MockTransport(handler), max_retry_wait=0.2)
    assert client.chat(HELLO) == "ok"
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 3 and all(0.19 <= gap < 5 for gap in gaps), "capped at 0.2 s, not the 7 s asked"


def test_stream_error_event_raises(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, error_at_token=2)])
    with (
        RkllmClient(server.url, model=QWEN) as client,
        pytest.raises(RkllmClientError, match="stream failed"),
    ):
        list(client.chat(HELLO, stream=True))


def test_terminal_chat_keeps_the_conversation(server, double_log):
    typed = io.StringIO("Hello\n\n/clear\nAgain\nAnd more\n/quit\n")
    shown = io.StringIO()
    with RkllmClient(server.url, model=QWEN) as client:
        assert chat_loop(client, typed, shown) == 0
    runs = log_lines(double_log, "RUN")
    assert len(runs) == 3 and shown.getvalue().count("> ") == 6
    assert "kv_before=0 " in runs[1], "/clear started a new conversation"
    assert "keep_history=1" in runs[2] and "kv_before=0 " not in runs[2], "the next turn reused the cache"
