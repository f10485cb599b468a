"""Per-model bounded FIFO queues in front of the handles, and conversation KV-cache reuse.

A request first gets a Ticket (synchronously: a full queue is refused before any work is done),
then waits for its turn; while it holds the turn it alone uses one of the model's KV slots (one
rkllm handle each), so the NPU still runs one generation at a time per model. Every run keeps its
history in the slot's KV cache and the text in the cache is tracked exactly, so a request whose
rendered conversation starts with that text only sends the new suffix. Which slot a request takes,
and whose cache it evicts, is rkllm_runtime/slot_policy.py.

A runtime failure before anything ran costs the request, not the board: a handle is created again
only when it is broken (it fails a neutral reset, or an earlier run left it so), counted by reason.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.embedding import embedding_vector
from rkllm_runtime.engine import FinishEvent, GenerationRequest, HiddenStates, TokenEvent
from rkllm_runtime.errors import RkllmError, RunError
from rkllm_runtime.metrics import Metrics, ReinitReason
from rkllm_runtime.registry import EngineFactory, KvSlot, LoadedModel, ModelRegistry, ModelUnavailableError
from rkllm_runtime.slot_policy import choose_slot, continues, kept_conversation, reusable_slot

PROBE_PROMPT = "ping"
# A drain usually ends with a restart that takes a few seconds.
DRAINING_RETRY_AFTER_SECONDS = 5
# systemd notices the missing watchdog pings within WatchdogSec, then restarts the service.
RUNTIME_STUCK_RETRY_AFTER_SECONDS = 30


class AdmissionRefusedError(Exception):
    """Refused before any work was done: the balancer may send the request to another board."""

    code = "refused"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(AdmissionRefusedError):
    code = "queue_full"

    def __init__(self, model: str, waiting: int, retry_after: int) -> None:
        super().__init__(
            f"model {model} is busy: {waiting} requests already waiting; retry in {retry_after} s",
            retry_after,
        )


class DrainingError(AdmissionRefusedError):
    code = "draining"

    def __init__(self, drain_file: Path) -> None:
        super().__init__(
            f"this board is draining for maintenance ({drain_file} exists) and takes no new requests; "
            "retry on another board",
            DRAINING_RETRY_AFTER_SECONDS,
        )


class RuntimeStuckError(AdmissionRefusedError):
    code = "runtime_hung"

    def __init__(self, problem: str) -> None:
        super().__init__(
            f"this board's NPU runtime is stuck ({problem}); the service is being restarted, "
            "retry on another board",
            RUNTIME_STUCK_RETRY_AFTER_SECONDS,
        )


class ToolsRefusedError(Exception):
    """The runtime refused the request's tools while its handle still works: the request is at fault."""

    def __init__(self, model: str, failure: RkllmError) -> None:
        super().__init__(
            f"the NPU runtime of model {model} refused this request's tools ({failure}); nothing was "
            "generated: check the tools' definitions"
        )


class ContextOverflowError(Exception):
    def __init__(self, model: ModelConfig, prompt_tokens: int) -> None:
        super().__init__(
            f"the prompt is about {prompt_tokens} tokens but model {model.name} has a context of "
            f"{model.context_length} tokens; shorten the conversation"
        )


def estimate_tokens(text: str, bytes_per_token: float) -> int:
    return max(1, math.ceil(len(text.encode()) / bytes_per_token))


def check_context(model: ModelConfig, prompt: str) -> int:
    """Refuse, before any work, a prompt that cannot fit the context; returns its token estimate."""
    tokens = estimate_tokens(prompt, model.bytes_per_token)
    if tokens >= model.context_length:
        raise ContextOverflowError(model, tokens)
    return tokens


@dataclass(frozen=True)
class Job:
    prompt: str  # the whole rendered conversation (or raw completion prompt)
    max_tokens: int | None = None
    tools_json: str = ""
    role: str = "user"
    arrived: float = 0.0  # time.monotonic() when the request arrived
    later_turn: bool = False  # the prompt carries earlier replies: its slot holds a conversation


@dataclass(frozen=True)
class RunPlan:
    text: str  # what rkllm_run receives
    reuse: bool  # continue the KV cache instead of clearing it
    cached_tokens: int
    max_tokens: int


def plan_run(model: LoadedModel, slot: KvSlot, job: Job, kv_tokens: int) -> RunPlan:
    config = model.config
    wanted = min(job.max_tokens or config.max_new_tokens, config.max_new_tokens)
    cached = slot.kv_text
    reusable = config.kv_cache_reuse and cached and job.prompt.startswith(cached)
    if reusable and len(job.prompt) > len(cached):
        suffix = job.prompt[len(cached) :]
        room = config.context_length - kv_tokens - estimate_tokens(suffix, config.bytes_per_token)
        if room > 0:
            return RunPlan(suffix, True, kv_tokens, min(wanted, room))
    room = config.context_length - estimate_tokens(job.prompt, config.bytes_per_token)
    return RunPlan(job.prompt, False, 0, max(1, min(wanted, room)))


# Mean pooling of more token rows than this (pure Python over rows x embd_size floats) leaves the loop.
MEAN_POOLING_INLINE_TOKENS = 64


@dataclass(frozen=True)
class EmbeddingBatch:
    """The embeddings of one request's inputs, in input order, L2-normalised."""

    vectors: list[array[float]]
    prompt_tokens: int
    load_seconds: float
    prefill_seconds: float


async def pooled_vector(hidden: HiddenStates, model: ModelConfig) -> array[float]:
    if model.embedding_pooling == "mean" and hidden.num_tokens > MEAN_POOLING_INLINE_TOKENS:
        return await asyncio.to_thread(embedding_vector, hidden, model.embedding_pooling)
    return embedding_vector(hidden, model.embedding_pooling)


@dataclass(frozen=True)
class Started:
    """First event of a generation: which model serves it and how much of the prompt was cached."""

    model: str
    cached_tokens: int
    queue_seconds: float
    load_seconds: float  # 0 unless this request had to load the model


class ModelQueue:
    """One running request plus at most `capacity` waiting ones, served first come first served."""

    def __init__(self, name: str, capacity: int, metrics: Metrics, retry_after_max: int) -> None:
        self.name = name
        self.capacity = capacity
        self._metrics = metrics
        self._retry_after_max = retry_after_max
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.busy = False
        self._turn_seconds: deque[float] = deque(maxlen=16)

    @property
    def idle(self) -> bool:
        return not self.busy and not self._waiters

    def admit(self) -> Ticket:
        if not self.busy:
            self.busy = True
            self._update_gauges()
            return Ticket(self, None)
        if len(self._waiters) >= self.capacity:
            self._metrics.rejected.labels(self.name, "queue_full").inc()
            raise QueueFullError(self.name, len(self._waiters), self._retry_after())
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._update_gauges()
        return Ticket(self, future)

    def _retry_after(self) -> int:
        typical = sum(self._turn_seconds) / len(self._turn_seconds) if self._turn_seconds else 1.0
        return max(1, min(self._retry_after_max, math.ceil(typical * (len(self._waiters) + 1))))

    def _withdraw(self, future: asyncio.Future[None]) -> None:
        if future in self._waiters:
            self._waiters.remove(future)
            self._update_gauges()

    def _pass_turn(self, held_seconds: float) -> None:
        self._turn_seconds.append(held_seconds)
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                self._update_gauges()
                return
        self.busy = False
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.waiting.labels(self.name).set(len(self._waiters))
        self._metrics.running.labels(self.name).set(1 if self.busy else 0)


class Ticket:
    """A place in a model's queue; release() is idempotent and must always be called."""

    def __init__(self, queue: ModelQueue, future: asyncio.Future[None] | None) -> None:
        self._queue = queue
        self._future = future
        self._admitted = time.monotonic()
        self._granted_at: float | None = time.monotonic() if future is None else None
        self._released = False

    async def wait(self) -> float:
        """Wait for the turn; returns the seconds spent waiting."""
        if self._future is not None and self._granted_at is None:
            try:
                await self._future
            except asyncio.CancelledError:
                if self._future.done() and not self._future.cancelled():
                    self._granted_at = time.monotonic()
                    self.release()
                else:
                    self._released = True
                    self._queue._withdraw(self._future)
                raise
            self._granted_at = time.monotonic()
        assert self._granted_at is not None
        return self._granted_at - self._admitted

    @property
    def granted(self) -> bool:
        return self._future is None or (self._future.done() and not self._future.cancelled())

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        future = self._future
        if self.granted:
            # Also a turn granted while its holder was being cancelled: it must be passed on.
            self._queue._pass_turn(time.monotonic() - (self._granted_at or time.monotonic()))
        else:
            assert future is not None
            future.cancel()
            self._queue._withdraw(future)


class Scheduler:
    """Queues, handles and runs of one node."""

    def __init__(self, config: ServerConfig, engine_factory: EngineFactory, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self._queues = {
            m.name: ModelQueue(m.name, m.queue_size, metrics, config.retry_after_max_seconds)
            for m in config.models
        }
        self.registry = ModelRegistry(config, engine_factory, metrics, lambda n: self._queues[n].idle)
        self._drain_file = Path(config.drain_file) if config.drain_file else None
        # Set by the watchdog when rkllm_abort failed to end a hung run: nothing may touch the runtime.
        self.runtime_stuck: str | None = None
        # Hidden size of each model that has served an embedding (known only from the runtime's result).
        self.embedding_sizes: dict[str, int] = {}

    def draining(self) -> bool:
        """While the operator's drain file exists, new requests are refused; admitted ones finish."""
        return self._drain_file is not None and self._drain_file.exists()

    def admit(self, model: str) -> Ticket:
        if self.runtime_stuck is not None:
            self.metrics.rejected.labels(model, "runtime_hung").inc()
            raise RuntimeStuckError(self.runtime_stuck)
        if self._drain_file is not None and self.draining():
            self.metrics.rejected.labels(model, "draining").inc()
            raise DrainingError(self._drain_file)
        return self._queues[model].admit()

    def is_busy(self, model: str) -> bool:
        return self._queues[model].busy

    def loaded_models(self) -> list[ModelConfig]:
        """The models whose handles are in NPU memory, least recently used first."""
        return [loaded.config for loaded in self.registry.loaded()]

    async def load(self, ticket: Ticket, model_name: str) -> None:
        """Load the model's handles in the ticket's turn (Ollama's empty prompt)."""
        if not ticket.granted:
            raise RuntimeError("load outside the model's turn")
        await self.registry.ensure(model_name)

    async def unload(self, ticket: Ticket, model_name: str) -> None:
        """Free the model's handles in the ticket's turn (Ollama's keep_alive 0), so no run is cut off."""
        if not ticket.granted:
            raise RuntimeError("unload outside the model's turn")
        await self.registry.unload(model_name)

    async def generate(
        self, ticket: Ticket, model_name: str, job: Job
    ) -> AsyncGenerator[Started | TokenEvent | FinishEvent, None]:
        """Wait for the turn, load the model, run; the turn is released when this generator ends."""
        slot: KvSlot | None = None
        try:
            queue_seconds = await ticket.wait()
            self.metrics.queue_time.labels(model_name).observe(queue_seconds)
            was_loaded = self.registry.get(model_name) is not None
            model = await self.registry.ensure(model_name)
            slot = choose_slot(model, job.prompt, job.tools_json, time.monotonic())
            self._occupy(model_name, slot)
            if slot.poisoned:
                slot = await self._reinit(model_name, slot, "poisoned")
                self._occupy(model_name, slot)
                was_loaded = False
            try:
                plan = self._prepare(model, slot, job)
            except RkllmError:
                # The handle failed a call that carries nothing of the request: it is broken. Nothing
                # ran yet, so a fresh handle serves the request (once: a second failure is answered).
                slot = await self._reinit(model_name, slot, "handle_failed")
                self._occupy(model_name, slot)
                was_loaded = False
                plan = self._prepare(model, slot, job)
            yield Started(
                model_name, plan.cached_tokens, queue_seconds, 0.0 if was_loaded else model.load_seconds
            )
            async with aclosing(self._run(model, slot, job, plan)) as events:
                async for event in events:
                    yield event
        finally:
            if slot is not None:
                self._vacate(model_name, slot)
            ticket.release()

    async def embed(
        self, ticket: Ticket, model_name: str, texts: Sequence[str], arrived: float
    ) -> EmbeddingBatch:
        """Wait for the turn, then embed every text back to back on one slot (one admission for the
        batch, never interleaved with a generation); the turn is released at the end.

        Each text is one single-turn hidden-layer run between two KV-cache clears, so nothing of it
        stays in a slot that a conversation later continues. ModelUnavailableError: nothing ran.
        """
        slot: KvSlot | None = None
        try:
            queue_seconds = await ticket.wait()
            self.metrics.queue_time.labels(model_name).observe(queue_seconds)
            was_loaded = self.registry.get(model_name) is not None
            try:
                model = await self.registry.ensure(model_name)
            except RkllmError as exc:  # e.g. a fresh handle refusing its chat template: nothing ran
                raise ModelUnavailableError(str(exc)) from exc
            slot = reusable_slot(model, time.monotonic())
            self._occupy(model_name, slot)
            try:
                if slot.poisoned:
                    slot = await self._reinit(model_name, slot, "poisoned")
                    self._occupy(model_name, slot)
                    was_loaded = False
                self._prepare_embedding(model, slot)
            except RkllmError:
                slot = await self._reinit(model_name, slot, "handle_failed")
                self._occupy(model_name, slot)
                was_loaded = False
                try:
                    self._prepare_embedding(model, slot)
                except RkllmError as exc:
                    raise ModelUnavailableError(str(exc)) from exc
            vectors, tokens, prefill_ms = await self._embed_all(model, slot, texts)
            self.embedding_sizes[model_name] = len(vectors[0])
            self.metrics.embedding_requests.labels(model_name).inc()
            self.metrics.embedding_inputs.labels(model_name).inc(len(texts))
            self.metrics.prompt_tokens.labels(model_name).inc(tokens)
            self.metrics.e2e_latency.labels(model_name).observe(time.monotonic() - arrived)
            return EmbeddingBatch(
                vectors, tokens, 0.0 if was_loaded else model.load_seconds, prefill_ms / 1000
            )
        finally:
            if slot is not None:
                self._vacate(model_name, slot)
            ticket.release()

    def _prepare_embedding(self, model: LoadedModel, slot: KvSlot) -> None:
        """No tools prompt and an empty cache: the hidden states are of the input text alone."""
        self._count_eviction(model, slot)
        self._reset(slot, tools_known=True)

    def _count_eviction(self, model: LoadedModel, slot: KvSlot) -> None:
        """Called before a run that will not continue the slot's cache."""
        if slot.kv_text:
            self.metrics.kv_slot_evictions.labels(model.config.name).inc()
            if kept_conversation(slot, model.config.kv_slot_keep_seconds, time.monotonic()):
                self.metrics.kv_slot_conversation_evictions.labels(model.config.name).inc()

    @staticmethod
    def _reset(slot: KvSlot, tools_known: bool) -> None:
        """No tools prompt, empty cache: calls that carry nothing of any request. RkllmError from here
        means the handle is broken (it is flagged so)."""
        slot.kv_text = ""
        try:
            if slot.tools_json or not tools_known:
                slot.engine.set_function_tools("", "", "tool_response")
                slot.tools_json = ""
            slot.engine.clear_kv_cache(False)
        except RkllmError:
            slot.poisoned = True
            raise

    async def _reinit(self, model_name: str, slot: KvSlot, reason: ReinitReason) -> KvSlot:
        """A fresh handle in the broken one's place (destroy + init), counted by why."""
        self.metrics.handle_reinits.labels(model_name, reason).inc()
        return await self.registry.reload_slot(model_name, slot.index)

    async def _embed_all(
        self, model: LoadedModel, slot: KvSlot, texts: Sequence[str]
    ) -> tuple[list[array[float]], int, float]:
        name = model.config.name
        vectors: list[array[float]] = []
        tokens, prefill_ms = 0, 0.0
        for text in texts:
            try:
                hidden, perf = await slot.engine.last_hidden_layer(text)
                # keep_history=0 already ignores the cache; the clear keeps the slot honestly empty.
                slot.engine.clear_kv_cache(False)
                vectors.append(await pooled_vector(hidden, model.config))
            except RkllmError as exc:
                # RUN_ERROR leaves the handle usable; anything else (closed, busy, hung) does not.
                slot.poisoned = not isinstance(exc, RunError)
                self.metrics.rejected.labels(name, "run_error").inc()
                raise
            tokens += perf.prefill_tokens or hidden.num_tokens
            prefill_ms += perf.prefill_ms
        return vectors, tokens, prefill_ms

    def _occupy(self, model_name: str, slot: KvSlot) -> None:
        slot.running = True
        self.metrics.set_slot_state(model_name, slot.index, slot.state)

    def _vacate(self, model_name: str, slot: KvSlot) -> None:
        slot.running = False
        slot.last_used = time.monotonic()
        loaded = self.registry.get(model_name)
        if loaded is not None and slot in loaded.slots:  # not replaced or unloaded meanwhile
            self.metrics.set_slot_state(model_name, slot.index, slot.state)

    def _prepare(self, model: LoadedModel, slot: KvSlot, job: Job) -> RunPlan:
        """Tools and KV cache set up for the job; the handle's cache state is unknown until it ends."""
        engine, name = slot.engine, model.config.name
        if not continues(slot, job.prompt, job.tools_json):
            self._count_eviction(model, slot)
        if job.tools_json != slot.tools_json:
            slot.kv_text = ""  # the runtime's tool prompt changes what the cache means
            try:
                engine.set_function_tools("", job.tools_json, "tool_response")
            except RkllmError as failure:
                # The one call that carries the request's input. If the handle then takes an empty
                # tool list, the tools were refused, not the handle broken: fail this request only.
                self._reset(slot, tools_known=False)
                raise ToolsRefusedError(name, failure) from failure
            slot.tools_json = job.tools_json
        plan = plan_run(model, slot, job, engine.kv_cache_size() if slot.kv_text else 0)
        if not plan.reuse:
            slot.kv_text = ""
            engine.clear_kv_cache(False)
        return plan

    async def _run(
        self, model: LoadedModel, slot: KvSlot, job: Job, plan: RunPlan
    ) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        engine, name = slot.engine, model.config.name
        base = slot.kv_text
        slot.kv_text = ""  # unknown until this run completes cleanly
        request = GenerationRequest(
            prompt=plan.text, role=job.role, keep_history=True, max_tokens=plan.max_tokens
        )
        generated: list[str] = []
        last = None
        try:
            async with aclosing(engine.generate(request)) as events:
                async for event in events:
                    now = time.monotonic()
                    if isinstance(event, TokenEvent):
                        if last is None:
                            self.metrics.time_to_first_token.labels(name).observe(now - job.arrived)
                        else:
                            self.metrics.inter_token_latency.labels(name).observe(now - last)
                        last = now
                        generated.append(event.text)
                    else:
                        self._observe_finish(model, event, job, plan)
                        if event.finish_reason != "abort" and model.config.kv_cache_reuse:
                            slot.kv_text = base + plan.text + "".join(generated)
                            slot.conversation = plan.reuse or job.later_turn
                    yield event
        except RkllmError as exc:
            # RUN_ERROR leaves the handle usable; anything else (closed, busy, failed call) does not.
            slot.poisoned = not isinstance(exc, RunError)
            self.metrics.rejected.labels(name, "run_error").inc()
            raise

    def _observe_finish(self, model: LoadedModel, event: FinishEvent, job: Job, plan: RunPlan) -> None:
        perf, name = event.perf, model.config.name
        self.metrics.prompt_tokens.labels(name).inc(perf.prefill_tokens)
        self.metrics.prompt_tokens_cached.labels(name).inc(plan.cached_tokens)
        self.metrics.generation_tokens.labels(name).inc(perf.generate_tokens)
        self.metrics.e2e_latency.labels(name).observe(time.monotonic() - job.arrived)
        if perf.memory_mb > 0:
            self.metrics.model_memory.labels(name).set(perf.memory_mb * len(model.slots) * 1024 * 1024)
        if perf.generate_ms > 0:
            self.metrics.decode_rate.labels(name).observe(perf.decode_tokens_per_second)

    async def probe(self, model_name: str) -> str | None:
        """Check an idle model's handles without touching a conversation; re-initialise failed ones once.

        None = healthy. The first empty slot runs a one-token generation (the NPU and the runtime
        generate); every other slot is asked for its KV cache size (its handle is alive and answers the
        runtime). No cache that holds a conversation is run on or cleared.
        """
        if self.runtime_stuck is not None:
            return f"{model_name}: the runtime is stuck ({self.runtime_stuck})"
        queue = self._queues[model_name]
        if queue.busy:
            # It is generating right now; a poisoned handle is flagged by the run that found out.
            model = self.registry.get(model_name)
            return None if model is not None and not model.poisoned else f"{model_name}: handle failed"
        problem = await self._probe_once(model_name)
        if problem is not None:
            problem = await self._probe_once(model_name)
        return problem

    async def _probe_once(self, model_name: str) -> str | None:
        # Probes go on while the node drains: its operator still wants to know the runtime works.
        ticket = self._queues[model_name].admit()
        slot: KvSlot | None = None
        try:
            await ticket.wait()
            # A probe does not count as use: it must not change which model is evicted first.
            model = self.registry.get(model_name) or await self.registry.ensure(model_name)
            generated = False
            for index in range(len(model.slots)):
                slot = model.slots[index]
                if slot.poisoned:
                    slot = await self._reinit(model_name, slot, "poisoned")
                if slot.kv_text or generated:
                    slot.engine.kv_cache_size()
                elif model.config.kind == "embedding":
                    await slot.engine.last_hidden_layer(PROBE_PROMPT)
                    slot.engine.clear_kv_cache(False)
                    generated = True
                else:
                    request = GenerationRequest(prompt=PROBE_PROMPT, keep_history=False, max_tokens=1)
                    async with aclosing(slot.engine.generate(request)) as events:
                        async for _ in events:
                            pass
                    generated = True
        except Exception as exc:  # any failure is the answer to "is this handle healthy?"
            if slot is not None:
                slot.poisoned = True
            return f"{model_name}: {exc}"
        finally:
            ticket.release()
        return None

    async def load_pinned(self) -> None:
        for model in self.config.models:
            if model.pinned:
                await self.registry.ensure(model.name)

    async def close(self) -> None:
        await self.registry.close()
