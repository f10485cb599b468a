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
from rkllm_runtime.metrics import Metrics, SlotState
from rkllm_runtime.npu_memory import NpuMemoryError, NpuMemoryPlanner

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelParams], Engine]


class ModelUnavailableError(Exception):
    """The model cannot be loaded now (init failed, or the NPU budget is held by busy models)."""


@dataclass
class KvSlot:
    """One rkllm handle of a model and the conversation its KV cache holds."""

    index: int
    engine: Engine
    # Exact text held in the handle's KV cache; "" means unknown or empty: clear before the next run.
    kv_text: str = ""
    tools_json: str = ""
    poisoned: bool = False
    running: bool = False
    last_used: float = 0.0  # time.monotonic() when its last run ended
    # Its cache holds a later turn of a conversation (a continued cache, or a prompt with earlier
    # replies), not a single request's: kept longer (rkllm_runtime/slot_policy.py).
    conversation: bool = False

    @property
    def state(self) -> SlotState:
        return "running" if self.running else "holding" if self.kv_text else "empty"


@dataclass
class LoadedModel:
    config: ModelConfig
    slots: list[KvSlot]
    load_seconds: float
    loaded_at: float

    @property
    def poisoned(self) -> bool:
        return any(slot.poisoned for slot in self.slots)


def slot_key(model: str, index: int) -> str:
    """The slot's name in the NPU memory planner: every slot's handle holds its own weights."""
    return f"{model}[{index}]"


def footprint_mb(model: ModelConfig) -> int:
    return model.memory_mb * model.kv_slots


def describe_footprint(model: ModelConfig) -> str:
    return f"{footprint_mb(model)} MB ({model.kv_slots} KV slots of {model.memory_mb} MB)"


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
        """The model's handles, loading them (and evicting idle unpinned models) if needed."""
        existing = self._loaded.get(name)
        if existing is None:
            async with self._load_lock:
                existing = self._loaded.get(name) or await self._load(name)
        self._loaded.move_to_end(name)
        return existing

    async def reload_slot(self, name: str, index: int) -> KvSlot:
        """Destroy one slot's handle and create a fresh one (a poisoned handle's cure); others keep theirs."""
        async with self._load_lock:
            model = self._loaded.get(name)
            if model is None:
                model = await self._load(name)
                return model.slots[index]
            model.slots[index].poisoned = True  # stays so if the fresh handle cannot be created
            await self._close_slot(name, model.slots[index])
            self._metrics.set_slot_state(name, index, None)
            slot = await self._open_slot(model.config, index)
            model.slots[index] = slot
            self._metrics.set_slot_state(name, index, slot.state)
            return slot

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
            for slot in model.slots:
                await self._close_slot(name, slot)
                self._metrics.set_slot_state(name, slot.index, None)
            self._metrics.model_memory.labels(name).set(0)
            log.info("unloaded model %s", name)

    async def _close_slot(self, name: str, slot: KvSlot) -> None:
        await asyncio.to_thread(slot.engine.close)
        self._domains.release(slot_key(name, slot.index))

    def _used_mb(self) -> int:
        return sum(footprint_mb(m.config) for m in self._loaded.values())

    def _eviction_candidate(self) -> str | None:
        return next((n for n, m in self._loaded.items() if not m.config.pinned and self._is_idle(n)), None)

    async def _make_room(self, model: ModelConfig) -> None:
        budget = self._config.npu_memory_budget_mb
        if budget and footprint_mb(model) > budget:
            raise ModelUnavailableError(
                f"model {model.name} needs {describe_footprint(model)}, more than the whole "
                f"{budget} MB NPU budget"
            )
        while budget and self._used_mb() + footprint_mb(model) > budget:
            victim = self._eviction_candidate()
            if victim is None:
                raise ModelUnavailableError(
                    f"model {model.name} needs {describe_footprint(model)} but only "
                    f"{budget - self._used_mb()} MB of the {budget} MB NPU budget are free and every "
                    "loaded model is pinned or busy"
                )
            log.info("evicting %s to make room for %s", victim, model.name)
            await self._unload(victim)

    def _place(self, model: ModelConfig, key: str) -> int:
        fixed = self._config.fixed_domain(model)
        if fixed is not None:
            return fixed
        # The planner needs a size; an unsized model is placed as if it were tiny.
        return self._domains.place(key, max(model.memory_mb, 1)).base_domain_id

    async def _load(self, name: str) -> LoadedModel:
        model = self._config.model(name)
        if model is None:
            raise ModelUnavailableError(f"model {name} is not configured")
        await self._make_room(model)
        started = time.monotonic()
        slots: list[KvSlot] = []
        try:
            for index in range(model.kv_slots):
                slots.append(await self._open_slot(model, index))
        except BaseException:
            for slot in slots:
                await self._close_slot(name, slot)
            raise
        elapsed = time.monotonic() - started
        self._metrics.model_load.labels(name).observe(elapsed)
        loaded = LoadedModel(model, slots, load_seconds=elapsed, loaded_at=time.time())
        self._loaded[name] = loaded
        for slot in slots:
            self._metrics.set_slot_state(name, slot.index, slot.state)
        log.info("loaded model %s (%d KV slots) in %.2f s", name, len(slots), elapsed)
        return loaded

    async def _open_slot(self, model: ModelConfig, index: int) -> KvSlot:
        """rkllm_init for one slot, evicting idle models while the runtime finds no room."""
        key = slot_key(model.name, index)
        while True:
            try:
                domain = self._place(model, key)
                try:
                    engine = await asyncio.to_thread(self._engine_factory, model_params(model, domain))
                except BaseException:
                    self._domains.release(key)
                    raise
                break
            except (InitError, NpuMemoryError) as exc:
                # The runtime's limits may be tighter than our budget (e.g. one NPU domain is full):
                # another idle model's memory is the only thing we can give back.
                victim = self._eviction_candidate()
                if victim is None or victim == model.name:
                    raise ModelUnavailableError(str(exc)) from exc
                log.warning("loading %s failed, evicting %s and retrying: %s", key, victim, exc)
                await self._unload(victim)
        try:
            # We render every conversation ourselves; the runtime must not wrap it a second time.
            engine.set_chat_template("", "", "")
        except Exception:
            await asyncio.to_thread(engine.close)
            self._domains.release(key)
            raise
        return KvSlot(index, engine)
