"""OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions.

Sampling (temperature, top_p, top_k, seed, penalties) is fixed when RKLLM loads a model: any valid
value is accepted and the model generates with its configured sampling; the values not applied are
named in the X-Rkllm-Sampling-Ignored header (see apply_sampling_policy). Invalid values are a 400.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import bad_request, sse_error_event
from rkllm_runtime.api.generation import (
    Generation,
    collect_whole,
    render_prompt,
    run_error,
    run_generation,
    start_generation,
)
from rkllm_runtime.api.openai_answer import Answer, ChatAnswer, TextAnswer
from rkllm_runtime.api.openai_shapes import (
    ChatCompletion,
    ChatCompletionChunk,
    OpenAIModel,
    OpenAIModelList,
    TextCompletion,
)
from rkllm_runtime.api.output import Outcome, OutputAssembler
from rkllm_runtime.api.plumbing import GuardedStream, dumps, scheduler_of
from rkllm_runtime.api.request_fields import (
    MAX_MESSAGES,
    MAX_TOOLS,
    ToolSpec,
    refuse_forced_tool_choice,
    refuse_structured_output,
    reject_unsupported,
    tools_text,
)
from rkllm_runtime.api.sampling import apply_sampling_policy
from rkllm_runtime.chat import Message, ToolCall
from rkllm_runtime.config import ModelConfig
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.routing import AUTO_MODEL, LATEST_TAG, UnknownModelError, resolve_model
from rkllm_runtime.scheduler import Job

router = APIRouter(prefix="/v1")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: str
    text: str | None = None


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str = "{}"


class ToolCallIn(_Request):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class _Generation(_Request):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    n: int | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise bad_request("stop: at most 4 sequences", param="stop")
        return [s for s in stops if s]

    def check(self, request: Request, model: ModelConfig) -> dict[str, str]:
        """Refuse what cannot be served; returns the headers naming sampling values not applied."""
        self.reject_unsupported()
        return apply_sampling_policy(request, model, self.sampling())

    def reject_unsupported(self) -> None:
        reject_unsupported(
            {"n": (self.n, 1), "logprobs": (self.logprobs, False), "logit_bias": (self.logit_bias, {})}
        )

    def sampling(self) -> dict[str, float | int | None]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    reasoning_effort: str | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for legacy completions
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def _text(content: str | list[TextPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"{where}: content parts of type {part.type!r} are not supported (text only)",
                param="messages",
            )
        parts.append(part.text)
    return "".join(parts)


def to_messages(messages: list[ChatMessageIn]) -> list[Message]:
    converted = []
    for index, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or [])
        converted.append(Message(role, _text(message.content, f"messages.{index}"), calls))
    return converted


def _model_object(name: str, created: int) -> OpenAIModel:
    return {"id": name, "object": "model", "created": created, "owned_by": "rkllm"}


@router.get("/models", response_model=None, responses=RESPONSE_SHAPES.answer(OpenAIModelList))
async def list_models(request: Request) -> OpenAIModelList:
    config = scheduler_of(request).config
    created = int(time.time())
    names = ["auto", *(m.name for m in config.models)]
    return {"object": "list", "data": [_model_object(n, created) for n in names]}


@router.get("/models/{name}", response_model=None, responses=RESPONSE_SHAPES.answer(OpenAIModel))
async def get_model(request: Request, name: str) -> OpenAIModel:
    config = scheduler_of(request).config
    bare = name.removesuffix(LATEST_TAG)
    if bare != AUTO_MODEL and config.model(bare) is None:
        raise UnknownModelError(name, [AUTO_MODEL, *(m.name for m in config.models)])
    return _model_object(bare, int(time.time()))


@dataclass
class ChatTurn:
    """A conversation to continue, as chat completions and responses both ask for one."""

    model: str
    messages: list[Message]
    reasoning_effort: str | None
    tools: Sequence[ToolSpec] | None
    tool_choice: object
    max_tokens: int | None
    stops: list[str]
    sampling: Mapping[str, float | int | None]


@dataclass
class StartedTurn:
    generation: Generation
    output: OutputAssembler
    headers: dict[str, str]  # the sampling values not applied


async def start_turn(request: Request, turn: ChatTurn) -> StartedTurn:
    """Route, refuse what cannot be served, render, then wait for the turn and the handle."""
    config = scheduler_of(request).config
    messages = turn.messages
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    effort = turn.reasoning_effort
    wants_reasoning = None if effort is None else effort not in ("none", "minimal")
    model = resolve_model(config, turn.model, wants_reasoning, last_user)
    headers = apply_sampling_policy(request, model, turn.sampling)
    if turn.tool_choice not in (None, "auto", "none"):
        choice = turn.tool_choice
        raise refuse_forced_tool_choice(
            "tool_choice", choice.model_dump() if isinstance(choice, BaseModel) else choice
        )
    tools = tools_text(turn.tools) if turn.tool_choice != "none" else ""
    job = Job(
        prompt=await render_prompt(config, model, messages),
        max_tokens=turn.max_tokens,
        tools_json=tools,
        role="tool" if messages[-1].role == "tool" else "user",
        arrived=time.monotonic(),
        later_turn=any(m.role == "assistant" for m in messages),
    )
    output = OutputAssembler(config.think == "separate", bool(tools), turn.stops)
    return StartedTurn(await start_generation(request, model, job), output, headers)


@router.post(
    "/chat/completions",
    response_model=None,
    openapi_extra=json_body(ChatCompletionRequest),
    responses=RESPONSE_SHAPES.answer(ChatCompletion, ChatCompletionChunk, "text/event-stream"),
)
async def chat_completions(request: Request) -> Response:
    body = await read_json(request, ChatCompletionRequest)
    body.reject_unsupported()
    reject_unsupported({"top_logprobs": (body.top_logprobs, 0), "audio": (body.audio, None)})
    if body.response_format not in (None, {"type": "text"}):
        raise refuse_structured_output(
            "response_format", body.response_format, "Send response_format {'type': 'text'} or omit it"
        )
    turn = ChatTurn(
        model=body.model,
        messages=to_messages(body.messages),
        reasoning_effort=body.reasoning_effort,
        tools=body.tools,
        tool_choice=body.tool_choice,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stops=body.stops(),
        sampling=body.sampling(),
    )
    started = await start_turn(request, turn)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(
        request,
        started.generation,
        started.output,
        body.stream,
        include_usage,
        ChatAnswer(started.generation.model),
        started.headers,
    )


@router.post(
    "/completions",
    response_model=None,
    openapi_extra=json_body(CompletionRequest),
    responses=RESPONSE_SHAPES.answer(TextCompletion, TextCompletion, "text/event-stream"),
)
async def completions(request: Request) -> Response:
    body = await read_json(request, CompletionRequest)
    config = scheduler_of(request).config
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise bad_request("prompt: exactly one prompt per request is supported", param="prompt")
    model = resolve_model(config, body.model, None, prompts[0])
    headers = body.check(request, model)
    reject_unsupported(
        {"echo": (body.echo, False), "suffix": (body.suffix, None), "best_of": (body.best_of, 1)}
    )
    if not prompts[0]:
        raise bad_request("prompt: must not be empty", param="prompt")
    job = Job(prompt=prompts[0], max_tokens=body.max_tokens, arrived=time.monotonic())
    output = OutputAssembler(False, False, body.stops())
    generation = await start_generation(request, model, job)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _respond(
        request, generation, output, body.stream, include_usage, TextAnswer(generation.model), headers
    )


async def _respond(
    request: Request,
    generation: Generation,
    output: OutputAssembler,
    stream: bool,
    include_usage: bool,
    answer: Answer,
    headers: dict[str, str],
) -> Response:
    if stream:
        events = _sse(generation, output, answer, include_usage)
        return GuardedStream(
            events,
            generation,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
    total, outcome = await collect_whole(request, generation, output)
    return JSONResponse(answer.whole(total, outcome), headers=headers)


def _event(chunk: ChatCompletionChunk | TextCompletion) -> bytes:
    return f"data: {dumps(chunk)}\n\n".encode()


async def _sse(
    generation: Generation, output: OutputAssembler, answer: Answer, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    first = answer.first_chunk()
    if first is not None:
        yield _event(first)
    tool_index = 0
    try:
        async with aclosing(run_generation(generation, output)) as items:
            async for item in items:
                if isinstance(item, Outcome):
                    yield _event(answer.final_chunk(item))
                    if include_usage:
                        yield _event(answer.usage_chunk(item))
                else:
                    yield _event(answer.delta_chunk(item, tool_index))
                    tool_index += len(item.tool_calls)
    except RkllmError as exc:
        yield sse_error_event(run_error(exc))
        return
    yield b"data: [DONE]\n\n"
