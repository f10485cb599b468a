"""Ollama-compatible routes: version, tags, ps, show, generate, chat (NDJSON streams, durations in ns)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from importlib import metadata
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import bad_request, ollama_error
from rkllm_runtime.api.generation import (
    Generation,
    collect_whole,
    render_prompt,
    run_error,
    run_generation,
    start_generation,
)
from rkllm_runtime.api.ollama_answer import (
    auto_entry,
    final_line,
    loaded_reply,
    model_details,
    model_entry,
    progress_line,
)
from rkllm_runtime.api.ollama_shapes import (
    OllamaChatDone,
    OllamaChatLine,
    OllamaChatLoaded,
    OllamaGenerateDone,
    OllamaGenerateLine,
    OllamaGenerateLoaded,
    OllamaLoadedModel,
    OllamaRunning,
    OllamaShow,
    OllamaTags,
    OllamaVersion,
)
from rkllm_runtime.api.output import Outcome, OutputAssembler
from rkllm_runtime.api.plumbing import GuardedStream, dumps, scheduler_of, until_disconnect
from rkllm_runtime.api.request_fields import (
    MAX_MESSAGES,
    MAX_TOOLS,
    ToolSpec,
    refuse_structured_output,
    reject_unsupported,
    tools_text,
)
from rkllm_runtime.api.sampling import apply_sampling_policy
from rkllm_runtime.chat import Message, ToolCall
from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.registry import footprint_mb
from rkllm_runtime.routing import resolve_model
from rkllm_runtime.scheduler import Job

router = APIRouter(prefix="/api")

# What /api/version reports: clients gate features on Ollama's version, and 0.9.0 is the first with
# the `think` field (tools in streams came in 0.8), both of which this server implements.
OLLAMA_VERSION = "0.9.0"


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Request):
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repeat_penalty: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    num_predict: int | None = None
    num_ctx: int | None = None
    # Every token is matched against every stop sequence on the event loop: keep the list short.
    stop: list[str] | None = Field(default=None, max_length=16)

    def sampling(self) -> dict[str, float | int | None]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repeat_penalty": self.repeat_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
        }


class FunctionCallIn(_Request):
    name: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCallIn(_Request):
    function: FunctionCallIn


class ChatMessageIn(_Request):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # null in an assistant turn that only calls tools
    images: list[str] | None = None
    tool_calls: list[ToolCallIn] | None = None


class _Generation(_Request):
    model: str = Field(min_length=1)
    stream: bool = True
    options: Options = Field(default_factory=Options)
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None

    def wants_reasoning(self) -> bool | None:
        if self.think is None:
            return None
        return self.think not in (False, "false", "low")

    def check(self, request: Request, model: ModelConfig) -> dict[str, str]:
        """Refuse what cannot be served; returns the headers naming sampling values not applied."""
        options = self.options
        if self.format not in (None, ""):
            raise refuse_structured_output("format", self.format, "Omit format")
        if options.num_ctx is not None and options.num_ctx > model.context_length:
            raise bad_request(
                f"options.num_ctx={options.num_ctx} exceeds model {model.name}'s context of "
                f"{model.context_length} tokens (fixed when the model was converted and loaded)"
            )
        return apply_sampling_policy(request, model, options.sampling())

    def max_tokens(self) -> int | None:
        predict = self.options.num_predict
        return predict if predict is not None and predict > 0 else None


class GenerateRequest(_Generation):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None


class ChatRequest(_Generation):
    messages: list[ChatMessageIn] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[ToolSpec] | None = Field(default=None, max_length=MAX_TOOLS)


class ShowRequest(_Request):
    model: str | None = None
    name: str | None = None


@router.get("/version", response_model=None, responses=RESPONSE_SHAPES.answer(OllamaVersion))
async def version() -> OllamaVersion:
    return {"version": OLLAMA_VERSION, "rkllm_runtime": metadata.version("rkllm-runtime")}


@router.get("/tags", response_model=None, responses=RESPONSE_SHAPES.answer(OllamaTags))
async def tags(request: Request) -> OllamaTags:
    models = scheduler_of(request).config.models
    return {"models": [auto_entry(), *(model_entry(m) for m in models)]}


@router.get("/ps", response_model=None, responses=RESPONSE_SHAPES.answer(OllamaRunning))
async def ps(request: Request) -> OllamaRunning:
    scheduler = scheduler_of(request)
    entries: list[OllamaLoadedModel] = []
    for loaded in scheduler.loaded_models():
        # Each KV slot is a handle holding its own copy of the weights in NPU memory.
        memory = footprint_mb(loaded) << 20
        entry: OllamaLoadedModel = {
            **model_entry(loaded),
            "size": memory,
            "expires_at": "9999-12-31T23:59:59Z",
            "size_vram": memory,
            "context_length": loaded.context_length,
        }
        entries.append(entry)
    return {"models": entries}


@router.post(
    "/show",
    response_model=None,
    openapi_extra=json_body(ShowRequest),
    responses=RESPONSE_SHAPES.answer(OllamaShow),
)
async def show(request: Request) -> OllamaShow:
    body = await read_json(request, ShowRequest)
    config = scheduler_of(request).config
    model = resolve_model(config, body.model or body.name or "", None, "")
    capabilities = (
        ["embedding"]
        if model.kind == "embedding"
        else ["completion", "tools"] + (["thinking"] if model.kind == "reasoning" else [])
    )
    parameters = "\n".join(
        f"{k} {getattr(model, k)}" for k in ("temperature", "top_p", "top_k", "repeat_penalty")
    )
    return {
        # The model's name, not its path: the board's file layout is not the client's business.
        "modelfile": f"FROM {model.name}\n",
        "parameters": parameters,
        "template": model.template,
        "details": model_details(model),
        "capabilities": capabilities,
        "model_info": {"general.architecture": "rkllm", "rkllm.context_length": model.context_length},
    }


@router.post(
    "/generate",
    response_model=None,
    openapi_extra=json_body(GenerateRequest),
    responses=RESPONSE_SHAPES.answer(
        (OllamaGenerateDone, OllamaGenerateLoaded),
        (OllamaGenerateLine, OllamaGenerateDone),
        "application/x-ndjson",
    ),
)
async def generate(request: Request) -> Response:
    body = await read_json(request, GenerateRequest)
    scheduler = scheduler_of(request)
    config = scheduler.config
    model = resolve_model(config, body.model, body.wants_reasoning(), body.prompt)
    headers = body.check(request, model)
    reject_unsupported(
        {
            "images": (body.images, []),
            "suffix": (body.suffix, ""),
            "template": (body.template, ""),
            "context": (body.context, []),
        }
    )
    if not body.prompt:
        return JSONResponse(await _load_or_unload(request, model, body.keep_alive))
    messages = [Message("system", body.system)] if body.system else []
    messages.append(Message("user", body.prompt))
    prompt = body.prompt if body.raw else await render_prompt(config, model, messages)
    job = Job(prompt=prompt, max_tokens=body.max_tokens(), arrived=time.monotonic())
    return await _respond(request, config, job, model, body, headers, tools=False, chat=False)


@router.post(
    "/chat",
    response_model=None,
    openapi_extra=json_body(ChatRequest),
    responses=RESPONSE_SHAPES.answer(
        (OllamaChatDone, OllamaChatLoaded), (OllamaChatLine, OllamaChatDone), "application/x-ndjson"
    ),
)
async def chat(request: Request) -> Response:
    body = await read_json(request, ChatRequest)
    scheduler = scheduler_of(request)
    config = scheduler.config
    messages = [_message(m, i) for i, m in enumerate(body.messages)]
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
    model = resolve_model(config, body.model, body.wants_reasoning(), last_user)
    headers = body.check(request, model)
    if not messages:
        return JSONResponse(await _load_or_unload(request, model, body.keep_alive, chat=True))
    tools = tools_text(body.tools)
    job = Job(
        prompt=await render_prompt(config, model, messages),
        max_tokens=body.max_tokens(),
        tools_json=tools,
        role="tool" if messages[-1].role == "tool" else "user",
        arrived=time.monotonic(),
        later_turn=any(m.role == "assistant" for m in messages),
    )
    return await _respond(request, config, job, model, body, headers, tools=bool(tools), chat=True)


def _message(message: ChatMessageIn, index: int) -> Message:
    if message.images:
        raise bad_request(
            f"messages.{index}.images: images are not supported by this server (its models read text "
            "only): send the message without images",
            param="messages",
        )
    calls = tuple(
        ToolCall(f"call_{index}_{i}", c.function.name, json.dumps(c.function.arguments, ensure_ascii=False))
        for i, c in enumerate(message.tool_calls or [])
    )
    return Message(message.role, message.content or "", calls)


async def _load_or_unload(
    request: Request, model: ModelConfig, keep_alive: float | str | None, chat: bool = False
) -> OllamaChatLoaded | OllamaGenerateLoaded:
    """Ollama's convention: an empty prompt loads the model, with keep_alive 0 it unloads it.

    Both wait for the model's turn, so a running generation is never cut off.
    """
    scheduler = scheduler_of(request)
    unload = keep_alive in (0, "0", "0s", "0m")
    if unload and model.pinned:
        raise bad_request(f"model {model.name} is pinned and stays loaded")
    ticket = scheduler.admit(model.name)
    try:
        await until_disconnect(request, ticket.wait())
        if unload:
            await scheduler.unload(ticket, model.name)
        else:
            await scheduler.load(ticket, model.name)
    finally:
        ticket.release()
    return loaded_reply(model.name, "unload" if unload else "load", chat)


async def _respond(
    request: Request,
    config: ServerConfig,
    job: Job,
    model: ModelConfig,
    body: _Generation,
    headers: dict[str, str],
    tools: bool,
    chat: bool,
) -> Response:
    separate = config.think == "separate" and not (body.think is False and model.kind != "reasoning")
    output = OutputAssembler(separate, tools, body.options.stop or [])
    generation = await start_generation(request, model, job)
    if body.stream:
        lines = _ndjson(generation, output, job, chat)
        return GuardedStream(lines, generation, media_type="application/x-ndjson", headers=headers)
    total, outcome = await collect_whole(request, generation, output)
    return JSONResponse(final_line(generation, outcome, job, chat, total), headers=headers)


async def _ndjson(
    generation: Generation, output: OutputAssembler, job: Job, chat: bool
) -> AsyncGenerator[bytes, None]:
    try:
        async with aclosing(run_generation(generation, output)) as items:
            async for item in items:
                if isinstance(item, Outcome):
                    yield (dumps(final_line(generation, item, job, chat)) + "\n").encode()
                else:
                    yield (dumps(progress_line(generation.model, item, chat)) + "\n").encode()
    except RkllmError as exc:
        yield (dumps(ollama_error(run_error(exc))) + "\n").encode()
