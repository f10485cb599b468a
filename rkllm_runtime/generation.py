"""Per-request generation state: C input structs, UTF-8 reassembly and the thread-to-loop hand-off.

One RequestRun exists per generate() call and travels to the runtime callback through userdata
(the engine maps the userdata key back to it), so nothing about a request lives in module globals:
a broken request can never poison the next one.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from rkllm_runtime import abi

FinishReason = Literal["stop", "length", "abort"]
# "generate": tokens; "last_hidden_layer": prefill only, the last layer's hidden states, no tokens.
InferMode = Literal["generate", "last_hidden_layer"]


@dataclass(frozen=True, slots=True)
class PerfStats:
    prefill_ms: float
    prefill_tokens: int
    generate_ms: float
    generate_tokens: int
    memory_mb: float

    @property
    def decode_tokens_per_second(self) -> float:
        return self.generate_tokens * 1000.0 / self.generate_ms if self.generate_ms > 0 else 0.0

    @classmethod
    def from_c(cls, perf: abi.RKLLMPerfStat) -> PerfStats:
        return cls(
            prefill_ms=perf.prefill_time_ms,
            prefill_tokens=perf.prefill_tokens,
            generate_ms=perf.generate_time_ms,
            generate_tokens=perf.generate_tokens,
            memory_mb=perf.memory_usage_mb,
        )


@dataclass(frozen=True, slots=True)
class TokenEvent:
    text: str
    token_id: int


@dataclass(frozen=True, slots=True)
class FinishEvent:
    perf: PerfStats
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class HiddenStates:
    """A copy of RKLLMResultLastHiddenLayer: num_tokens rows of embd_size float32, native byte order."""

    embd_size: int
    num_tokens: int
    data: bytes

    def row(self, index: int) -> bytes:
        size = self.embd_size * ctypes.sizeof(ctypes.c_float)
        return self.data[index * size : (index + 1) * size]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | None = None
    token_ids: Sequence[int] | None = None
    role: str = "user"
    enable_thinking: bool = False
    keep_history: bool = False
    max_tokens: int | None = None
    lora_adapter: str | None = None
    prompt_cache_path: str | None = None
    save_prompt_cache: bool = False
    infer_mode: InferMode = "generate"

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.token_ids is None):
            raise ValueError("give exactly one of prompt and token_ids")
        if self.token_ids is not None and len(self.token_ids) == 0:
            raise ValueError("token_ids is empty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.save_prompt_cache and self.prompt_cache_path is None:
            raise ValueError("save_prompt_cache needs prompt_cache_path")


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What the worker thread learnt once rkllm_run returned."""

    status: int | None
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class RunAbandoned:
    """The watchdog gave up on a hung run that rkllm_abort did not end: its consumer stops waiting."""

    reason: str


class RequestRun:
    """State of one generate() call, shared by the loop thread and the runtime callback thread."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self._loop = loop
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Text already decoded from WAITING bytes; it belongs to the next NORMAL token.
        self._carried_text = ""
        self._last_token_id = -1
        self.tokens = 0
        self.stop_reason: FinishReason | None = None
        self.runtime_error = False
        self.callback_error: BaseException | None = None
        self.perf: PerfStats | None = None
        self.hidden: HiddenStates | None = None
        self.outcome: RunOutcome | None = None
        # time.monotonic() of the run's start or its last callback: what the watchdog judges by.
        self.last_progress = 0.0
        # Set by the watchdog: why it aborted the run; abandoned once it stopped waiting for rkllm_run.
        self.hung: str | None = None
        self.abandoned = False
        # Set under the engine's state lock by whoever claims the run first: the worker starting
        # it, or a consumer giving up on it while it is still queued.
        self.started = False
        self._handoff_lock = threading.Lock()
        self._handoff: deque[TokenEvent | RunOutcome | RunAbandoned] = deque()
        self._wakeup_pending = False
        self._ready = asyncio.Event()
        # Resolved once rkllm_run has returned: from then on the handle is free.
        self.returned: asyncio.Future[None] = loop.create_future()
        self._build_c_arguments(request)

    def _build_c_arguments(self, request: GenerationRequest) -> None:
        # Every buffer the runtime reads stays referenced here until the run is over.
        self._role = request.role.encode()
        self.c_input = abi.RKLLMInput()
        self.c_input.role = self._role
        self.c_input.enable_thinking = request.enable_thinking
        if request.prompt is not None:
            self._prompt = request.prompt.encode()
            self.c_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_PROMPT
            self.c_input.prompt_input = self._prompt
        else:
            assert request.token_ids is not None
            self._token_ids = (ctypes.c_int32 * len(request.token_ids))(*request.token_ids)
            self.c_input.input_type = abi.RKLLMInputType.RKLLM_INPUT_TOKEN
            self.c_input.token_input.input_ids = ctypes.cast(self._token_ids, ctypes.POINTER(ctypes.c_int32))
            self.c_input.token_input.n_tokens = len(request.token_ids)
        self.c_infer = abi.RKLLMInferParam()
        self.c_infer.mode = (
            abi.RKLLMInferMode.RKLLM_INFER_GET_LAST_HIDDEN_LAYER
            if request.infer_mode == "last_hidden_layer"
            else abi.RKLLMInferMode.RKLLM_INFER_GENERATE
        )
        self.c_infer.keep_history = int(request.keep_history)
        if request.lora_adapter is not None:
            self._lora = abi.RKLLMLoraParam(request.lora_adapter.encode())
            self.c_infer.lora_params = ctypes.pointer(self._lora)
        if request.prompt_cache_path is not None:
            self._cache = abi.RKLLMPromptCacheParam(
                int(request.save_prompt_cache), request.prompt_cache_path.encode()
            )
            self.c_infer.prompt_cache_params = ctypes.pointer(self._cache)

    # --- runtime callback thread -------------------------------------------------------------
    def on_result(self, result: abi.RKLLMResult, state: int) -> int:
        """Handle one callback; returns the int the runtime expects (0 go on, 1 stop)."""
        self.last_progress = time.monotonic()
        hidden_mode = self.request.infer_mode == "last_hidden_layer"
        if state == abi.LLMCallState.RKLLM_RUN_NORMAL and hidden_mode:
            self._copy_hidden_states(result.last_hidden_layer)
            if self.hidden is not None:
                # Nothing after the prompt's states is wanted: if the runtime went on to generate
                # tokens in this mode, they would cost up to max_new_tokens decode steps.
                return abi.CALLBACK_STOP
        elif state == abi.LLMCallState.RKLLM_RUN_NORMAL:
            self._on_token(result.text or b"", result.token_id)
        elif state == abi.LLMCallState.RKLLM_RUN_WAITING and not hidden_mode:
            self._carried_text += self._decoder.decode(result.text or b"")
        elif state == abi.LLMCallState.RKLLM_RUN_FINISH:
            self.perf = PerfStats.from_c(result.perf)
        elif state == abi.LLMCallState.RKLLM_RUN_ERROR:
            self.runtime_error = True
        return abi.CALLBACK_CONTINUE if self.stop_reason is None else abi.CALLBACK_STOP

    def _copy_hidden_states(self, layer: abi.RKLLMResultLastHiddenLayer) -> None:
        # The runtime frees (the double poisons) the buffer once the callback returns: copy it now.
        if layer.hidden_states and layer.embd_size > 0 and layer.num_tokens > 0 and self.hidden is None:
            size = layer.embd_size * layer.num_tokens * ctypes.sizeof(ctypes.c_float)
            self.hidden = HiddenStates(
                layer.embd_size, layer.num_tokens, ctypes.string_at(layer.hidden_states, size)
            )

    def _on_token(self, raw: bytes, token_id: int) -> None:
        text = self._carried_text + self._decoder.decode(raw)
        self._carried_text = ""
        self._last_token_id = token_id
        self.tokens += 1
        if text:
            self._publish(TokenEvent(text, token_id))
        limit = self.request.max_tokens
        if limit is not None and self.tokens >= limit and self.stop_reason is None:
            self.stop_reason = "length"

    def request_stop(self, reason: FinishReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def abandon(self) -> None:
        """Let the consumer go while rkllm_run still blocks (called on the loop thread)."""
        self.abandoned = True
        self._publish(RunAbandoned(self.hung or "the runtime stopped responding"))
        # A consumer that left early waits for this; the abandoned handle is never used again.
        _resolve(self.returned)

    def record_callback_error(self, error: BaseException) -> None:
        if self.callback_error is None:
            self.callback_error = error

    def complete(self, outcome: RunOutcome) -> None:
        """Called once, on the worker thread, after rkllm_run returned (or was skipped)."""
        tail = self._carried_text + self._decoder.decode(b"", final=True)
        if tail:
            self._publish(TokenEvent(tail, self._last_token_id))
        self.outcome = outcome
        self._publish(outcome)
        self._call_in_loop(_resolve, self.returned)

    def _publish(self, item: TokenEvent | RunOutcome | RunAbandoned) -> None:
        # One loop wake-up per batch, not per token: the consumer drains everything queued so far.
        with self._handoff_lock:
            self._handoff.append(item)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        self._call_in_loop(self._ready.set)

    def _call_in_loop(self, function: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(function, *args)
        except RuntimeError:
            # The consumer's loop is closed: nobody is left to tell, and the run still has to end.
            self.request_stop("abort")

    # --- event loop thread ---------------------------------------------------------------------
    async def next_batch(self) -> list[TokenEvent | RunOutcome | RunAbandoned]:
        await self._ready.wait()
        self._ready.clear()
        with self._handoff_lock:
            batch = list(self._handoff)
            self._handoff.clear()
            self._wakeup_pending = False
        return batch

    def fallback_perf(self) -> PerfStats:
        """Perf when no FINISH callback arrived (aborted or stopped runs): our own token count."""
        return PerfStats(0.0, 0, 0.0, self.tokens, 0.0)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
