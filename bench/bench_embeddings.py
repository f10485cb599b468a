"""Embedding benchmarks over the C double flat out (no prefill cost): prints a Markdown table.

Usage: python -m bench.bench_embeddings [--library build/host/librkllmrt.so] [--calls 300]
       [--embd-size 1024] [--input-bytes 256]

The server runs as its own process, as on a board; the client is this process (httpx), sharing the
machine's cores with it. Inputs are distinct texts of --input-bytes bytes (64 tokens by the
double's count); hidden states are --embd-size floats per token (Qwen3-Embedding-0.6B's 1024).
  1. embeddings per second through the server: one input per call (float and base64), batches of
     32 inputs per call, and 4 clients at once (one model: their calls queue);
  2. the latency HTTP adds per one-input call over the same work on the binding in-process
     (clear, hidden-layer run, clear, last-token pooling, L2 normalisation), median and p90.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.bench_server import MODEL, percentile, server, write_model
from rkllm_runtime.embedding import embedding_vector
from rkllm_runtime.engine import Engine, ModelParams
from rkllm_runtime.library import load_library
from tests.support import REPO_ROOT

BATCH = 32
CLIENTS = 4


def texts(count: int, size: int, tag: str) -> list[str]:
    return [f"{tag} {i} " + "board fleet npu " * (size // 16) for i in range(count)]


def call(http: httpx.Client, inputs: list[str], encoding: str = "float") -> float:
    started = time.perf_counter()
    answer = http.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": encoding})
    answer.raise_for_status()
    assert len(answer.json()["data"]) == len(inputs)
    return time.perf_counter() - started


def per_second(http: httpx.Client, inputs: list[str], per_call: int, encoding: str = "float") -> float:
    started = time.perf_counter()
    for start in range(0, len(inputs), per_call):
        call(http, inputs[start : start + per_call], encoding)
    return len(inputs) / (time.perf_counter() - started)


def concurrent_per_second(url: str, inputs: list[str]) -> float:
    share = len(inputs) // CLIENTS

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for text in inputs[index * share : (index + 1) * share]:
                call(http, [text])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    return share * CLIENTS / (time.perf_counter() - started)


def direct_latencies(library: Path, model: Path, inputs: list[str]) -> list[float]:
    """The server's work for one input, on the binding in-process with no HTTP and no queue."""
    engine = Engine(load_library(library), ModelParams(str(model), max_context_len=16384))

    async def embed(text: str) -> float:
        started = time.perf_counter()
        engine.clear_kv_cache(False)
        hidden, _ = await engine.last_hidden_layer(text)
        engine.clear_kv_cache(False)
        embedding_vector(hidden, "last")
        return time.perf_counter() - started

    async def run_all() -> list[float]:
        await embed("warm up")
        return [await embed(text) for text in inputs]

    try:
        return asyncio.run(run_all())
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "build/host/librkllmrt.so")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--embd-size", type=int, default=1024)
    parser.add_argument("--input-bytes", type=int, default=256)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        model = write_model(directory, "embed", embd_size=args.embd_size, max_context=16384)
        n, size = args.calls, args.input_bytes
        direct = direct_latencies(args.library, model, texts(n, size, "direct"))
        with (
            server(args.library, model, directory, kind="embedding") as (url, _),
            httpx.Client(base_url=url, timeout=120) as http,
        ):
            call(http, ["warm up"])
            rows.append(
                (
                    "embeddings/s, 1 input per call, float",
                    f"{per_second(http, texts(n, size, 'f'), 1):.0f}",
                )
            )
            rows.append(
                (
                    "embeddings/s, 1 input per call, base64",
                    f"{per_second(http, texts(n, size, 'b'), 1, 'base64'):.0f}",
                )
            )
            batched = per_second(http, texts(n * 2, size, "batch"), BATCH)
            rows.append((f"embeddings/s, {BATCH} inputs per call, float", f"{batched:.0f}"))
            rows.append(
                (
                    f"embeddings/s, {CLIENTS} clients at once, 1 input per call",
                    f"{concurrent_per_second(url, texts(n, size, 'c')):.0f}",
                )
            )
            over_http = [call(http, [text]) for text in texts(n, size, "latency")]
        direct_ms = [s * 1000 for s in direct]
        http_ms = [s * 1000 for s in over_http]
        rows.append(
            (
                "one-input call: direct binding, median / p90",
                f"{statistics.median(direct_ms):.2f} / {percentile(direct_ms, 0.9):.2f} ms",
            )
        )
        rows.append(
            (
                "one-input call: through the server, median / p90",
                f"{statistics.median(http_ms):.2f} / {percentile(http_ms, 0.9):.2f} ms",
            )
        )
        rows.append(
            (
                "latency the server adds per call (median)",
                f"{statistics.median(http_ms) - statistics.median(direct_ms):.2f} ms",
            )
        )
    print(
        f"\nEmbeddings (double flat out, embd_size {args.embd_size}, {args.input_bytes}-byte inputs, "
        f"{args.calls} calls per row)\n"
    )
    print("| benchmark | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
