"""Turns samples into per board/model results, compares them with the catalog's expected speed and
names the likely causes of a slow board."""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import median

from rkllm_runtime.fleet_bench.plan import BenchPlan
from rkllm_runtime.fleet_bench.prompts import PROMPTS
from rkllm_runtime.fleet_bench.runner import BoardRun

RECOMMENDED_DRIVER = (0, 9, 8)


@dataclass(frozen=True)
class Published:
    reference: str
    ttft_ms: float
    tokens_per_second: float
    memory_mb: float | None
    source: str


# Published RK3588 w8a8 figures (rknn-llm benchmark.md, max clocks, 128-token prompt, 64 new tokens)
# for the speed table's size slots; sizes without an LLM row use the closest published proxy.
PUBLISHED: dict[str, Published] = {
    "1.5B": Published("Qwen2.5-1.5B", 412.27, 16.32, 1659.15, "benchmark.md 1.2.3"),
    "3B": Published("Qwen2.5-VL-3B, LLM part", 1120.0, 8.66, None,
                    "1.2.3 multimodal table (prefill of 196 tokens); no 3B LLM row"),
    "3.8B": Published("Phi3-3.8B", 1022.00, 7.50, 3747.73, "benchmark.md 1.2.3"),
    "7B": Published("llama3-8B", 1128.0, 3.79, 9431.0, "1.2.0 README (older method: 64-token prompt)"),
}

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class Result:
    board: str
    model: str
    samples: int
    ttft_ms: float
    decode_tokens_per_second: float
    expected_tokens_per_second: float | None
    memory_mb: int | None  # the catalog's figure
    measured_memory_mb: float | None  # the runtime's perf stats on this board
    board_ram_mb: int | None
    driver: str | None
    causes: tuple[str, ...]

    @property
    def ratio(self) -> float | None:
        if not self.expected_tokens_per_second:
            return None
        return self.decode_tokens_per_second / self.expected_tokens_per_second

    @property
    def slow(self) -> bool:
        return bool(self.causes)


def driver_older_than_recommended(driver: str | None) -> bool:
    match = _VERSION.search(driver or "")
    return match is not None and tuple(int(part) for part in match.groups()) < RECOMMENDED_DRIVER


def likely_causes(driver: str | None) -> tuple[str, ...]:
    """Most specific first: an old driver is known from the board's own metrics; the rest are the
    usual reasons an RK3588 runs below the published figures."""
    causes = []
    if driver_older_than_recommended(driver):
        causes.append(f"rknpu driver {driver} is older than 0.9.8, the driver RKLLM 1.2.3 is released with "
                      "(it comes with the vendor kernel)")
    causes += [
        "NPU/CPU clocks not pinned: the published figures use fix_freq_rk3588.sh "
        "(set rknpu_driver_pin_frequencies: true)",
        "DDR DVFS: the dmc devfreq governor lowers the memory clock and decode is memory-bandwidth bound "
        "(the pin unit sets dmc to 2112 MHz)",
        "32-bit memory bus: some RK3588 boards and RAM configurations have half the memory bandwidth",
        "the NPU shared with another model or process, or thermal throttling (check rknpu_load_percent "
        "and the SoC temperature during the run)",
    ]
    return tuple(causes)


def analyse(plan: BenchPlan, runs: list[BoardRun], threshold: float) -> list[Result]:
    results = []
    for run in runs:
        for model in sorted({s.model for s in run.samples}):
            samples = [s for s in run.samples if s.model == model]
            # TTFT is compared with the published figures, so it comes from the 128-token prompt.
            comparable = [s for s in samples if s.prompt == PROMPTS[0].name] or samples
            entry = plan.model(model)
            tokens_per_second = median(s.decode_tokens_per_second for s in samples)
            expected = entry.expected_tokens_per_second
            slow = expected is not None and tokens_per_second < threshold * expected
            results.append(Result(
                board=run.board.name, model=model, samples=len(samples),
                ttft_ms=median(s.ttft_s for s in comparable) * 1000,
                decode_tokens_per_second=tokens_per_second, expected_tokens_per_second=expected,
                memory_mb=entry.memory_mb, measured_memory_mb=run.memory_mb.get(model),
                board_ram_mb=run.board.ram_mb, driver=run.driver,
                causes=likely_causes(run.driver) if slow else (),
            ))
    return results
