"""`rkllm-bench --plan plan.json --out DIR`: benchmark every board and model, then the balancer,
and write DIR/report.md with PNG charts. Exit status 2 when a board is below the threshold
(so automation notices), 1 on a plan error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rkllm_runtime.fleet_bench.analysis import analyse
from rkllm_runtime.fleet_bench.plan import PlanError, load_plan
from rkllm_runtime.fleet_bench.report import ReportSettings, render_markdown, write_charts
from rkllm_runtime.fleet_bench.runner import run_plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkllm-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", type=Path, required=True, help="JSON file: boards, balancer_url, catalog")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.md and the charts")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per prompt (default 1)")
    parser.add_argument("--threshold", type=float, default=0.8,
                        help="flag boards below this fraction of the catalog's expected tokens/s")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--title", default="RKLLM fleet benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        plan = load_plan(args.plan)
    except (OSError, ValueError, PlanError) as exc:
        print(f"rkllm-bench: {exc}", file=sys.stderr)
        return 1
    runs, through = run_plan(plan, args.max_tokens, args.repeat, args.timeout)
    results = analyse(plan, runs, args.threshold)
    errors = [e for run in runs for e in run.errors]
    settings = ReportSettings(args.max_tokens, args.repeat, args.threshold, args.title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(render_markdown(plan, results, through, errors, settings),
                                        encoding="utf-8")
    write_charts(results, args.out)
    for result in results:
        verdict = "SLOW" if result.slow else "ok"
        print(f"{result.board:<16} {result.model:<32} {result.decode_tokens_per_second:7.1f} tok/s "
              f"ttft {result.ttft_ms:7.0f} ms  {verdict}")
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"report: {args.out / 'report.md'}")
    return 2 if any(r.slow for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
