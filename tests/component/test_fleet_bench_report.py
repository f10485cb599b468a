"""rkllm-bench analysis and report from synthetic runs (no servers): thresholds, causes, tables, charts."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkllm_runtime.fleet_bench.analysis import analyse, likely_causes
from rkllm_runtime.fleet_bench.plan import Board, CatalogModel, PlanError, parse_plan
from rkllm_runtime.fleet_bench.prompts import PROMPTS
from rkllm_runtime.fleet_bench.report import CHARTS, ReportSettings, render_markdown, write_charts
from rkllm_runtime.fleet_bench.runner import BalancerSample, BoardRun, Sample

PLAN = parse_plan({
    "boards": [{"name": "board1", "url": "http://b1:8080/", "ram_mb": 8192},
               {"name": "board2", "url": "http://b2:8080", "ram_mb": 4096}],
    "balancer_url": "http://lb/",
    "catalog": [{"name": "Qwen2.5-1.5B-Instruct", "expected_tokens_per_second": 16.3, "memory_mb": 1659},
                {"name": "Phi-3-mini-4k-instruct", "expected_tokens_per_second": 7.5, "memory_mb": 3748}],
})


def run(board: Board, driver: str, speeds: dict[str, float]) -> BoardRun:
    samples = tuple(
        Sample(board.name, model, prompt.name, ttft_s=0.4 + i / 10, decode_tokens_per_second=rate + i / 10,
               generated_tokens=64, wall_s=5.0)
        for model, rate in speeds.items() for i, prompt in enumerate(PROMPTS)
    )
    return BoardRun(board, driver, samples, ())


def test_plan_normalises_urls_and_reads_sizes() -> None:
    assert PLAN.boards[0].url == "http://b1:8080" and PLAN.balancer_url == "http://lb"
    assert [m.size for m in PLAN.catalog] == ["1.5B", "3.8B"]
    assert PLAN.model("unknown") == CatalogModel("unknown")
    with pytest.raises(PlanError):
        parse_plan({"boards": [{"url": "http://x"}]})
    with pytest.raises(PlanError):
        parse_plan({"boards": []})


def test_boards_below_threshold_are_flagged_with_causes() -> None:
    runs = [run(PLAN.boards[0], "0.9.8", {"Qwen2.5-1.5B-Instruct": 16.0, "Phi-3-mini-4k-instruct": 5.8}),
            run(PLAN.boards[1], "0.9.6", {"Qwen2.5-1.5B-Instruct": 12.9})]
    results = {(r.board, r.model): r for r in analyse(PLAN, runs, threshold=0.8)}
    fast = results[("board1", "Qwen2.5-1.5B-Instruct")]
    assert not fast.slow and fast.decode_tokens_per_second == pytest.approx(16.1)
    assert fast.ttft_ms == pytest.approx(400)  # the 128-token prompt only, not the median of all prompts
    assert results[("board1", "Phi-3-mini-4k-instruct")].slow  # 5.9 < 0.8 * 7.5
    slow = results[("board2", "Qwen2.5-1.5B-Instruct")]  # 13.0 < 13.04
    assert slow.slow and slow.ratio == pytest.approx(13.0 / 16.3)
    assert "0.9.6" in slow.causes[0]
    assert not any(c.startswith("rknpu driver") for c in results[("board1", "Phi-3-mini-4k-instruct")].causes)


def test_unknown_expected_speed_is_never_flagged() -> None:
    results = analyse(PLAN, [run(PLAN.boards[0], "0.9.8", {"Custom-Model": 0.5})], threshold=0.8)
    assert [(r.model, r.slow, r.ratio) for r in results] == [("Custom-Model", False, None)]


def test_likely_causes_cover_the_known_pitfalls() -> None:
    text = " ".join(likely_causes(None)).lower()
    for pitfall in ("pinned", "ddr", "32-bit", "throttling"):
        assert pitfall in text
    assert likely_causes("0.9.7")[0].startswith("rknpu driver 0.9.7")
    assert not any(c.startswith("rknpu driver") for c in likely_causes("0.9.8"))


def test_report_has_every_section_and_charts_are_pngs(tmp_path: Path) -> None:
    runs = [run(PLAN.boards[0], "0.9.8", {"Qwen2.5-1.5B-Instruct": 16.0}),
            run(PLAN.boards[1], "0.9.6", {"Qwen2.5-1.5B-Instruct": 8.0})]
    results = analyse(PLAN, runs, threshold=0.8)
    through = [BalancerSample("Qwen2.5-1.5B-Instruct", "short-chat", 4.0, 64, 200),
               BalancerSample("Qwen2.5-1.5B-Instruct", "long-context", 0.1, 0, 503)]
    text = render_markdown(PLAN, results, through, ["board3: cannot list models"], ReportSettings(64, 1, 0.8))
    slow_section = text.split("## Boards below 80%")[1].split("##")[0]
    assert "**board2**" in slow_section and "board1" not in slow_section
    assert "| board1 | Qwen2.5-1.5B-Instruct | 3 | 400 | 16.1 | 16.3 | 99 | 1659 | - | 8192 | 0.9.8 |" in text
    assert "| Qwen2.5-1.5B-Instruct | short-chat | 200 | 4.00 | 64 | 16.0 |" in text
    assert "| 503 |" in text
    assert "| 1.5B | Qwen2.5-1.5B | 412 | 16.32 | 1659 | Qwen2.5-1.5B-Instruct | 400 | 16.1 |" in text
    assert "| 3.8B | Phi3-3.8B |" in text and "| 7B |" in text and "| 3B |" in text
    assert "- board3: cannot list models" in text
    paths = write_charts(results, tmp_path)
    assert sorted(p.name for p in paths) == sorted(CHARTS)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
