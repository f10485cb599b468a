"""Runs the prompt set. Speeds come from the runtime's own perf stats, which the server returns as
Ollama-style durations (prompt_eval_duration = prefill, eval_count / eval_duration = decode);
the balancer pass measures what a client sees through nginx (wall time)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from rkllm_runtime.fleet_bench.plan import BenchPlan, Board
from rkllm_runtime.fleet_bench.prompts import PROMPTS, BenchPrompt

NS = 1e9
_DRIVER = re.compile(r'^rkllm_build_info\{[^}]*driver="([^"]*)"', re.MULTILINE)
_MEMORY = re.compile(r'^rkllm_model_memory_bytes\{model="((?:[^"\\]|\\.)*)"\} (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class Sample:
    """One prompt on one board and model, from the runtime's perf stats."""

    board: str
    model: str
    prompt: str
    ttft_s: float
    decode_tokens_per_second: float
    generated_tokens: int
    wall_s: float


@dataclass(frozen=True)
class BalancerSample:
    model: str
    prompt: str
    wall_s: float
    completion_tokens: int
    status: int


@dataclass(frozen=True)
class BoardRun:
    board: Board
    driver: str | None
    samples: tuple[Sample, ...]
    errors: tuple[str, ...]
    # MB per model as the runtime's perf stats reported it after the model's prompts ran.
    memory_mb: Mapping[str, float] = field(default_factory=dict)


def _served_models(client: httpx.Client, board: Board) -> list[str]:
    response = client.get(f"{board.url}/api/tags")
    response.raise_for_status()
    return [m["name"] for m in response.json()["models"]]


def _driver(client: httpx.Client, board: Board) -> str | None:
    try:
        match = _DRIVER.search(client.get(f"{board.url}/metrics").text)
    except httpx.HTTPError:
        return None
    return match.group(1) if match and match.group(1) != "unknown" else None


def _measured_memory_mb(client: httpx.Client, board: Board, model: str) -> float | None:
    """The model's memory from the board's /metrics (the runtime's perf stats); None if not reported."""
    try:
        text = client.get(f"{board.url}/metrics").text
    except httpx.HTTPError:
        return None
    for name, value in _MEMORY.findall(text):
        if name == model and float(value) > 0:
            return float(value) / 1048576
    return None


def _measure(client: httpx.Client, board: Board, model: str, prompt: BenchPrompt, max_tokens: int) -> Sample:
    started = time.monotonic()
    response = client.post(f"{board.url}/api/generate", json={
        "model": model, "prompt": prompt.text, "stream": False, "options": {"num_predict": max_tokens},
    })
    wall = time.monotonic() - started
    response.raise_for_status()
    body = response.json()
    eval_seconds = body["eval_duration"] / NS
    return Sample(
        board=board.name, model=model, prompt=prompt.name,
        ttft_s=body["prompt_eval_duration"] / NS,
        decode_tokens_per_second=body["eval_count"] / eval_seconds if eval_seconds > 0 else 0.0,
        generated_tokens=body["eval_count"], wall_s=wall,
    )


def bench_board(board: Board, max_tokens: int, repeat: int, timeout: float) -> BoardRun:
    samples: list[Sample] = []
    errors: list[str] = []
    with httpx.Client(timeout=timeout) as client:
        try:
            models = _served_models(client, board)
        except httpx.HTTPError as exc:
            return BoardRun(board, None, (), (f"{board.name}: cannot list models: {exc}",))
        driver = _driver(client, board)
        memory: dict[str, float] = {}
        for model in models:
            for prompt in PROMPTS:
                for _ in range(repeat):
                    try:
                        samples.append(_measure(client, board, model, prompt, max_tokens))
                    except (httpx.HTTPError, KeyError, ValueError) as exc:
                        errors.append(f"{board.name} {model} {prompt.name}: {exc}")
            # Read now: loading the next model may evict this one (its memory then reads 0).
            measured = _measured_memory_mb(client, board, model)
            if measured is not None:
                memory[model] = measured
    return BoardRun(board, driver, tuple(samples), tuple(errors), memory)


def bench_balancer(url: str, api_key: str | None, models: list[str], max_tokens: int,
                   timeout: float) -> list[BalancerSample]:
    results: list[BalancerSample] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for model in models:
            for prompt in PROMPTS:
                started = time.monotonic()
                try:
                    response = client.post(f"{url}/v1/chat/completions", json={
                        "model": model, "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompt.text}],
                    })
                except httpx.HTTPError:
                    results.append(BalancerSample(model, prompt.name, time.monotonic() - started, 0, 0))
                    continue
                usage = response.json().get("usage", {}) if response.status_code == 200 else {}
                results.append(BalancerSample(model, prompt.name, time.monotonic() - started,
                                              int(usage.get("completion_tokens", 0)), response.status_code))
    return results


def run_plan(plan: BenchPlan, max_tokens: int, repeat: int, timeout: float) -> tuple[
    list[BoardRun], list[BalancerSample]
]:
    """Boards in parallel (each has its own NPU), prompts on one board one after another."""
    with ThreadPoolExecutor(max_workers=min(8, len(plan.boards))) as pool:
        runs = list(pool.map(lambda b: bench_board(b, max_tokens, repeat, timeout), plan.boards))
    served = sorted({s.model for run in runs for s in run.samples})
    through = (bench_balancer(plan.balancer_url, plan.balancer_api_key, served, max_tokens, timeout)
               if plan.balancer_url else [])
    return runs, through
