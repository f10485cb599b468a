"""Markdown report and PNG charts. matplotlib is a controller-only dependency (requirements/dev.txt),
so it is imported inside the chart function, never on a board."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rkllm_runtime.fleet_bench.analysis import PUBLISHED, Result
from rkllm_runtime.fleet_bench.plan import BenchPlan
from rkllm_runtime.fleet_bench.prompts import PROMPTS
from rkllm_runtime.fleet_bench.runner import BalancerSample

CHARTS = ("tokens_per_second.png", "ttft.png", "memory.png")


@dataclass(frozen=True)
class ReportSettings:
    max_tokens: int
    repeat: int
    threshold: float
    title: str = "RKLLM fleet benchmark"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _slow_section(results: list[Result], threshold: float) -> list[str]:
    lines = [f"## Boards below {threshold:.0%} of the catalog's expected speed", ""]
    slow = [r for r in results if r.slow]
    if not slow:
        return [*lines, "None.", ""]
    for r in slow:
        lines.append(f"- **{r.board}** running **{r.model}**: {r.decode_tokens_per_second:.1f} tokens/s, "
                     f"expected {r.expected_tokens_per_second:.1f} ({_fmt((r.ratio or 0) * 100, 0)} %). "
                     "Likely causes:")
        lines += [f"  - {cause}" for cause in r.causes]
    return [*lines, ""]


def _results_table(results: list[Result]) -> list[str]:
    lines = [
        "## Per board and model (runtime perf stats)", "",
        "| board | model | runs | TTFT ms (128-token prompt) | decode tokens/s | expected tokens/s "
        "| % of expected | model memory MB (catalog) | measured memory MB | board RAM MB | rknpu driver |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.board} | {r.model} | {r.samples} | {r.ttft_ms:.0f} | {r.decode_tokens_per_second:.1f} | "
            f"{_fmt(r.expected_tokens_per_second)} | {_fmt(r.ratio * 100 if r.ratio else None, 0)} | "
            f"{r.memory_mb or '-'} | {_fmt(r.measured_memory_mb, 0)} | {r.board_ram_mb or '-'} | "
            f"{r.driver or '-'} |"
        )
    return [*lines, ""]


def _balancer_table(through: list[BalancerSample], url: str | None) -> list[str]:
    if not url:
        return ["## Through the balancer", "", "No balancer in the plan.", ""]
    lines = [
        f"## Through the balancer ({url}, OpenAI chat completions, wall time seen by the client)", "",
        "| model | prompt | HTTP status | wall s | completion tokens | tokens/s (wall) |",
        "|---|---|---|---|---|---|",
    ]
    for s in through:
        rate = s.completion_tokens / s.wall_s if s.wall_s > 0 and s.completion_tokens else None
        lines.append(f"| {s.model} | {s.prompt} | {s.status or 'no answer'} | {s.wall_s:.2f} | "
                     f"{s.completion_tokens} | {_fmt(rate)} |")
    return [*lines, ""]


def _published_table(plan: BenchPlan, results: list[Result]) -> list[str]:
    lines = [
        "## Published figures beside measured ones, by model size", "",
        "Published: RK3588, w8a8, clocks pinned. Quality is not measured by this benchmark.", "",
        "| size | published reference | published TTFT ms | published tokens/s | published memory MB "
        "| measured model | measured TTFT ms | measured tokens/s | quality | source |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, pub in PUBLISHED.items():
        measured = [r for r in results if plan.model(r.model).size == size]
        names = ", ".join(sorted({r.model for r in measured})) or "not in this fleet"
        ttft = min((r.ttft_ms for r in measured), default=None)
        rate = max((r.decode_tokens_per_second for r in measured), default=None)
        lines.append(f"| {size} | {pub.reference} | {pub.ttft_ms:.0f} | {pub.tokens_per_second:.2f} | "
                     f"{_fmt(pub.memory_mb, 0)} | {names} | {_fmt(ttft, 0)} | {_fmt(rate)} | not measured | "
                     f"{pub.source} |")
    return [*lines, "", "Measured: best board for that size.", ""]


def render_markdown(plan: BenchPlan, results: list[Result], through: list[BalancerSample],
                    errors: list[str], settings: ReportSettings, generated: datetime | None = None) -> str:
    when = (generated or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    prompts = ", ".join(f"`{p.name}`" for p in PROMPTS)
    lines = [
        f"# {settings.title}", "",
        f"Generated {when}. Boards: {len(plan.boards)}. Prompts: {prompts}; "
        f"{settings.max_tokens} new tokens each, {settings.repeat} run(s) per prompt. "
        "TTFT and decode speed are the runtime's own perf stats (prefill time, generated tokens / "
        "generate time); medians over the runs.", "",
        *_slow_section(results, settings.threshold),
        *_results_table(results),
        *_balancer_table(through, plan.balancer_url),
        *_published_table(plan, results),
        "## Charts", "",
        *[f"![{name[:-4]}]({name})" for name in CHARTS], "",
    ]
    if errors:
        lines += ["## Errors", "", *[f"- {e}" for e in errors], ""]
    return "\n".join(lines)


def _room_for_legend(ax: Any) -> None:
    """Headroom above the bars so the legend never hides a marker."""
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(loc="upper right", ncol=2)


def write_charts(results: list[Result], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.board}\n{r.model}" for r in results]
    positions = list(range(len(results)))
    paths = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    colors = ["tab:red" if r.slow else "tab:blue" for r in results]
    ax.bar(positions, [r.decode_tokens_per_second for r in results], color=colors, label="measured")
    ax.scatter(positions, [r.expected_tokens_per_second or float("nan") for r in results], color="black",
               marker="_", s=600, label="catalog expected", zorder=3)
    ax.set(ylabel="decode tokens/s", title="Decode speed per board and model (red: below threshold)")
    ax.set_xticks(positions, labels, fontsize=8)
    _room_for_legend(ax)
    fig.tight_layout()
    save(fig, CHARTS[0])

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    ax.bar(positions, [r.ttft_ms for r in results], color="tab:green")
    ax.set(ylabel="ms", title="Time to first token (128-token prompt)")
    ax.set_xticks(positions, labels, fontsize=8)
    fig.tight_layout()
    save(fig, CHARTS[1])

    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4.5))
    ax.bar(positions, [r.memory_mb or 0 for r in results], color="tab:purple", label="model memory (catalog)")
    ax.scatter(positions, [r.measured_memory_mb or float("nan") for r in results], color="tab:orange",
               marker="x", s=80, label="measured (runtime perf stats)", zorder=3)
    ax.scatter(positions, [r.board_ram_mb or float("nan") for r in results], color="black", marker="_", s=600,
               label="board RAM", zorder=3)
    ax.set(ylabel="MB", title="Model memory against board RAM")
    ax.set_xticks(positions, labels, fontsize=8)
    _room_for_legend(ax)
    fig.tight_layout()
    save(fig, CHARTS[2])
    return paths
