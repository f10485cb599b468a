"""Event-loop stall from large request bodies: a stream's largest token gap while 1 MB bodies arrive.

Usage: python -m bench.bench_body_stall [--library build/host/librkllmrt.so] [--posts 8]

One server process (as on a board) streams a long answer at 50 tok/s (a 20 ms gap); beside it,
1 MB bodies of three shapes are posted one after another. Each is refused (the prompt cannot fit
the context) after it has been parsed, validated and rendered, which is the work that competes
with the stream. Prints, per shape, the stream's largest gap during each post: median and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.bench_server import MODEL, server, write_model
from tests.support import REPO_ROOT

RATE = 50  # tokens per second of the concurrent stream


def bodies() -> dict[str, bytes]:
    user = {"role": "user", "content": "x"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    shapes: dict[str, object] = {
        "one 1 MB message": {"model": MODEL, "messages": [{"role": "user", "content": "x" * 999_900}]},
        "25,000 short messages": {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}] * 25_000,
        },
        "3,500 messages of 240 characters": {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello " * 40}] * 3_500,
        },
        "9,000 tools": {"model": MODEL, "messages": [user], "tools": [tool] * 9_000},
    }
    return {name: json.dumps(body).encode() for name, body in shapes.items()}


def largest_gaps(url: str, raw: bytes, posts: int) -> list[float]:
    gaps: list[float] = []
    done = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            last = None
            for line in response.iter_lines():
                now = time.perf_counter()
                if '"content":"' in line:
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                if done.is_set():
                    return

    reader = threading.Thread(target=stream)
    reader.start()
    worst = []
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            while len(gaps) < RATE // 2:  # the stream is flowing
                time.sleep(0.05)
            for _ in range(posts):
                first = len(gaps)
                status = http.post("/v1/chat/completions", content=raw).status_code
                assert status == 400, f"expected a context refusal, got {status}"
                time.sleep(0.2)  # a few undisturbed tokens after the post belong to its window
                worst.append(max(gaps[first:]))
    finally:
        done.set()
        reader.join()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", type=Path, default=REPO_ROOT / "build" / "host" / "librkllmrt.so")
    parser.add_argument("--posts", type=int, default=8)
    args = parser.parse_args()
    steady = f"steady: {1000 // RATE} ms"
    print(f"| 1 MB body shape | bytes | stream's largest token gap per post, median / max ({steady}) |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = write_model(directory, "stall", reply_tokens=100_000, decode_tokens_per_second=RATE)
        with server(args.library, model, directory) as (url, _):
            for name, raw in bodies().items():
                worst = largest_gaps(url, raw, args.posts)
                median, top = 1000 * statistics.median(worst), 1000 * max(worst)
                print(f"| {name} | {len(raw):,} | {median:.0f} ms / {top:.0f} ms |")


if __name__ == "__main__":
    main()
