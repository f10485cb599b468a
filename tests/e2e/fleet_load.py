"""Client-side load for the fleet tests; runs inside the client network namespace:

    ip netns exec <prefix>-client python tests/e2e/fleet_load.py URL MODE [options]

Modes (all print one JSON document on stdout):
  openai-stream   stream one chat completion with the official openai client
  batch N         N concurrent non-streaming requests
  continuous      --concurrency C streaming clients back to back until --seconds elapse (or --stop-file
                  appears); one record per request: start/end wall-clock time, status, retry_after, error
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

MODEL = "Qwen2.5-1.5B-Instruct"


def chat_body(model: str, max_tokens: int, stream: bool, n: int) -> dict[str, object]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"fleet load request {n}"}]}


def openai_stream(base: str, model: str) -> dict[str, object]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    deltas = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello through the balancer"}],
        max_tokens=8, stream=True) if chunk.choices]
    return {"deltas": deltas}


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, object]) -> dict[str, object]:
    record: dict[str, object] = {"start": time.time()}
    try:
        if body["stream"]:
            async with client.stream("POST", url, json=body) as response:
                record["status"] = response.status_code
                record["retry_after"] = response.headers.get("retry-after")
                text = "".join([line async for line in response.aiter_lines()])
                record["complete"] = response.status_code != 200 or "data: [DONE]" in text
        else:
            response = await client.post(url, json=body)
            record["status"] = response.status_code
            record["retry_after"] = response.headers.get("retry-after")
            record["complete"] = True
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["end"] = time.time()
    return record


async def batch(base: str, model: str, count: int, max_tokens: int, stream: bool) -> dict[str, object]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(timeout=httpx.Timeout(180.0), limits=limits) as client:
        records = await asyncio.gather(*[
            one_request(client, f"{base}/v1/chat/completions", chat_body(model, max_tokens, stream, n))
            for n in range(count)])
    return {"records": records}


async def continuous(base: str, model: str, concurrency: int, seconds: float, max_tokens: int,
                     stop_file: Path | None) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    records: list[dict[str, object]] = []

    def running() -> bool:
        return time.monotonic() < deadline and not (stop_file and stop_file.exists())

    async def worker(client: httpx.AsyncClient, worker_id: int) -> None:
        n = 0
        while running():
            n += 1
            body = chat_body(model, max_tokens, True, worker_id * 1_000_000 + n)
            records.append(await one_request(client, f"{base}/v1/chat/completions", body))

    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        await asyncio.gather(*[worker(client, i) for i in range(concurrency)])
    return {"records": records}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("mode", choices=["openai-stream", "batch", "continuous"])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--stop-file", type=Path)
    args = parser.parse_args()
    if args.mode == "openai-stream":
        result = openai_stream(args.base, args.model)
    elif args.mode == "batch":
        result = asyncio.run(batch(args.base, args.model, args.count, args.max_tokens, args.stream))
    else:
        result = asyncio.run(continuous(args.base, args.model, args.concurrency, args.seconds,
                                        args.max_tokens, args.stop_file))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
