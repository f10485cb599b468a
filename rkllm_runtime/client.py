"""Python client of an rkllm-runtime server (or of the balancer in front of a fleet), sync and async.

    with RkllmClient("http://board1:8080") as client:
        print(client.chat([{"role": "user", "content": "Hi"}]))
        for piece in client.generate("Tell me a story", stream=True):
            print(piece, end="", flush=True)

A 503 (queue full) is retried after the server's Retry-After, up to `retries` times; streams are
only retried before their first byte, so no text is ever repeated.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, overload

import httpx

Messages = Sequence[dict[str, Any]]
_CHAT_PATH = "/v1/chat/completions"
_GENERATE_PATH = "/api/generate"


class RkllmClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status


def _error_message(payload: object) -> str | None:
    if isinstance(payload, dict) and "error" in payload:
        error = payload["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    return None


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = _error_message(response.json()) or response.text
    except json.JSONDecodeError:
        message = response.text
    raise RkllmClientError(response.status_code, message)


def _retry_delay(response: httpx.Response, cap: float) -> float:
    header = response.headers.get("retry-after", "")
    seconds = float(header) if header.replace(".", "", 1).isdigit() else 1.0
    return min(seconds, cap)


def _chat_body(model: str, messages: Messages, stream: bool, max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": list(messages), "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def _generate_body(model: str, prompt: str, stream: bool, max_tokens: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "stream": stream}
    if max_tokens is not None:
        body["options"] = {"num_predict": max_tokens}
    return body


def _sse_text(line: str) -> str | None:
    """Text delta of one SSE line of a chat stream; None at the end of the stream."""
    if not line.startswith("data:"):
        return ""
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    payload = json.loads(data)
    error = _error_message(payload)
    if error is not None:
        raise RkllmClientError(0, f"stream failed: {error}")
    choices = payload.get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


def _ndjson_text(line: str) -> str | None:
    """Text of one NDJSON line of a generate stream; None once the last line has been read."""
    if not line.strip():
        return ""
    payload = json.loads(line)
    error = _error_message(payload)
    if error is not None:
        raise RkllmClientError(0, f"stream failed: {error}")
    return None if payload.get("done") else str(payload.get("response") or "")


def _whole_chat(payload: dict[str, Any]) -> str:
    return str(payload["choices"][0]["message"].get("content") or "")


def _whole_generate(payload: dict[str, Any]) -> str:
    return str(payload.get("response") or "")


def _lines(response: httpx.Response, parse: Callable[[str], str | None]) -> Iterator[str]:
    try:
        for line in response.iter_lines():
            text = parse(line)
            if text is None:
                return
            if text:
                yield text
    finally:
        response.close()


async def _alines(response: httpx.Response, parse: Callable[[str], str | None]) -> AsyncIterator[str]:
    try:
        async for line in response.aiter_lines():
            text = parse(line)
            if text is None:
                return
            if text:
                yield text
    finally:
        await response.aclose()


class _ClientSettings:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        model: str = "auto",
        timeout: float = 300.0,
        connect_timeout: float = 5.0,
        retries: int = 3,
        max_retry_wait: float = 30.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self._retries = retries
        self._max_retry_wait = max_retry_wait
        self._http_options: dict[str, Any] = {
            "base_url": base_url,
            "timeout": httpx.Timeout(timeout, connect=connect_timeout),
        }
        if transport is not None:
            self._http_options["transport"] = transport


class RkllmClient(_ClientSettings):
    def __init__(self, base_url: str = "http://127.0.0.1:8080", **settings: Any) -> None:
        super().__init__(base_url, **settings)
        self._http = httpx.Client(**self._http_options)

    def __enter__(self) -> RkllmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
    ) -> str: ...
    @overload
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
    ) -> Iterator[str]: ...
    def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: bool = False,
        max_tokens: int | None = None,
    ) -> str | Iterator[str]:
        body = _chat_body(model or self.model, messages, stream, max_tokens)
        if stream:
            return _lines(self._send(_CHAT_PATH, body), _sse_text)
        return _whole_chat(self._post(_CHAT_PATH, body))

    @overload
    def generate(
        self,
        prompt: str,
        *,
        model: str | None = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
    ) -> str: ...
    @overload
    def generate(
        self, prompt: str, *, model: str | None = ..., stream: Literal[True], max_tokens: int | None = ...
    ) -> Iterator[str]: ...
    def generate(
        self, prompt: str, *, model: str | None = None, stream: bool = False, max_tokens: int | None = None
    ) -> str | Iterator[str]:
        body = _generate_body(model or self.model, prompt, stream, max_tokens)
        if stream:
            return _lines(self._send(_GENERATE_PATH, body), _ndjson_text)
        return _whole_generate(self._post(_GENERATE_PATH, body))

    def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        for attempt in range(self._retries + 1):
            response = self._http.send(self._http.build_request("POST", path, json=body), stream=True)
            if response.status_code != 503 or attempt == self._retries:
                break
            response.close()
            time.sleep(_retry_delay(response, self._max_retry_wait))
        if response.status_code >= 400:
            response.read()
            response.close()
            _raise_for(response)
        return response

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._send(path, body)
        try:
            payload: dict[str, Any] = json.loads(response.read())
        finally:
            response.close()
        return payload


class AsyncRkllmClient(_ClientSettings):
    def __init__(self, base_url: str = "http://127.0.0.1:8080", **settings: Any) -> None:
        super().__init__(base_url, **settings)
        self._http = httpx.AsyncClient(**self._http_options)

    async def __aenter__(self) -> AsyncRkllmClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
    ) -> str: ...
    @overload
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = ...,
        stream: Literal[True],
        max_tokens: int | None = ...,
    ) -> AsyncIterator[str]: ...
    async def chat(
        self,
        messages: Messages,
        *,
        model: str | None = None,
        stream: bool = False,
        max_tokens: int | None = None,
    ) -> str | AsyncIterator[str]:
        """`async for piece in await client.chat(messages, stream=True)` streams text deltas."""
        body = _chat_body(model or self.model, messages, stream, max_tokens)
        if stream:
            return _alines(await self._send(_CHAT_PATH, body), _sse_text)
        return _whole_chat(await self._post(_CHAT_PATH, body))

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = ...,
        stream: Literal[False] = ...,
        max_tokens: int | None = ...,
    ) -> str: ...
    @overload
    async def generate(
        self, prompt: str, *, model: str | None = ..., stream: Literal[True], max_tokens: int | None = ...
    ) -> AsyncIterator[str]: ...
    async def generate(
        self, prompt: str, *, model: str | None = None, stream: bool = False, max_tokens: int | None = None
    ) -> str | AsyncIterator[str]:
        body = _generate_body(model or self.model, prompt, stream, max_tokens)
        if stream:
            return _alines(await self._send(_GENERATE_PATH, body), _ndjson_text)
        return _whole_generate(await self._post(_GENERATE_PATH, body))

    async def _send(self, path: str, body: dict[str, Any]) -> httpx.Response:
        for attempt in range(self._retries + 1):
            response = await self._http.send(self._http.build_request("POST", path, json=body), stream=True)
            if response.status_code != 503 or attempt == self._retries:
                break
            await response.aclose()
            await asyncio.sleep(_retry_delay(response, self._max_retry_wait))
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            _raise_for(response)
        return response

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send(path, body)
        try:
            payload: dict[str, Any] = json.loads(await response.aread())
        finally:
            await response.aclose()
        return payload
