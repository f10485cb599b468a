"""HTTP plumbing every route uses: the scheduler, client disconnects, batched streams, JSON text."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import suppress
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rkllm_runtime.api.errors import ApiError
from rkllm_runtime.scheduler import Scheduler

log = logging.getLogger(__name__)

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's code for a request the client abandoned


class Closable(Protocol):
    async def aclose(self) -> None: ...


def scheduler_of(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it if the client goes away first (non-streaming requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise ApiError(CLIENT_CLOSED, "client closed the request")
    return task.result()


class GuardedStream(StreamingResponse):
    """A stream that always closes its generation (even if it never started) and writes per batch.

    The source runs as its own task; whatever it produced while the previous write was in flight
    goes out as one write, so a fast runtime costs one send per batch of tokens, not per token.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        generation: Closable,
        media_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(self._drain(), media_type=media_type, headers=headers)
        self._source = content
        self._generation = generation
        self._pending: list[bytes] = []
        self._produced = asyncio.Event()
        self._producer: asyncio.Task[None] | None = None

    async def _produce(self) -> None:
        try:
            async for chunk in self._source:
                self._pending.append(chunk)
                self._produced.set()
        finally:
            self._produced.set()

    async def _drain(self) -> AsyncIterator[bytes]:
        producer = self._producer = asyncio.ensure_future(self._produce())
        while True:
            if not self._pending and not producer.done():
                await self._produced.wait()
            self._produced.clear()
            if self._pending:
                batch = b"".join(self._pending)
                self._pending.clear()
                yield batch
            elif producer.done():
                producer.result()  # an unexpected failure ends the response loudly
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._producer is not None:
                await _cancel_and_wait(self._producer)
            await self._source.aclose()
            await self._generation.aclose()


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel task and wait until it has really finished (its cleanup aborts the run)."""
    task.cancel()
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if not task.cancelled() and task.exception() is not None:
        log.error("stream failed after the response started", exc_info=task.exception())
    if interrupted:
        raise asyncio.CancelledError


def dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
