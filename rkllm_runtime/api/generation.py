"""One generation from prompt to Outcome: rendering, admission, the turn, and the runtime's events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from starlette.requests import Request

from rkllm_runtime.api.errors import ApiError, bad_request, domain_error
from rkllm_runtime.api.output import Delta, FinishReason, Outcome, OutputAssembler
from rkllm_runtime.api.plumbing import scheduler_of, until_disconnect
from rkllm_runtime.chat import Message
from rkllm_runtime.chat_templates import ChatTemplateError
from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.embedding import embedding_only_message
from rkllm_runtime.engine import FinishEvent, TokenEvent
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.registry import ModelUnavailableError
from rkllm_runtime.scheduler import (
    ContextOverflowError,
    Job,
    Started,
    ToolsRefusedError,
    check_context,
)


async def render_prompt(config: ServerConfig, model: ModelConfig, messages: Sequence[Message]) -> str:
    """The conversation as the model's template renders it, on a worker thread (long ones take ms)."""
    try:
        return await asyncio.to_thread(config.template_for(model).render, messages, model.system_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages", code="unsupported_conversation") from exc


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
    events = scheduler.generate(ticket, model.name, job)
    try:
        started = await until_disconnect(request, anext(events))
    except (ModelUnavailableError, RkllmError) as exc:
        # Nothing was generated: 503 lets the balancer try another board.
        await events.aclose()
        scheduler.metrics.rejected.labels(model.name, "model_unavailable").inc()
        unavailable = exc if isinstance(exc, ModelUnavailableError) else ModelUnavailableError(str(exc))
        raise domain_error(unavailable) from exc
    except ToolsRefusedError as exc:
        await events.aclose()
        raise bad_request(str(exc), param="tools", code="invalid_tools") from exc
    except BaseException:
        await events.aclose()
        raise
    assert isinstance(started, Started)
    return Generation(model.name, started.cached_tokens, started.load_seconds, estimate, events)


async def run_generation(
    generation: Generation, output: OutputAssembler
) -> AsyncGenerator[Delta | Outcome, None]:
    """Deltas as tokens arrive, then one Outcome; a stop sequence aborts the run at once."""
    tokens = 0
    finish: FinishEvent | None = None
    reason: FinishReason
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
