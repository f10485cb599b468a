"""One model handle of librkllmrt 1.2.x driven from asyncio.

Threading model: each Engine owns one dedicated worker thread (a single-thread executor) that
makes the blocking rkllm_run calls. A dedicated thread rather than asyncio.to_thread because a run
lasts seconds to minutes: runs of several engines must not exhaust or starve the loop's shared
default executor, and one handle runs one inference at a time anyway, so queued generations simply
wait their turn in the engine's own queue. Tokens reach the loop through RequestRun's hand-off
(call_soon_threadsafe), so the loop never blocks on the runtime.

Every call on the handle holds the engine's handle lock; rkllm_abort alone bypasses it, because
it exists to interrupt a run that holds the lock.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from rkllm_runtime import abi
from rkllm_runtime.errors import (
    EngineClosedError,
    HandleBusyError,
    InitError,
    RkllmError,
    RunError,
    RuntimeHungError,
)
from rkllm_runtime.generation import (
    FinishEvent,
    FinishReason,
    GenerationRequest,
    HiddenStates,
    PerfStats,
    RequestRun,
    RunAbandoned,
    RunOutcome,
    TokenEvent,
)
from rkllm_runtime.library import OPEN_FILES_TARGET, RkllmLibrary, open_file_limit

__all__ = [
    "Engine",
    "FinishEvent",
    "FinishReason",
    "GenerationRequest",
    "HiddenStates",
    "ModelParams",
    "PerfStats",
    "TokenEvent",
]

MAX_CONTEXT_LIMIT = 16384  # the 1.2.x runtime's ceiling for max_context_len


def _require_int(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass, and a float here is exactly the top_k-as-c_float bug of other bindings.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} outside [{low}, {high}]")


def _require_float(name: str, value: float, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name}={value} outside [{low}, {high}]")


@dataclass(frozen=True)
class ModelParams:
    """Every init-time parameter the runtime reads, set explicitly (its defaults are undocumented)."""

    model_path: str
    max_context_len: int = 4096
    max_new_tokens: int = 2048
    n_keep: int = -1
    top_k: int = 1
    top_p: float = 0.9
    temperature: float = 0.8
    repeat_penalty: float = 1.1
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    enabled_cpus_mask: int = abi.RK3588_BIG_CORES_MASK
    enabled_cpus_num: int = 4
    base_domain_id: int = 0
    embed_flash: bool = True

    def __post_init__(self) -> None:
        _require_int("max_context_len", self.max_context_len, 1, MAX_CONTEXT_LIMIT)
        _require_int("max_new_tokens", self.max_new_tokens, 1, 2**31 - 1)
        _require_int("n_keep", self.n_keep, -1, self.max_context_len)
        _require_int("top_k", self.top_k, 0, 1000)
        _require_int("enabled_cpus_mask", self.enabled_cpus_mask, 1, 0xFF)
        _require_int("enabled_cpus_num", self.enabled_cpus_num, 1, 8)
        _require_int("base_domain_id", self.base_domain_id, 0, 2**31 - 1)
        if self.enabled_cpus_num != self.enabled_cpus_mask.bit_count():
            raise ValueError(
                f"enabled_cpus_num={self.enabled_cpus_num} does not match mask {self.enabled_cpus_mask:#x}"
            )
        _require_float("top_p", self.top_p, 0.0, 1.0)
        _require_float("temperature", self.temperature, 0.0, 2.0)
        _require_float("repeat_penalty", self.repeat_penalty, 0.0, 2.0)
        _require_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _require_float("presence_penalty", self.presence_penalty, -2.0, 2.0)

    def to_c(self, library: RkllmLibrary) -> tuple[abi.RKLLMParam, list[bytes]]:
        """The C struct plus the byte strings it points to (keep them alive as long as the struct)."""
        param = library.create_default_param()
        model_path = self.model_path.encode()
        empty = b""
        param.model_path = model_path
        param.max_context_len = self.max_context_len
        param.max_new_tokens = self.max_new_tokens
        param.top_k = self.top_k
        param.n_keep = self.n_keep
        param.top_p = self.top_p
        param.temperature = self.temperature
        param.repeat_penalty = self.repeat_penalty
        param.frequency_penalty = self.frequency_penalty
        param.presence_penalty = self.presence_penalty
        param.mirostat = 0
        param.mirostat_tau = 5.0
        param.mirostat_eta = 0.1
        param.skip_special_token = True
        param.is_async = False
        param.img_start = empty
        param.img_end = empty
        param.img_content = empty
        extend = param.extend_param
        extend.base_domain_id = self.base_domain_id
        extend.embed_flash = int(self.embed_flash)
        extend.enabled_cpus_num = self.enabled_cpus_num
        extend.enabled_cpus_mask = self.enabled_cpus_mask
        extend.n_batch = 1
        extend.use_cross_attn = 0
        ctypes.memset(extend.reserved, 0, len(extend.reserved))
        return param, [model_path, empty]


def _init_failure_message(params: ModelParams, status: int) -> str:
    return (
        f"rkllm_init failed (status {status}) for model {params.model_path}. Likely causes: "
        "the rknpu kernel driver is too old (librkllmrt 1.2.3 needs 0.9.8, anything below 0.9.7 fails; "
        "check /sys/kernel/debug/rknpu/version); "
        f"the open-file limit is too low (RLIMIT_NOFILE soft limit is {open_file_limit()}, the runtime "
        f"opens one dma-buf fd per NPU buffer; raise it to {OPEN_FILES_TARGET}); "
        f"NPU memory domain {params.base_domain_id} is full (another model lives there; "
        "try another base_domain_id or unload a model); "
        "the model was converted by a different rkllm-toolkit version or for another platform "
        "(it must be converted by toolkit 1.2.x for rk3588); "
        f"max_context_len={params.max_context_len} exceeds the model's converted context. "
        "The runtime's own reason is on stderr."
    )


async def _wait_even_if_cancelled(future: asyncio.Future[None]) -> None:
    """Wait for future; a cancellation meanwhile is re-raised only once the future is done."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class Engine:
    """One rkllm handle: init, serialized runs on a worker thread, control calls, destroy."""

    def __init__(self, library: RkllmLibrary, params: ModelParams, *, control_timeout_s: float = 0.1) -> None:
        self._library = library
        self._params = params
        # Control calls made while a generation holds the handle fail after this long instead of
        # stalling the caller (often the event loop) for the rest of the run.
        self._control_timeout_s = control_timeout_s
        self._handle_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._runs: dict[int, RequestRun] = {}
        self._next_key = itertools.count(1)
        self._active: RequestRun | None = None
        self._closed = False
        # A run the watchdog gave up on still holds the handle (and the worker thread) for good.
        self._abandoned: RequestRun | None = None
        if not Path(params.model_path).is_file():
            raise InitError(f"model file {params.model_path} does not exist or is not a file")
        c_param, self._c_strings = params.to_c(library)
        # The runtime keeps this pointer for the handle's whole life.
        self._callback = abi.LLMResultCallback(self._on_result)
        status, handle = library.init(c_param, self._callback)
        if status != 0 or not handle:
            raise InitError(_init_failure_message(params, status))
        self._handle: int | None = handle
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkllm-run")

    @property
    def model_path(self) -> str:
        return self._params.model_path

    @property
    def params(self) -> ModelParams:
        return self._params

    # --- runtime callback (any thread) ----------------------------------------------------------
    def _on_result(self, result: ctypes._Pointer[abi.RKLLMResult], userdata: int | None, state: int) -> int:
        run = self._runs.get(userdata or 0)
        if run is None:
            # Nobody to deliver to: generating further would only waste the NPU.
            return abi.CALLBACK_STOP
        try:
            return run.on_result(result.contents, state)
        except BaseException as exc:  # an exception must never cross into C: ctypes would return garbage
            run.record_callback_error(exc)
            return abi.CALLBACK_STOP

    # --- generation -----------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Yield TokenEvents then one FinishEvent; RunError if the runtime reported an error.

        Closing or cancelling the iterator early aborts the run and waits until rkllm_run has
        returned, so the handle is free again when this generator is finished.
        """
        async with aclosing(self._drive(RequestRun(request, asyncio.get_running_loop()))) as events:
            async for event in events:
                yield event

    async def last_hidden_layer(self, text: str) -> tuple[HiddenStates, PerfStats]:
        """The last layer's hidden states for text (one single-turn run in hidden-layer mode, no tokens).

        The run uses keep_history=0; what it leaves in the KV cache is the caller's to clear.
        """
        request = GenerationRequest(prompt=text, keep_history=False, infer_mode="last_hidden_layer")
        run = RequestRun(request, asyncio.get_running_loop())
        finish: FinishEvent | None = None
        async with aclosing(self._drive(run)) as events:
            async for event in events:
                if isinstance(event, FinishEvent):
                    finish = event
        if run.hidden is None or finish is None:
            raise RunError(f"rkllm_run returned no hidden states for {self.model_path}")
        return run.hidden, finish.perf

    async def _drive(self, run: RequestRun) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        key = next(self._next_key)
        with self._state_lock:
            if self._closed:
                raise EngineClosedError(f"engine for {self.model_path} is closed")
            self._runs[key] = run
            self._executor.submit(self._run_on_worker, key, run)
        done = False
        try:
            while not done:
                for item in await run.next_batch():
                    if isinstance(item, RunAbandoned):
                        raise RuntimeHungError(f"{item.reason} on model {self.model_path}")
                    if isinstance(item, RunOutcome):
                        done = True
                    else:
                        yield item
            yield self._finish(run)
        finally:
            if run.outcome is None and not run.abandoned:
                await self._stop_and_wait(run)
            self._runs.pop(key, None)

    def _finish(self, run: RequestRun) -> FinishEvent:
        outcome = run.outcome
        assert outcome is not None
        where = f"model {self.model_path} after {run.tokens} tokens"
        if run.hung is not None:
            raise RuntimeHungError(f"{run.hung}; the run was aborted on {where}")
        if outcome.error is not None:
            raise RunError(f"run failed on {where}: {outcome.error!r}") from outcome.error
        if run.callback_error is not None:
            failure = run.callback_error
            raise RunError(f"token callback failed on {where}: {failure!r}") from failure
        if run.runtime_error:
            raise RunError(f"runtime reported RKLLM_RUN_ERROR on {where}")
        if outcome.status != 0 and run.stop_reason is None:
            raise RunError(f"rkllm_run returned {outcome.status} on {where}")
        return FinishEvent(perf=run.perf or run.fallback_perf(), finish_reason=run.stop_reason or "stop")

    async def _stop_and_wait(self, run: RequestRun) -> None:
        with self._state_lock:
            if not run.started:
                # Still queued behind another run: claim it so the worker skips it, and return
                # now instead of waiting for the run ahead of it.
                run.request_stop("abort")
                run.started = True
                return
            if self._active is run and self._handle is not None:
                # Abort before the callback can see the stop flag: rkllm_abort also stops prefill,
                # while the callback's return 1 would only pause at the next token.
                self._library.abort(self._handle)
            run.request_stop("abort")
        await _wait_even_if_cancelled(run.returned)

    def _run_on_worker(self, key: int, run: RequestRun) -> None:
        status: int | None = None
        error: BaseException | None = None
        try:
            with self._handle_lock:
                with self._state_lock:
                    skip = run.started or run.stop_reason is not None or self._handle is None
                    run.started = True
                    if not skip:
                        run.last_progress = time.monotonic()
                        self._active = run
                if skip:
                    run.request_stop("abort")
                    return
                try:
                    status = self._library.run(self._handle, run.c_input, run.c_infer, key)
                finally:
                    with self._state_lock:
                        self._active = None
                if run.stop_reason is not None and not run.request.keep_history:
                    # Returning 1 pauses: the runtime keeps the KV cache so the run could resume,
                    # and a later single-turn run would continue from it. We never resume.
                    self._library.clear_kv_cache(self._handle, True)
        except BaseException as exc:  # reported to the consumer, never lost on the worker thread
            error = exc
        finally:
            run.complete(RunOutcome(status, error))

    def abort(self) -> None:
        """Abort the generation currently running on the handle (its finish_reason is "abort")."""
        with self._state_lock:
            if self._active is not None and self._handle is not None:
                self._library.abort(self._handle)
                self._active.request_stop("abort")

    # --- watchdog ------------------------------------------------------------------------------
    def stalled_for(self, now: float) -> float | None:
        """Seconds the running generation has gone without a callback; None when idle or already judged."""
        with self._state_lock:
            run = self._active
            if run is None or run.hung is not None:
                return None
            return now - run.last_progress

    def mark_hung(self, reason: str) -> asyncio.Future[None] | None:
        """Judge the running generation hung: it will fail with RuntimeHungError. Returns the future
        resolved once rkllm_run returns (None when nothing runs any more); then call abort_hung()."""
        with self._state_lock:
            run = self._active
            if run is None:
                return None
            run.hung = reason
            run.request_stop("abort")
            return run.returned

    def abort_hung(self) -> None:
        """rkllm_abort for a run judged hung, without the state lock: a wedged runtime may never return."""
        handle = self._handle
        if handle is not None:
            self._library.abort(handle)

    def abandon_hung(self) -> None:
        """Stop waiting for a hung run that abort did not end (loop thread): its consumer fails now and
        the handle is never used or destroyed again; only the end of the process frees it."""
        with self._state_lock:
            run = self._active
            if run is None or run.hung is None:
                return
            self._abandoned = run
        run.abandon()

    @property
    def abandoned(self) -> bool:
        return self._abandoned is not None

    # --- control calls --------------------------------------------------------------------------
    def _control(self, what: str, call: Callable[[int], int]) -> None:
        if not self._handle_lock.acquire(timeout=self._control_timeout_s):
            raise HandleBusyError(f"{what}: a generation holds the handle of {self.model_path}")
        try:
            if self._handle is None:
                raise EngineClosedError(f"{what}: engine for {self.model_path} is closed")
            status = call(self._handle)
        finally:
            self._handle_lock.release()
        if status != 0:
            raise RkllmError(f"{what} failed with status {status} on model {self.model_path}")

    def clear_kv_cache(self, keep_system_prompt: bool = False) -> None:
        self._control(
            "rkllm_clear_kv_cache", lambda handle: self._library.clear_kv_cache(handle, keep_system_prompt)
        )

    def kv_cache_size(self) -> int:
        sizes: list[int] = []

        def query(handle: int) -> int:
            status, size = self._library.get_kv_cache_size(handle)
            sizes.append(size)
            return status

        self._control("rkllm_get_kv_cache_size", query)
        return sizes[0]

    def set_chat_template(self, system_prompt: str, prefix: str, postfix: str) -> None:
        encoded = (system_prompt.encode(), prefix.encode(), postfix.encode())
        self._control(
            "rkllm_set_chat_template", lambda handle: self._library.set_chat_template(handle, *encoded)
        )

    def set_function_tools(
        self, system_prompt: str, tools_json: str, tool_response_tag: str = "tool_response"
    ) -> None:
        encoded = (system_prompt.encode(), tools_json.encode(), tool_response_tag.encode())
        self._control(
            "rkllm_set_function_tools", lambda handle: self._library.set_function_tools(handle, *encoded)
        )

    def load_lora(self, path: str, name: str, scale: float = 1.0) -> None:
        adapter = abi.RKLLMLoraAdapter(path.encode(), name.encode(), scale)
        self._control("rkllm_load_lora", lambda handle: self._library.load_lora(handle, adapter))

    def load_prompt_cache(self, path: str) -> None:
        encoded = path.encode()
        self._control(
            "rkllm_load_prompt_cache", lambda handle: self._library.load_prompt_cache(handle, encoded)
        )

    def release_prompt_cache(self) -> None:
        self._control("rkllm_release_prompt_cache", self._library.release_prompt_cache)

    # --- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Abort any run, wait for the worker, destroy the handle. Idempotent; blocks until done."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            if self._abandoned is not None:
                # Its rkllm_run never returned: waiting for the worker or destroying would block forever.
                return
            for run in self._runs.values():
                run.request_stop("abort")
            if self._active is not None and self._handle is not None:
                self._library.abort(self._handle)
        # Queued runs still execute their job, see the stop request and complete as aborted.
        self._executor.shutdown(wait=True)
        with self._handle_lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                self._library.destroy(handle)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
