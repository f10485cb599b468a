"""What the OpenAI and Ollama routes share: body parsing, model routing, admission, output assembly."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping, Sequence
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from rkllm_runtime.api.errors import ApiError, bad_request
from rkllm_runtime.chat import (
    Channel,
    Message,
    OutputParser,
    StopMatcher,
    ToolCall,
    parse_tool_call,
    tools_json,
)
from rkllm_runtime.chat_templates import ChatTemplateError
from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.embedding import embedding_only_message
from rkllm_runtime.engine import FinishEvent, TokenEvent
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.registry import ModelUnavailableError
from rkllm_runtime.scheduler import (
    AdmissionRefusedError,
    ContextOverflowError,
    Job,
    Scheduler,
    Started,
    ToolsRefusedError,
    check_context,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

AUTO_MODEL = "auto"
# Ollama's default tag: "qwen:latest" names the same model as "qwen" (nginx strips it too).
LATEST_TAG = ":latest"
CLIENT_CLOSED = 499  # nginx's code for a request the client abandoned
# Bounds on list lengths that cut a hostile body's validation short (pydantic stops at the first
# item over the limit). Every chat turn costs at least 4 tokens of template, so more messages
# than this can never fit the largest context (16384 tokens); 128 tools is OpenAI's own limit.
MAX_MESSAGES = 4096
MAX_TOOLS = 128
# A whole body (at most max_body_bytes) must arrive within this; nginx sends it buffered, at once.
BODY_TIMEOUT_SECONDS = 30
# Tool parameter schemas are the deepest legitimate bodies: a dozen nested objects stay far below.
MAX_JSON_DEPTH = 64
_UNACCEPTABLE_CHARACTER = re.compile("[\0\ud800-\udfff]")
# JSON text can only carry those as escapes (raw control characters and invalid UTF-8 fail parsing).
_SUSPICIOUS_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def scheduler_of(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's openapi_extra declaring model as its JSON body (the route parses it with read_json,
    which bounds size, time and depth before validating against the same model)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


async def read_json(request: Request, model: type[M]) -> M:
    """The body as a validated model; oversized, malformed or ill-typed bodies become 4xx ApiErrors.

    Parsing and validation run on a worker thread: the pure-Python parts of a large body (the
    string and depth walk) then share the CPU with the streams this event loop is serving.
    """
    limit = scheduler_of(request).config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(408, f"request body not received within {BODY_TIMEOUT_SECONDS} s") from exc
    return await asyncio.to_thread(parse_body, b"".join(chunks), model)


def parse_body(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw or b"null", parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise bad_request(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    # The precise walk (which names the offending field) costs ~100 ms on a 1 MB body of small
    # items, so it runs only when a cheap look says it will find something.
    if _SUSPICIOUS_ESCAPE.search(raw) or _nests_too_deep(data):
        check_json_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param or 'body'}: {first['msg']}", param=param) from exc


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _nests_too_deep(data: dict[str, Any]) -> bool:
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def check_json_values(data: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings the runtime cannot take as they are.

    The runtime receives C strings: a NUL would silently end the prompt there (and the KV-cache
    bookkeeping would record text the model never saw), and a lone surrogate has no UTF-8 form.
    Both are refused rather than rewritten, so the model always sees exactly what was sent.
    """
    pending: list[tuple[object, int, tuple[str | int, ...]]] = [(data, 1, ())]
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(
                    f"request body nests deeper than {MAX_JSON_DEPTH} levels", param=_param(path)
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key, path)
                pending.append((item, depth + 1, (*path, key)))


def _check_string(text: str, path: tuple[str | int, ...]) -> None:
    bad = _UNACCEPTABLE_CHARACTER.search(text)
    if bad is None:
        return
    if bad.group() == "\0":
        what = "a NUL character (U+0000): the runtime would cut the text there"
    else:
        what = f"a lone surrogate (U+{ord(bad.group()):04X}), which is not valid Unicode text"
    raise bad_request(
        f"{_param(path) or 'body'}: strings must not contain {what}",
        param=_param(path),
        code="invalid_string",
    )


def _param(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(p) for p in path) or None


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionSpec(_Lenient):
    """A function tool as both APIs declare it; checked here because the runtime refuses bad ones."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="1-64 letters, digits, '_', '.', ':' or '-'",
    )
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description='a JSON Schema of type "object" (omitted: no parameters)'
    )
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        if schema.get("type", "object") != "object":
            raise ValueError('parameters must be a JSON Schema of type "object"')
        properties = schema.get("properties", {})
        if not isinstance(properties, dict) or not all(
            isinstance(v, dict | bool) for v in properties.values()
        ):
            raise ValueError("parameters.properties must map each parameter name to a JSON Schema")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("parameters.required must be a list of parameter names")
        return schema


class ToolSpec(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


def tools_text(tools: Sequence[ToolSpec] | None) -> str:
    """The tools as the runtime's set_function_tools takes them ("" = none)."""
    return tools_json([t.model_dump(exclude_none=True) for t in tools]) if tools else ""


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


def resolve_model(
    config: ServerConfig, requested: str, wants_reasoning: bool | None, text: str
) -> ModelConfig:
    """The configured model a request names; "auto" picks the quick or the reasoning model."""
    name = requested
    if requested in (AUTO_MODEL, AUTO_MODEL + LATEST_TAG):
        rules = config.routing
        if wants_reasoning is None:
            lowered = text.lower()
            wants_reasoning = any(k.lower() in lowered for k in rules.reasoning_keywords) or (
                rules.reasoning_min_chars > 0 and len(text) >= rules.reasoning_min_chars
            )
        kind = "reasoning" if wants_reasoning else "quick"
        preferred = config.model(rules.reasoning if wants_reasoning else rules.quick)
        # A node without the preferred model serves with a model of the same kind, else any model.
        same_kind = next((m for m in config.models if m.kind == kind), None)
        fallback = preferred or same_kind or (config.models[0] if config.models else None)
        name = fallback.name if fallback else requested
    model = config.model(name) or config.model(name.removesuffix(LATEST_TAG))
    if model is None:
        known = ", ".join([AUTO_MODEL, *(m.name for m in config.models)])
        raise ApiError(
            404,
            f"model {requested!r} not found; this server has: {known}",
            param="model",
            code="model_not_found",
        )
    return model


async def render_prompt(config: ServerConfig, model: ModelConfig, messages: Sequence[Message]) -> str:
    """The conversation as the model's template renders it, on a worker thread (long ones take ms)."""
    try:
        return await asyncio.to_thread(config.template_for(model).render, messages, model.system_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages", code="unsupported_conversation") from exc


SAMPLING_IGNORED_HEADER = "X-Rkllm-Sampling-Ignored"


def configured_sampling(model: ModelConfig) -> dict[str, float | None]:
    """What the model's handle was initialised with; None: the runtime has no such setting."""
    return {
        "temperature": model.temperature,
        "top_p": model.top_p,
        "top_k": model.top_k,
        "repeat_penalty": model.repeat_penalty,
        "presence_penalty": 0.0,  # the server initialises every handle without these two penalties
        "frequency_penalty": 0.0,
        "min_p": 0.0,  # librkllmrt has no min-p sampling: 0 (off) is what it does
        "seed": None,
    }


def apply_sampling_policy(
    request: Request, model: ModelConfig, requested: Mapping[str, float | int | None]
) -> dict[str, str]:
    """Sampling values the model does not run with; the response headers that say so.

    RKLLM fixes sampling at rkllm_init, and re-initialising per request would cost seconds of NPU
    load, drop the KV cache and change sampling for every request queued behind. So by default a
    request is generated with the model's configured sampling and told which values were not
    applied; a model configured with sampling = "strict" refuses them instead.
    """
    configured = configured_sampling(model)
    ignored = []
    for name, value in requested.items():
        wanted = configured[name]
        if value is not None and (
            wanted is None or not math.isclose(float(value), wanted, rel_tol=1e-6, abs_tol=1e-6)
        ):
            ignored.append(name)
    if not ignored:
        return {}
    if model.sampling == "strict":
        name = ignored[0]
        value = configured[name]
        runs_with = f"runs with {name}={value}" if value is not None else f"has no {name}"
        raise bad_request(
            f"{name}={requested[name]} is not available: the NPU runtime fixes sampling when the model "
            f"is loaded, and model {model.name} {runs_with}. Omit {name} or change the model's "
            "configuration.",
            param=name,
            code="unsupported_value",
        )
    counter = scheduler_of(request).metrics.sampling_ignored
    for name in ignored:
        counter.labels(model.name, name).inc()
    return {SAMPLING_IGNORED_HEADER: ",".join(ignored)}


def reject_unsupported(fields: Mapping[str, tuple[object, object]]) -> None:
    """fields: name -> (value sent, the value meaning "not used"); anything else is a clear 400."""
    for name, (value, neutral) in fields.items():
        if value is not None and value != neutral:
            instead = f"omit {name}" + (
                f" or send {json.dumps(neutral)}" if neutral not in (None, "") else ""
            )
            raise bad_request(
                f"{name}={value!r} is not supported by this server: {instead}",
                param=name,
                code="unsupported_parameter",
            )


def refuse_structured_output(param: str, value: object, instead: str) -> ApiError:
    """Constrained decoding needs the sampler, which librkllmrt does not expose; say what works."""
    return bad_request(
        f"{param}={value!r} is not supported: the NPU runtime cannot constrain decoding to JSON or a "
        f"schema. {instead}, ask for JSON in the prompt (include the schema in the system message) "
        "and validate the reply client-side, retrying if it does not parse.",
        param=param,
        code="unsupported_value",
    )


def refuse_forced_tool_choice(param: str, value: object) -> ApiError:
    return bad_request(
        f"{param}={value!r} is not supported: the NPU runtime cannot force a tool call: send 'auto' "
        '(or omit it) and describe the required call in the system message (e.g. "always answer by '
        'calling get_weather"), then check the reply for a tool call client-side.',
        param=param,
        code="unsupported_value",
    )


@dataclass
class Generation:
    """An admitted request whose turn has come: Started was consumed, tokens follow."""

    model: str
    cached_tokens: int
    load_seconds: float
    prompt_estimate: int
    events: AsyncGenerator[Started | TokenEvent | FinishEvent, None]

    async def aclose(self) -> None:
        await self.events.aclose()


async def start_generation(request: Request, model: ModelConfig, job: Job) -> Generation:
    """Refuse (400/503) before any work, then wait for the turn and the handle."""
    scheduler = scheduler_of(request)
    if model.kind == "embedding":
        raise bad_request(embedding_only_message(model.name), param="model", code="model_not_supported")
    try:
        estimate = check_context(model, job.prompt + job.tools_json)
        ticket = scheduler.admit(model.name)
    except ContextOverflowError as exc:
        raise bad_request(str(exc), param="messages", code="context_length_exceeded") from exc
    except AdmissionRefusedError as exc:
        raise ApiError(503, str(exc), code=exc.code, retry_after=exc.retry_after) from exc
    events = scheduler.generate(ticket, model.name, job)
    try:
        started = await until_disconnect(request, anext(events))
    except (ModelUnavailableError, RkllmError) as exc:
        # Nothing was generated: 503 lets the balancer try another board.
        await events.aclose()
        scheduler.metrics.rejected.labels(model.name, "model_unavailable").inc()
        raise ApiError(503, str(exc), code="model_unavailable", retry_after=5) from exc
    except ToolsRefusedError as exc:
        await events.aclose()
        raise bad_request(str(exc), param="tools", code="invalid_tools") from exc
    except BaseException:
        await events.aclose()
        raise
    assert isinstance(started, Started)
    return Generation(model.name, started.cached_tokens, started.load_seconds, estimate, events)


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


@dataclass
class Outcome:
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float
    generate_seconds: float


class OutputAssembler:
    """Stop sequences, then <think> and <tool_call> splitting, over the raw token text."""

    def __init__(self, separate_thinking: bool, parse_tool_calls: bool, stops: Sequence[str]) -> None:
        self._stop = StopMatcher(stops)
        self._parser = OutputParser(separate_thinking, parse_tool_calls)
        self._call_ids = (f"call_{uuid.uuid4().hex[:8]}_{i}" for i in itertools.count())
        self.tool_calls = 0

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def feed(self, text: str) -> Delta:
        return self._delta(self._parser.feed(self._stop.feed(text)))

    def close(self) -> Delta:
        return self._delta(self._parser.feed(self._stop.close()) + self._parser.close())

    def _delta(self, pieces: list[tuple[Channel, str]]) -> Delta:
        delta = Delta()
        for channel, text in pieces:
            if channel == "reasoning":
                delta.reasoning += text
            elif channel == "content":
                delta.content += text
            else:
                call = parse_tool_call(text, next(self._call_ids))
                if call is None:
                    delta.content += f"<tool_call>{text}</tool_call>"
                else:
                    delta.tool_calls.append(call)
                    self.tool_calls += 1
        return delta


async def run_generation(
    generation: Generation, output: OutputAssembler
) -> AsyncGenerator[Delta | Outcome, None]:
    """Deltas as tokens arrive, then one Outcome; a stop sequence aborts the run at once."""
    tokens = 0
    finish: FinishEvent | None = None
    async with aclosing(generation.events) as events:
        async for event in events:
            if isinstance(event, TokenEvent):
                tokens += 1
                delta = output.feed(event.text)
                if delta:
                    yield delta
                if output.stopped:
                    break
            elif isinstance(event, FinishEvent):
                finish = event
    tail = output.close()
    if tail:
        yield tail
    if finish is not None and not output.stopped:
        perf = finish.perf
        reason = "length" if finish.finish_reason == "length" else "stop"
        prompt = generation.cached_tokens + perf.prefill_tokens
        completion = perf.generate_tokens or tokens
        prefill_s, generate_s = perf.prefill_ms / 1000, perf.generate_ms / 1000
    else:
        reason, prompt, completion, prefill_s, generate_s = (
            "stop",
            generation.prompt_estimate,
            tokens,
            0.0,
            0.0,
        )
    if output.tool_calls:
        reason = "tool_calls"
    yield Outcome(reason, prompt, generation.cached_tokens, completion, prefill_s, generate_s)


async def collect_whole(
    request: Request, generation: Generation, output: OutputAssembler
) -> tuple[Delta, Outcome]:
    """The whole answer, for non-streaming responses; the generation is closed whatever happens."""
    try:
        return await until_disconnect(request, _collect(generation, output))
    finally:
        await generation.aclose()


async def _collect(generation: Generation, output: OutputAssembler) -> tuple[Delta, Outcome]:
    total = Delta()
    try:
        async with aclosing(run_generation(generation, output)) as items:
            async for item in items:
                if isinstance(item, Outcome):
                    return total, item
                total.content += item.content
                total.reasoning += item.reasoning
                total.tool_calls.extend(item.tool_calls)
    except RkllmError as exc:
        raise run_error(exc) from exc
    raise AssertionError("run_generation ends with an Outcome")


def run_error(exc: RkllmError) -> ApiError:
    return ApiError(500, f"the NPU runtime failed during generation: {exc}", code="run_error")


class GuardedStream(StreamingResponse):
    """A stream that always closes its generation (even if it never started) and writes per batch.

    The source runs as its own task; whatever it produced while the previous write was in flight
    goes out as one write, so a fast runtime costs one send per batch of tokens, not per token.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        generation: Generation,
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
