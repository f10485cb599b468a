"""rkllm-bench end to end against two real rkllm-server processes over the C double, one decoding
above the catalog's expected speed and one well below 80 % of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from local_servers import LocalServer, local_servers

from rkllm_runtime.fleet_bench.cli import main
from rkllm_runtime.fleet_bench.report import CHARTS

TINY = Path(__file__).resolve().parents[1] / "fakelib/models/tiny-flat.rkllm"
MODEL = "Qwen2.5-1.5B-Instruct"


@pytest.fixture
def boards(double_library_path: Path, tmp_path: Path):
    fast = LocalServer(double_library_path, {MODEL: TINY}, tmp_path,
                       env={"RKLLM_DOUBLE_TPS": "40", "RKLLM_DOUBLE_PREFILL_MS": "1"})
    slow = LocalServer(double_library_path, {MODEL: TINY}, tmp_path,
                       env={"RKLLM_DOUBLE_TPS": "16", "RKLLM_DOUBLE_PREFILL_MS": "1"})
    with local_servers([fast, slow]) as servers:
        yield servers


def test_report_flags_the_board_below_80_percent(boards: list[LocalServer], tmp_path: Path) -> None:
    fast, slow = boards
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "boards": [{"name": "board1", "url": fast.url, "ram_mb": 8192},
                   {"name": "board2", "url": slow.url, "ram_mb": 4096}],
        # No nginx here: board1's OpenAI endpoint stands in for the balancer's.
        "balancer_url": fast.url,
        "catalog": [{"name": MODEL, "expected_tokens_per_second": 36.0, "memory_mb": 1659}],
    }))
    out = tmp_path / "report"
    assert main(["--plan", str(plan), "--out", str(out), "--max-tokens", "16"]) == 2
    report = (out / "report.md").read_text()
    slow_section = report.split("## Boards below 80%")[1].split("\n## ")[0]
    assert f"**board2** running **{MODEL}**" in slow_section
    assert "board1" not in slow_section
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in report.splitlines()
            if line.startswith(("| board1 |", "| board2 |"))}
    # decode tokens/s from the runtime's perf stats
    assert 0.8 * 36 <= float(rows["board1"][4]) <= 46
    assert 12 <= float(rows["board2"][4]) <= 19
    balancer_rows = [line for line in report.splitlines() if line.startswith(f"| {MODEL} |")]
    assert len(balancer_rows) == 3 and all(" | 200 | " in row and " | 16 | " in row for row in balancer_rows)
    for chart in CHARTS:
        assert (out / chart).read_bytes()[:4] == b"\x89PNG"


def test_unreachable_board_is_reported_not_fatal(boards: list[LocalServer], tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({
        "boards": [{"name": "board1", "url": boards[0].url}, {"name": "gone", "url": "http://127.0.0.1:9"}],
        "catalog": [{"name": MODEL}],
    }))
    out = tmp_path / "report"
    assert main(["--plan", str(plan), "--out", str(out), "--max-tokens", "4"]) == 0
    report = (out / "report.md").read_text()
    assert "- gone: cannot list models" in report
    assert "| board1 | " in report
