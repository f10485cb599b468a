"""Where several models live on one board: base_domain_id policy and the memory budget.

One process, one rkllm handle per model and KV slot (each handle loads the weights, so a model
with kv_slots = 2 places and counts memory_mb twice). librkllmrt supports several instances in one process
since 1.2.2 ("multi-instance inference"; before that two handles produced garbage, rknn-llm #367),
and one process keeps a single scheduler, one HTTP port and one metrics view, with no IPC on the
token path. A process per model (rkllama's answer to the pre-1.2.2 bug) is not needed with 1.2.3.

Policy: the NPU addresses memory with 32-bit IOVAs, so each IOMMU domain holds about 4 GB.
base_domain_id picks the domain a model's NPU memory starts in; a second model whose memory does
not fit in what is left of that domain fails init with "failed to malloc npu memory" (#437,
maintainer: give the instances domains 0 and 1). Models therefore fill domain 0 until its budget is
spent, then domain 1, and so on (first fit, lowest domain first). Independently the board's RAM
budget bounds the sum of all loaded models; it is checked before rkllm_init so a model that cannot
fit is refused with the numbers instead of an opaque runtime failure or the OOM killer.
"""

from __future__ import annotations

from dataclasses import dataclass

from rkllm_runtime.errors import RkllmError

DOMAIN_CAPACITY_MB = 4096


class NpuMemoryError(RkllmError):
    """A model does not fit in the memory budget or in any NPU memory domain."""


@dataclass(frozen=True)
class Placement:
    model: str
    memory_mb: float
    base_domain_id: int


class NpuMemoryPlanner:
    """Tracks loaded models and decides each new model's base_domain_id."""

    def __init__(
        self, budget_mb: float, domain_capacity_mb: float = DOMAIN_CAPACITY_MB, domain_count: int = 8
    ) -> None:
        if budget_mb <= 0 or domain_capacity_mb <= 0 or domain_count < 1:
            raise ValueError("budget_mb, domain_capacity_mb and domain_count must be positive")
        self.budget_mb = budget_mb
        self.domain_capacity_mb = domain_capacity_mb
        self.domain_count = domain_count
        self._placements: dict[str, Placement] = {}

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(self._placements.values())

    def used_mb(self) -> float:
        return sum(placement.memory_mb for placement in self._placements.values())

    def domain_used_mb(self, domain: int) -> float:
        return sum(p.memory_mb for p in self._placements.values() if p.base_domain_id == domain)

    def place(self, model: str, memory_mb: float) -> Placement:
        """Reserve memory for model and choose its domain; raises NpuMemoryError with the numbers."""
        if model in self._placements:
            raise ValueError(f"model {model} is already placed")
        if memory_mb <= 0:
            raise ValueError(f"model {model}: memory_mb must be positive, got {memory_mb}")
        used = self.used_mb()
        if used + memory_mb > self.budget_mb:
            loaded = ", ".join(f"{p.model} {p.memory_mb:g} MB" for p in self._placements.values()) or "none"
            raise NpuMemoryError(
                f"model {model} needs {memory_mb:g} MB but only {self.budget_mb - used:g} of the "
                f"{self.budget_mb:g} MB budget is free (loaded: {loaded}); unload a model first"
            )
        if memory_mb > self.domain_capacity_mb:
            raise NpuMemoryError(
                f"model {model} needs {memory_mb:g} MB, more than one NPU memory domain holds "
                f"({self.domain_capacity_mb:g} MB)"
            )
        for domain in range(self.domain_count):
            if self.domain_used_mb(domain) + memory_mb <= self.domain_capacity_mb:
                placement = Placement(model, memory_mb, domain)
                self._placements[model] = placement
                return placement
        raise NpuMemoryError(
            f"model {model} needs {memory_mb:g} MB and none of the {self.domain_count} NPU memory "
            f"domains ({self.domain_capacity_mb:g} MB each) has that much left"
        )

    def release(self, model: str) -> None:
        self._placements.pop(model, None)
