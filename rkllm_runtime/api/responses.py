"""OpenAI's Responses API (POST /v1/responses) on the chat path: the same routing, sampling policy,
template, tools, <think> split and output assembly as /v1/chat/completions; only the shapes differ.

No response is stored: any board behind the balancer may answer the next request, so
previous_response_id, conversation and the stored-response endpoints are refused with what to send
instead (the whole conversation as input).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import ApiError, bad_request
from rkllm_runtime.api.generation import Generation, collect_whole, run_error, run_generation
from rkllm_runtime.api.openai import ChatTurn, start_turn
from rkllm_runtime.api.output import Delta, Outcome, OutputAssembler
from rkllm_runtime.api.plumbing import GuardedStream, dumps, scheduler_of
from rkllm_runtime.api.request_fields import (
    MAX_MESSAGES,
    MAX_TOOLS,
    FunctionSpec,
    ToolSpec,
    refuse_structured_output,
    reject_unsupported,
)
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
from rkllm_runtime.chat import Message, ToolCall
from rkllm_runtime.errors import RkllmError

router = APIRouter(prefix="/v1")

SEND_THE_CONVERSATION = (
    "this server keeps no state between requests (any board behind the balancer may answer the "
    "next one): send the whole conversation as input, i.e. the earlier input items followed by "
    "each response's output items"
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputPart(_Request):
    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(_Request):
    """A message (type omitted or "message"), or an earlier turn's function call, its output or
    reasoning, as the client sends them back."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


class FunctionTool(FunctionSpec):
    """The Responses API's flat function tool: {"type": "function", "name": ..., "parameters": ...}."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(
                f"tools of type {data.get('type')!r} are not supported; only 'function' tools are "
                "(built-in tools such as web search or file search run on OpenAI's platform)"
            )
        return data


class TextFormat(_Request):
    type: str = "text"


class TextConfig(_Request):
    format: TextFormat | None = None


class ReasoningConfig(_Request):
    effort: str | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Request):
    model: str
    input: str | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        if self.previous_response_id is not None:
            raise bad_request(
                f"previous_response_id is not supported: {SEND_THE_CONVERSATION}",
                param="previous_response_id",
                code="unsupported_parameter",
            )
        if self.conversation is not None:
            raise bad_request(
                f"conversation is not supported: {SEND_THE_CONVERSATION}",
                param="conversation",
                code="unsupported_parameter",
            )
        if self.prompt is not None:
            raise bad_request(
                "prompt (a stored prompt template) is not supported: send instructions and input",
                param="prompt",
                code="unsupported_parameter",
            )
        if self.truncation == "auto":
            raise bad_request(
                "truncation='auto' is not supported: a conversation longer than the context is refused "
                "(context_length_exceeded); drop the oldest items client-side and send 'disabled' or omit it",
                param="truncation",
                code="unsupported_value",
            )
        text_format = self.text.format if self.text and self.text.format else None
        if text_format is not None and text_format.type != "text":
            raise refuse_structured_output(
                "text.format", text_format.model_dump(), "Send text.format {'type': 'text'} or omit it"
            )
        reject_unsupported({"top_logprobs": (self.top_logprobs, 0), "background": (self.background, False)})

    def messages(self) -> list[Message]:
        messages = [Message("system", self.instructions)] if self.instructions else []
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for index, item in enumerate(items):
            _append_item(messages, item, f"input.{index}")
        if not messages:
            raise bad_request("input: at least one message is needed", param="input")
        return messages

    def function_tools(self) -> list[ToolSpec] | None:
        if not self.tools:
            return None
        return [
            ToolSpec(type="function", function=FunctionSpec.model_validate(t.model_dump(exclude={"type"})))
            for t in self.tools
        ]


def _append_item(messages: list[Message], item: InputItem, where: str) -> None:
    if item.type == "reasoning":
        return  # earlier reasoning is not rendered back into the conversation
    if item.type == "function_call":
        if not item.name or item.call_id is None:
            raise bad_request(f"{where}: a function_call item needs name and call_id", param="input")
        call = ToolCall(item.call_id, item.name, item.arguments or "{}")
        if messages and messages[-1].role == "assistant":
            last = messages.pop()
            messages.append(Message("assistant", last.content, (*last.tool_calls, call)))
        else:
            messages.append(Message("assistant", "", (call,)))
    elif item.type == "function_call_output":
        if item.output is None:
            raise bad_request(f"{where}.output: a function_call_output item needs output", param="input")
        messages.append(Message("tool", _text(item.output, f"{where}.output")))
    else:
        if item.role is None:
            raise bad_request(
                f"{where}.role: a message needs a role (system, developer, user or assistant)", param="input"
            )
        role = "system" if item.role == "developer" else item.role
        messages.append(Message(role, _text(item.content, f"{where}.content")))


def _text(content: str | list[InputPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.type in ("input_text", "output_text", "text") and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        else:
            raise bad_request(
                f"{where}.{index}: content parts of type {part.type!r} are not supported "
                "(text only: input_text, output_text)",
                param="input",
            )
    return "".join(texts)


@router.post(
    "/responses",
    response_model=None,
    openapi_extra=json_body(ResponsesRequest),
    responses=RESPONSE_SHAPES.answer(ResponseObject, get_args(ResponseStreamEvent), "text/event-stream"),
)
async def create_response(request: Request) -> Response:
    body = await read_json(request, ResponsesRequest)
    body.refuse_unsupported()
    tools = body.function_tools()
    turn = ChatTurn(
        model=body.model,
        messages=body.messages(),
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        tools=tools,
        tool_choice=body.tool_choice,
        max_tokens=body.max_output_tokens,
        stops=[],
        sampling={"temperature": body.temperature, "top_p": body.top_p},
    )
    started = await start_turn(request, turn)
    echo = _Echo.of(request, body, started.generation)
    items = OutputItems()
    if body.stream:
        events = _stream(started.generation, started.output, items, echo)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **started.headers}
        return GuardedStream(events, started.generation, media_type="text/event-stream", headers=headers)
    total, outcome = await collect_whole(request, started.generation, started.output)
    items.feed(total)
    items.finish(outcome)
    return JSONResponse(echo.finished(items, outcome), headers=started.headers)


@router.api_route("/responses/{response_id}", methods=["GET", "DELETE"], include_in_schema=False)
@router.api_route("/responses/{response_id}/{action}", methods=["GET", "POST"], include_in_schema=False)
async def stored_response(response_id: str) -> Response:
    raise ApiError(
        404,
        f"response {response_id!r} not found: responses are not stored on this server; "
        + SEND_THE_CONVERSATION,
        param="response_id",
        code="response_not_found",
    )


@dataclass
class _Echo:
    """The request fields every Response object repeats, and the sampling the model really ran with."""

    response_id: str
    created_at: int
    model: str
    body: ResponsesRequest
    temperature: float
    top_p: float
    bytes_per_token: float

    @classmethod
    def of(cls, request: Request, body: ResponsesRequest, generation: Generation) -> _Echo:
        model = scheduler_of(request).config.model(generation.model)
        assert model is not None  # the generation runs on a configured model
        return cls(
            f"resp_{uuid.uuid4().hex}",
            int(time.time()),
            generation.model,
            body,
            model.temperature,
            model.top_p,
            model.bytes_per_token,
        )

    def response(
        self,
        status: ResponseStatus,
        output: list[OutputItem],
        usage: ResponseUsage | None = None,
        incomplete_details: IncompleteDetails | None = None,
        error: ResponseError | None = None,
    ) -> ResponseObject:
        body = self.body
        effort = body.reasoning.effort if body.reasoning else None
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete_details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": {"effort": effort, "summary": None},
            "store": False,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": body.tool_choice.model_dump()
            if isinstance(body.tool_choice, BaseModel)
            else body.tool_choice or "auto",
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.metadata or {},
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


async def _stream(
    generation: Generation, output: OutputAssembler, items: OutputItems, echo: _Echo
) -> AsyncGenerator[bytes, None]:
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
