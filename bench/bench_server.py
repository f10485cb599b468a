"""Server benchmarks over the C double: prints a Markdown table.

Usage: python -m bench.bench_server [--library build/host/librkllmrt.so] [--tokens 10000] [--quick]

Each server runs as its own process (`python -m rkllm_runtime --config ...`), as on a board; the
client is this process (httpx), which shares the machine's cores with it.
  1. streaming throughput of one SSE stream, double flat out, beside the same run straight on the
     binding in-process (no HTTP);
  2. time to first token added by HTTP over a direct in-process Engine call (1-token runs);
  3. server RSS idle with one model handle open, the double's own mappings excluded;
  4. multi-turn TTFT, turn 1 vs turn 10, double at Qwen2.5-1.5B speed, with and without KV reuse;
  5. 8 concurrent clients on one handle: all answered, none mixed, no concurrent run in the double's log;
  6. two conversations taking turns on one board at Qwen2.5-1.5B speed, kv_slots 1 vs 2: TTFT of
     turn N over turn 1 and the share of prompt tokens served from the KV cache (server metrics).

--conversations-only runs section 6 alone.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from rkllm_runtime.engine import Engine, GenerationRequest, ModelParams, TokenEvent
from rkllm_runtime.library import load_library
from tests.support import REPO_ROOT, free_port

MODEL = "bench"
VOCAB = "Hello|,| world| é| 世界| 🙂| NPU| fleet| token| board| rock| chip"


def write_model(directory: Path, name: str, **fields: object) -> Path:
    settings = {
        "format": "rkllm-double/1",
        "name": name,
        "toolkit_version": "1.2.3",
        "target_platform": "rk3588",
        "max_context": 16384,
        "memory_mb": 512,
        "decode_tokens_per_second": 0,
        "prefill_ms_per_token": 0,
        "reply_tokens": 16,
        "vocab": VOCAB,
        "split_utf8_every": 10,
    }
    settings.update(fields)
    path = directory / f"{name}.rkllm"
    path.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    return path


@contextmanager
def server(
    library: Path, model: Path, directory: Path, **model_settings: object
) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = directory / f"server-{port}.toml"
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in model_settings.items())
    config.write_text(
        f'library = "{library}"\nport = {port}\n[[models]]\nname = "{MODEL}"\npath = "{model}"\n'
        f"context_length = 16384\nmax_new_tokens = 100000\npinned = true\n{extra}"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "rkllm_runtime", "--config", str(config), "--log-level", "warning"],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


def chat_body(messages: list[dict[str, str]], max_tokens: int | None = None) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "messages": messages, "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def stream_chat(http: httpx.Client, body: dict[str, object]) -> tuple[float, float, str]:
    """(seconds to first content token, seconds to end, text)."""
    started = time.perf_counter()
    first = 0.0
    parts = []
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            content = choices[0]["delta"].get("content") if choices else None
            if content:
                first = first or time.perf_counter() - started
                parts.append(content)
    return first, time.perf_counter() - started, "".join(parts)


def count_stream_tokens(http: httpx.Client, body: dict[str, object]) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for chunk in response.iter_bytes():
            tokens += chunk.count(b'"delta":{"content"')
    return tokens, time.perf_counter() - started


def direct_runs(library: Path, model: Path, tokens: int, repeats: int) -> tuple[float, list[float]]:
    """Binding only: tokens/s of one flat-out run, and first-token latencies of 1-token runs."""
    engine = Engine(
        load_library(library), ModelParams(str(model), max_context_len=16384, max_new_tokens=100000)
    )

    async def run(prompt: str, limit: int | None) -> tuple[int, float, float]:
        started = time.perf_counter()
        first, count = 0.0, 0
        async for event in engine.generate(GenerationRequest(prompt=prompt, max_tokens=limit)):
            if isinstance(event, TokenEvent):
                first = first or time.perf_counter() - started
                count += 1
        return count, first, time.perf_counter() - started

    try:
        asyncio.run(run("warm up", 10))
        count, _, seconds = asyncio.run(run("throughput", tokens))
        firsts = [asyncio.run(run(f"ttft {i}", 1))[1] for i in range(repeats)]
    finally:
        engine.close()
    return count / seconds, firsts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rss_without_double(pid: int, library: Path) -> tuple[float, float]:
    """(VmRSS MiB, the double's own resident mappings MiB) of a process."""
    total = int(
        next(
            row for row in Path(f"/proc/{pid}/status").read_text().splitlines() if row.startswith("VmRSS")
        ).split()[1]
    )
    double_kb, in_double = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            in_double = fields[-1] == str(library.resolve())
        elif in_double and fields[0] == "Rss:":
            double_kb += int(fields[1])
    return total / 1024, double_kb / 1024


def multi_turn(library: Path, model: Path, directory: Path, reuse: bool, turns: int) -> list[float]:
    firsts = []
    with (
        server(library, model, directory, kv_cache_reuse=reuse) as (url, _),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        messages = [{"role": "system", "content": "You are a helpful assistant on an RK3588 board."}]
        for turn in range(turns):
            messages.append(
                {"role": "user", "content": f"Question {turn}: what does the NPU of this board do?"}
            )
            first, _, text = stream_chat(http, chat_body(messages, max_tokens=8))
            firsts.append(first)
            messages.append({"role": "assistant", "content": text})
    return firsts


def interleaved_conversations(
    library: Path, model: Path, directory: Path, slots: int, turns: int
) -> tuple[list[list[float]], float, float]:
    """TTFT of every turn of two conversations taking turns, the cache share and the slot evictions."""
    with (
        server(library, model, directory, kv_slots=slots) as (url, _),
        httpx.Client(base_url=url, timeout=120) as http,
    ):
        system = {"role": "system", "content": "You are a helpful assistant on an RK3588 board."}
        conversations: list[list[dict[str, str]]] = [[system], [system]]
        firsts: list[list[float]] = [[], []]
        for turn in range(turns):
            for index, messages in enumerate(conversations):
                question = f"Conversation {index}, question {turn}: what does the NPU do?"
                messages.append({"role": "user", "content": question})
                first, _, text = stream_chat(http, chat_body(messages, max_tokens=8))
                firsts[index].append(first)
                messages.append({"role": "assistant", "content": text})
        totals = {
            sample.name: sample.value
            for family in text_string_to_metric_families(http.get("/metrics").text)
            for sample in family.samples
            if sample.labels.get("model") == MODEL
        }
    cached, prefilled = totals["rkllm_prompt_tokens_cached_total"], totals["rkllm_prompt_tokens_total"]
    return firsts, cached / (cached + prefilled), totals["rkllm_kv_slot_evictions_total"]


def conversation_rows(library: Path, directory: Path, turns: int) -> list[tuple[str, str]]:
    qwen = write_model(
        directory, "qwen-slots", decode_tokens_per_second=16.3, prefill_ms_per_token=3.22, reply_tokens=48
    )
    rows = []
    for slots in (1, 2):
        firsts, share, evictions = interleaved_conversations(library, qwen, directory, slots, turns)
        first_turn = statistics.median(f[0] for f in firsts)
        last_turn = statistics.median(f[-1] for f in firsts)
        rows.append(
            (
                f"Two conversations taking turns on one board, Qwen2.5-1.5B speed, kv_slots {slots} "
                f"({turns} turns each; goal with 2 slots: turn {turns} ≤ 1.3x turn 1, ≥ 85 % cached)",
                f"turn 1 {first_turn * 1000:.0f} ms, turn {turns} {last_turn * 1000:.0f} ms, "
                f"ratio {last_turn / first_turn:.2f}; {share:.0%} of prompt tokens from the KV cache; "
                f"{evictions:.0f} slot evictions",
            )
        )
    return rows


def concurrent_clients(
    library: Path, model: Path, directory: Path, clients: int
) -> tuple[int, int, int, int]:
    log = directory / "concurrency.log"
    os.environ["RKLLM_DOUBLE_LOG"] = str(log)
    try:
        with (
            server(library, model, directory, queue_size=clients) as (url, _),
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            prompts = [[{"role": "user", "content": f"client {i} question"}] for i in range(clients)]
            expected = [stream_chat(http, chat_body(p))[2] for p in prompts]
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                answers = list(pool.map(lambda p: stream_chat(http, chat_body(p))[2], prompts))
    finally:
        del os.environ["RKLLM_DOUBLE_LOG"]
    lines = log.read_text().splitlines()
    violations = sum(line.startswith("VIOLATION") for line in lines)
    order = [line.split()[0] for line in lines if line.split()[0] in ("RUN", "FINISH")]
    overlaps = sum(1 for a, b in itertools.pairwise(order) if a == b == "RUN")
    answered = sum(bool(a) for a in answers)
    mixed = sum(a != e for a, e in zip(answers, expected, strict=True))
    return answered, mixed, violations, overlaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "build" / "host" / "librkllmrt.so")
    parser.add_argument("--tokens", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--conversation-turns", type=int, default=8)
    parser.add_argument("--conversations-only", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        if args.conversations_only:
            print_table(conversation_rows(args.library, directory, args.conversation_turns))
            return
        flat = write_model(directory, "flat", reply_tokens=args.tokens)
        direct_rate, direct_firsts = direct_runs(args.library, flat, args.tokens, args.repeats)
        with (
            server(args.library, flat, directory) as (url, pid),
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            stream_chat(http, chat_body([{"role": "user", "content": "warm up"}], max_tokens=10))
            rates = []
            for run in range(3):
                count, seconds = count_stream_tokens(
                    http, chat_body([{"role": "user", "content": f"t{run}"}])
                )
                rates.append(count / seconds)
            rate = statistics.median(rates)
            http_firsts = [
                stream_chat(http, chat_body([{"role": "user", "content": f"ttft {i}"}], max_tokens=1))[0]
                for i in range(args.repeats)
            ]
            rss, double_rss = rss_without_double(pid, args.library)
        rows.append(
            (
                "Streaming throughput, 1 SSE stream, double flat out (target ≥ 10,000 tok/s)",
                f"{rate:,.0f} tok/s = {1000 / rate:.3f} ms/token "
                f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}); "
                f"binding alone in-process: {direct_rate:,.0f} tok/s",
            )
        )
        added = [h - d for h, d in zip(sorted(http_firsts), sorted(direct_firsts), strict=True)]
        rows.append(
            (
                "TTFT added by HTTP over a direct Engine call, 1-token runs (target p50 ≤ 2 ms)",
                f"p50 {statistics.median(added) * 1000:.2f} ms, p95 {percentile(added, 0.95) * 1000:.2f} ms "
                f"(HTTP p50 {statistics.median(http_firsts) * 1000:.2f} ms, direct p50 "
                f"{statistics.median(direct_firsts) * 1000:.2f} ms)",
            )
        )
        rows.append(
            (
                "Server RSS idle, one model open, double excluded (target ≤ 80 MB)",
                f"{rss - double_rss:.1f} MiB (VmRSS {rss:.1f} MiB, double's mappings {double_rss:.1f} MiB)",
            )
        )
        qwen = write_model(
            directory,
            "qwen",
            decode_tokens_per_second=16.3,
            prefill_ms_per_token=3.22,
            reply_tokens=48,
            max_context=4096,
        )
        for reuse in (True, False):
            firsts = multi_turn(args.library, qwen, directory, reuse, args.turns)
            rows.append(
                (
                    f"Multi-turn TTFT at Qwen2.5-1.5B speed, KV reuse {'on' if reuse else 'off'} "
                    "(target turn 10 ≤ 1.2x turn 1 with reuse)",
                    f"turn 1 {firsts[0] * 1000:.0f} ms, turn {len(firsts)} {firsts[-1] * 1000:.0f} ms, "
                    f"ratio {firsts[-1] / firsts[0]:.2f}",
                )
            )
        paced = write_model(directory, "paced", decode_tokens_per_second=200, reply_tokens=20)
        answered, mixed, violations, overlaps = concurrent_clients(args.library, paced, directory, 8)
        rows.append(
            (
                "8 concurrent clients on one handle",
                f"{answered}/8 answered, {mixed} mixed or wrong, {violations} VIOLATION lines, "
                f"{overlaps} overlapping runs in the double's log",
            )
        )
        rows += conversation_rows(args.library, directory, args.conversation_turns)
    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    print("| benchmark | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
