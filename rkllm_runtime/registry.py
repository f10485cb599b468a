"""Model handles of one node: loaded on demand, evicted least-recently-used to stay in the NPU budget."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.engine import Engine, ModelParams
from rkllm_runtime.errors import InitError
from rkllm_runtime.metrics import Metrics
from rkllm_runtime.npu_memory import NpuMemoryError, NpuMemoryPlanner

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelParams], Engine]


class ModelUnavailableError(Exception):
    """The model cannot be loaded now (init failed, or the NPU budget is held by busy models)."""


@dataclass
class LoadedModel:
    config: ModelConfig
    engine: Engine
    load_seconds: float
    loaded_at: float
    # Exact text held in the handle's KV cache; "" means unknown or empty: clear before the next run.
    kv_text: str = ""
    tools_json: str = ""
    poisoned: bool = False


def model_params(model: ModelConfig, base_domain_id: int) -> ModelParams:
    return ModelParams(
        model_path=model.path,
        max_context_len=model.context_length,
        max_new_tokens=model.max_new_tokens,
        top_k=model.top_k,
        top_p=model.top_p,
        temperature=model.temperature,
        repeat_penalty=model.repeat_penalty,
        enabled_cpus_mask=model.enabled_cpus_mask,
        enabled_cpus_num=model.enabled_cpus_mask.bit_count(),
        base_domain_id=base_domain_id,
    )


class ModelRegistry:
    def __init__(
        self,
        config: ServerConfig,
        engine_factory: EngineFactory,
        metrics: Metrics,
        is_idle: Callable[[str], bool],
    ) -> None:
        self._config = config
        self._engine_factory = engine_factory
        self._metrics = metrics
        self._is_idle = is_idle
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recently used first
        self._load_lock = asyncio.Lock()
        # Only picks base_domain_ids; the budget itself is enforced by LRU eviction below.
        self._domains = NpuMemoryPlanner(budget_mb=float("inf"))

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def get(self, name: str) -> LoadedModel | None:
        return self._loaded.get(name)

    async def ensure(self, name: str) -> LoadedModel:
        """The model's handle, loading it (and evicting idle unpinned models) if needed."""
        existing = self._loaded.get(name)
        if existing is None:
            async with self._load_lock:
                existing = self._loaded.get(name) or await self._load(name)
        self._loaded.move_to_end(name)
        return existing

    async def reload(self, name: str) -> LoadedModel:
        """Destroy the handle and create a fresh one (a poisoned handle's cure)."""
        async with self._load_lock:
            await self._unload(name)
            return await self._load(name)

    async def unload(self, name: str) -> None:
        async with self._load_lock:
            await self._unload(name)

    async def close(self) -> None:
        async with self._load_lock:
            for name in list(self._loaded):
                await self._unload(name)

    async def _unload(self, name: str) -> None:
        model = self._loaded.pop(name, None)
        if model is not None:
            await asyncio.to_thread(model.engine.close)
            self._domains.release(name)
            self._metrics.model_memory.labels(name).set(0)
            log.info("unloaded model %s", name)

    def _used_mb(self) -> int:
        return sum(m.config.memory_mb for m in self._loaded.values())

    def _eviction_candidate(self) -> str | None:
        return next((n for n, m in self._loaded.items() if not m.config.pinned and self._is_idle(n)), None)

    async def _make_room(self, model: ModelConfig) -> None:
        budget = self._config.npu_memory_budget_mb
        while budget and self._used_mb() + model.memory_mb > budget:
            victim = self._eviction_candidate()
            if victim is None:
                raise ModelUnavailableError(
                    f"model {model.name} needs {model.memory_mb} MB but only "
                    f"{budget - self._used_mb()} MB of the {budget} MB NPU budget are free and every "
                    "loaded model is pinned or busy"
                )
            log.info("evicting %s to make room for %s", victim, model.name)
            await self._unload(victim)

    def _place(self, model: ModelConfig) -> int:
        fixed = self._config.fixed_domain(model)
        if fixed is not None:
            return fixed
        # The planner needs a size; an unsized model is placed as if it were tiny.
        return self._domains.place(model.name, max(model.memory_mb, 1)).base_domain_id

    async def _load(self, name: str) -> LoadedModel:
        model = self._config.model(name)
        if model is None:
            raise ModelUnavailableError(f"model {name} is not configured")
        await self._make_room(model)
        while True:
            started = time.monotonic()
            try:
                domain = self._place(model)
                try:
                    engine = await asyncio.to_thread(self._engine_factory, model_params(model, domain))
                except BaseException:
                    self._domains.release(name)
                    raise
                break
            except (InitError, NpuMemoryError) as exc:
                # The runtime's limits may be tighter than our budget (e.g. one NPU domain is full):
                # another idle model's memory is the only thing we can give back.
                victim = self._eviction_candidate()
                if victim is None:
                    raise ModelUnavailableError(str(exc)) from exc
                log.warning("loading %s failed, evicting %s and retrying: %s", name, victim, exc)
                await self._unload(victim)
        elapsed = time.monotonic() - started
        try:
            # We render every conversation ourselves; the runtime must not wrap it a second time.
            engine.set_chat_template("", "", "")
        except Exception:
            await asyncio.to_thread(engine.close)
            self._domains.release(name)
            raise
        self._metrics.model_load.labels(name).observe(elapsed)
        loaded = LoadedModel(model, engine, load_seconds=elapsed, loaded_at=time.time())
        self._loaded[name] = loaded
        log.info("loaded model %s in %.2f s", name, elapsed)
        return loaded
