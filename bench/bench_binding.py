"""Binding overhead: tokens/s from the runtime callback to an asyncio consumer, double flat out.

Usage: python -m bench.bench_binding [--tokens 20000] [--runs 3] [--library build/host/librkllmrt.so]
Prints a Markdown table. The double decodes with no delay (RKLLM_DOUBLE_TPS=0), so the numbers are
the cost of ctypes callback + UTF-8 decoding + thread-to-loop hand-off + async iteration per token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from rkllm_runtime.engine import Engine, FinishEvent, GenerationRequest, ModelParams
from rkllm_runtime.library import load_library
from tests.support import REPO_ROOT

MODEL = """format = rkllm-double/1
name = bench-flat
toolkit_version = 1.2.3
target_platform = rk3588
max_context = 16384
memory_mb = 512
decode_tokens_per_second = 0
prefill_ms_per_token = 0
reply_tokens = {tokens}
vocab = Hello|,| world| é| 世界| 🙂| NPU| fleet| token| board| rock| chip
split_utf8_every = {split}
"""


async def one_run(engine: Engine, prompt: str) -> tuple[int, int, float, FinishEvent]:
    events = 0
    chars = 0
    start = time.perf_counter()
    finish: FinishEvent | None = None
    async for event in engine.generate(GenerationRequest(prompt=prompt)):
        if isinstance(event, FinishEvent):
            finish = event
        else:
            events += 1
            chars += len(event.text)
    assert finish is not None
    return events, chars, time.perf_counter() - start, finish


def measure(library_path: Path, tokens: int, runs: int, split: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        model = Path(directory) / "bench-flat.rkllm"
        model.write_text(MODEL.format(tokens=tokens, split=split))
        engine = Engine(load_library(library_path), ModelParams(str(model), max_context_len=16384,
                                                                max_new_tokens=tokens))
        try:
            rates = []
            for run in range(runs + 1):
                _, _, seconds, finish = asyncio.run(one_run(engine, f"benchmark prompt {run}"))
                if run:  # the first run warms up imports and the worker thread
                    rates.append(finish.perf.generate_tokens / seconds)
        finally:
            engine.close()
    median = statistics.median(rates)
    return {"median": median, "min": min(rates), "max": max(rates), "us_per_token": 1e6 / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "build" / "host" / "librkllmrt.so")
    args = parser.parse_args()
    os.environ["RKLLM_DOUBLE_TPS"] = "0"
    os.environ["RKLLM_DOUBLE_PREFILL_MS"] = "0"
    print(f"binding per-token cost, double flat out, {args.tokens} tokens/run, median of {args.runs} runs\n")
    print("| case | tokens/s (median) | min-max | µs/token |")
    print("|---|---|---|---|")
    for label, split in (("plain tokens", 0), ("every 10th multibyte token split (WAITING+NORMAL)", 10)):
        result = measure(args.library, args.tokens, args.runs, split)
        print(
            f"| {label} | {result['median']:,.0f} | {result['min']:,.0f}-{result['max']:,.0f} "
            f"| {result['us_per_token']:.1f} |"
        )


if __name__ == "__main__":
    main()
