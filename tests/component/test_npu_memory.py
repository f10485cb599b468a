from __future__ import annotations

import pytest

from rkllm_runtime.npu_memory import NpuMemoryError, NpuMemoryPlanner


def test_models_fill_domain_zero_before_domain_one() -> None:
    planner = NpuMemoryPlanner(budget_mb=12000)
    assert planner.place("qwen-1.5b", 1659).base_domain_id == 0
    assert planner.place("qwen-0.5b", 654).base_domain_id == 0
    assert planner.place("phi3", 3748).base_domain_id == 1
    # Domain 0 still has 4096 - 2313 MB: a small model goes back there (first fit).
    assert planner.place("minicpm", 525).base_domain_id == 0
    assert planner.domain_used_mb(0) == pytest.approx(1659 + 654 + 525)


def test_released_domain_space_is_reused() -> None:
    planner = NpuMemoryPlanner(budget_mb=12000)
    planner.place("a", 3000)
    planner.place("b", 3000)
    planner.release("a")
    assert planner.place("c", 3500).base_domain_id == 0


def test_budget_refusal_names_the_numbers() -> None:
    planner = NpuMemoryPlanner(budget_mb=5000)
    planner.place("qwen-1.5b", 1659)
    with pytest.raises(NpuMemoryError) as refused:
        planner.place("phi3", 3748)
    message = str(refused.value)
    assert "phi3 needs 3748 MB" in message
    assert "3341 of the 5000 MB budget" in message
    assert "qwen-1.5b 1659 MB" in message
    assert [p.model for p in planner.placements] == ["qwen-1.5b"]


def test_model_larger_than_a_domain_is_refused() -> None:
    planner = NpuMemoryPlanner(budget_mb=16000)
    with pytest.raises(NpuMemoryError, match="5976 MB, more than one NPU memory domain holds \\(4096 MB\\)"):
        planner.place("chatglm3-6b", 5976)


def test_all_domains_full_is_refused() -> None:
    planner = NpuMemoryPlanner(budget_mb=16000, domain_count=2)
    planner.place("a", 3000)
    planner.place("b", 3000)
    with pytest.raises(NpuMemoryError, match="none of the 2 NPU memory domains"):
        planner.place("c", 2000)
