"""A Response object and its stream events, built from a generation's deltas and outcome (the shapes
are declared in responses_shapes)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from rkllm_runtime.api.generation import Generation, run_error, run_generation
from rkllm_runtime.api.output import Delta, Outcome, OutputAssembler
from rkllm_runtime.api.plumbing import dumps
from rkllm_runtime.api.responses_shapes import (
    ContentPartEvent,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    IncompleteDetails,
    ItemStatus,
    LifecycleKind,
    MessageItem,
    OutputItem,
    OutputItemEvent,
    OutputText,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ReasoningItem,
    ReasoningText,
    ReasoningTextDeltaEvent,
    ReasoningTextDoneEvent,
    ResponseError,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseStatus,
    ResponseStreamEvent,
    ResponseUsage,
)
from rkllm_runtime.chat import ToolCall
from rkllm_runtime.errors import RkllmError


@dataclass
class ResponseEcho:
    """The request fields every Response object repeats, and the sampling the model really ran with."""

    model: str
    instructions: str | None
    max_output_tokens: int | None
    parallel_tool_calls: bool
    effort: str | None
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    metadata: dict[str, Any]
    temperature: float
    top_p: float
    bytes_per_token: float
    response_id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        incomplete_details: IncompleteDetails | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": {"effort": self.effort, "summary": None},
            "store": False,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": self.metadata,
        }

    def finished(self, items: OutputItems, outcome: Outcome) -> ResponseObject:
        reasoning = min(outcome.completion_tokens, math.ceil(items.reasoning_bytes / self.bytes_per_token))
        usage: ResponseUsage = {
            "input_tokens": outcome.prompt_tokens,
            "input_tokens_details": {"cached_tokens": outcome.cached_tokens},
            "output_tokens": outcome.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        }
        if outcome.finish_reason == "length":
            cut: IncompleteDetails = {"reason": "max_output_tokens"}
            return self.response("incomplete", items.items, usage=usage, incomplete_details=cut)
        return self.response("completed", items.items, usage=usage)


class OutputItems:
    """Output items built from the deltas as they arrive, and the stream events announcing each step.

    One item is open at a time: reasoning, then a message, then one item per function call, in the
    order the model produced them.
    """

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self.reasoning_bytes = 0
        self._open: MessageItem | ReasoningItem | None = None
        self._text = ""
        self._sequence = 0

    def _next(self) -> int:
        """The next event's sequence_number: every event of a stream is numbered in order from 0."""
        number = self._sequence
        self._sequence += 1
        return number

    def lifecycle(self, kind: LifecycleKind, response: ResponseObject) -> ResponseLifecycleEvent:
        return {"type": kind, "sequence_number": self._next(), "response": response}

    def feed(self, delta: Delta) -> list[ResponseStreamEvent]:
        events = []
        if delta.reasoning:
            self.reasoning_bytes += len(delta.reasoning.encode())
            events += self._append("reasoning", delta.reasoning)
        if delta.content:
            events += self._append("message", delta.content)
        for call in delta.tool_calls:
            events += self._close("completed")
            events += self._function_call(call)
        return events

    def finish(self, outcome: Outcome) -> list[ResponseStreamEvent]:
        events = [] if self.items else self._open_item("message")
        return events + self._close("incomplete" if outcome.finish_reason == "length" else "completed")

    def _append(self, kind: Literal["message", "reasoning"], text: str) -> list[ResponseStreamEvent]:
        events = []
        if self._open is None or self._open["type"] != kind:
            events = self._close("completed") + self._open_item(kind)
        item = self._open
        assert item is not None
        self._text += text
        index = len(self.items) - 1
        delta: OutputTextDeltaEvent | ReasoningTextDeltaEvent
        if item["type"] == "message":
            delta = {
                "type": "response.output_text.delta",
                "sequence_number": self._next(),
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "delta": text,
                "logprobs": [],
            }
        else:
            delta = {
                "type": "response.reasoning_text.delta",
                "sequence_number": self._next(),
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "delta": text,
            }
        return [*events, delta]

    def _open_item(self, kind: Literal["message", "reasoning"]) -> list[ResponseStreamEvent]:
        item: MessageItem | ReasoningItem
        if kind == "message":
            item = {
                "id": f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": "assistant",
                "content": [],
                "status": "in_progress",
            }
        else:
            item = {
                "id": f"rs_{uuid.uuid4().hex}",
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
        self._open, self._text = item, ""
        self.items.append(item)
        index = len(self.items) - 1
        added: OutputItemEvent = {
            "type": "response.output_item.added",
            "sequence_number": self._next(),
            "output_index": index,
            "item": item.copy(),
        }
        part: ContentPartEvent = {
            "type": "response.content_part.added",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "content_index": 0,
            "part": _output_text("") if kind == "message" else _reasoning_text(""),
        }
        return [added, part]

    def _close(self, status: ItemStatus) -> list[ResponseStreamEvent]:
        item = self._open
        if item is None:
            return []
        self._open = None
        index, text = len(self.items) - 1, self._text
        done: OutputTextDoneEvent | ReasoningTextDoneEvent
        part: OutputText | ReasoningText
        if item["type"] == "message":
            part = _output_text(text)
            done = {
                "type": "response.output_text.done",
                "sequence_number": self._next(),
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }
            item["content"] = [part]
        else:
            part = _reasoning_text(text)
            done = {
                "type": "response.reasoning_text.done",
                "sequence_number": self._next(),
                "item_id": item["id"],
                "output_index": index,
                "content_index": 0,
                "text": text,
            }
            item["content"] = [part]
        item["status"] = status
        part_done: ContentPartEvent = {
            "type": "response.content_part.done",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "content_index": 0,
            "part": part,
        }
        item_done: OutputItemEvent = {
            "type": "response.output_item.done",
            "sequence_number": self._next(),
            "output_index": index,
            "item": item,
        }
        return [done, part_done, item_done]

    def _function_call(self, call: ToolCall) -> list[ResponseStreamEvent]:
        item: FunctionCallItem = {
            "id": f"fc_{uuid.uuid4().hex}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
        }
        self.items.append(item)
        index = len(self.items) - 1
        added: OutputItemEvent = {
            "type": "response.output_item.added",
            "sequence_number": self._next(),
            "output_index": index,
            "item": item.copy(),
        }
        item["arguments"], item["status"] = call.arguments, "completed"
        arguments: FunctionCallArgumentsDeltaEvent = {
            "type": "response.function_call_arguments.delta",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "delta": call.arguments,
        }
        arguments_done: FunctionCallArgumentsDoneEvent = {
            "type": "response.function_call_arguments.done",
            "sequence_number": self._next(),
            "item_id": item["id"],
            "output_index": index,
            "arguments": call.arguments,
        }
        item_done: OutputItemEvent = {
            "type": "response.output_item.done",
            "sequence_number": self._next(),
            "output_index": index,
            "item": item,
        }
        return [added, arguments, arguments_done, item_done]


def _output_text(text: str) -> OutputText:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_text(text: str) -> ReasoningText:
    return {"type": "reasoning_text", "text": text}


def _sse(event: ResponseStreamEvent) -> bytes:
    return f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()


async def stream_response(
    generation: Generation, output: OutputAssembler, items: OutputItems, echo: ResponseEcho
) -> AsyncGenerator[bytes, None]:
    """The stream's events: the response created, each output step, then completed, incomplete or failed."""
    yield _sse(items.lifecycle("response.created", echo.response("in_progress", [])))
    yield _sse(items.lifecycle("response.in_progress", echo.response("in_progress", [])))
    try:
        async with aclosing(run_generation(generation, output)) as produced:
            async for piece in produced:
                if isinstance(piece, Outcome):
                    for event in items.finish(piece):
                        yield _sse(event)
                    final = echo.finished(items, piece)
                    kind: LifecycleKind = (
                        "response.completed" if final["status"] == "completed" else "response.incomplete"
                    )
                    yield _sse(items.lifecycle(kind, final))
                else:
                    for event in items.feed(piece):
                        yield _sse(event)
    except RkllmError as exc:
        error: ResponseError = {"code": "server_error", "message": run_error(exc).message}
        failed = echo.response("failed", items.items, error=error)
        yield _sse(items.lifecycle("response.failed", failed))
