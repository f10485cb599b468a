"""rkllm-bench reads each model's memory from the board's runtime perf stats, beside the catalog's."""

from __future__ import annotations

from server_harness import QWEN, model_entry, start_server

from rkllm_runtime.fleet_bench.analysis import analyse
from rkllm_runtime.fleet_bench.plan import Board, parse_plan
from rkllm_runtime.fleet_bench.report import ReportSettings, render_markdown
from rkllm_runtime.fleet_bench.runner import bench_board

__all__ = ["start_server"]

SMALL = "Small-Model"


def test_measured_memory_comes_from_the_runtime_not_the_catalog(start_server, make_model):
    # Only room for one model at a time: the second load evicts the first (its gauge drops to 0),
    # so each model's memory has to be read right after its own prompts.
    server = start_server(
        [
            model_entry(make_model, QWEN, memory_mb=1700, config={"memory_mb": 1700}),
            model_entry(make_model, SMALL, memory_mb=900, config={"memory_mb": 900}),
        ],
        npu_memory_budget_mb=2000,
    )
    board = Board("board1", server.url, 8192)
    run = bench_board(board, max_tokens=4, repeat=1, timeout=30)
    assert run.errors == ()
    assert run.memory_mb == {QWEN: 1700, SMALL: 900}
    plan = parse_plan({"boards": [{"name": "board1", "url": server.url, "ram_mb": 8192}],
                       "catalog": [{"name": QWEN, "memory_mb": 1659}]})
    text = render_markdown(plan, analyse(plan, [run], 0.8), [], [], ReportSettings(4, 1, 0.8))
    row = next(line for line in text.splitlines() if line.startswith(f"| board1 | {QWEN} |"))
    assert " | 1659 | 1700 | 8192 | " in row, "catalog and measured memory side by side"
