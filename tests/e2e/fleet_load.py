"""Client-side load for the fleet tests; runs inside the client network namespace:

    ip netns exec <prefix>-client python tests/e2e/fleet_load.py URL MODE [options]

Modes (all print one JSON document on stdout):
  openai-stream   stream one chat completion with the official openai client
  batch N         N concurrent non-streaming requests
  continuous      --concurrency C streaming clients back to back until --seconds elapse (or --stop-file
                  appears); one record per request: start/end wall-clock time, status, retry_after, error
  openai-continuous, ollama-continuous
                  the same with the official openai client (its default retries) or ollama client,
                  non-streaming; a record's error is what the client raised
  ollama-batch    --count N concurrent chats with the official ollama client; status per request
  probe           GET /healthz every 20 ms until --seconds or --stop-file; the times it answered
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

MODEL = "Qwen2.5-1.5B-Instruct"


# Every run's requests are new conversations to the balancer (its affinity key hashes the first
# message): a later run with the same texts would follow the homes an earlier test left behind.
RUN_ID = uuid.uuid4().hex[:8]


def load_messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"fleet load request {RUN_ID}-{n}"}]


def chat_body(model: str, max_tokens: int, stream: bool, n: int) -> dict[str, object]:
    return {"model": model, "max_tokens": max_tokens, "stream": stream, "messages": load_messages(n)}


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
                     stop_file: Path | None, interval: float = 0.0) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    records: list[dict[str, object]] = []

    def running() -> bool:
        return time.monotonic() < deadline and not (stop_file and stop_file.exists())

    async def worker(client: httpx.AsyncClient, worker_id: int) -> None:
        n = 0
        while running():
            n += 1
            body = chat_body(model, max_tokens, True, worker_id * 1_000_000 + n)
            started = time.monotonic()
            records.append(await one_request(client, f"{base}/v1/chat/completions", body))
            # A client that gets instant answers (404s) keeps its pace instead of flooding.
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    # A paced client opens a connection per request: between two of its requests nginx may reload (a
    # model change renders a new map), and a reload closes idle keep-alive connections, so a request
    # sent on one at that instant fails before reaching nginx (the SDKs retry exactly that).
    limits = httpx.Limits(max_keepalive_connections=0) if interval > 0 else httpx.Limits()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        await asyncio.gather(*[worker(client, i) for i in range(concurrency)])
    return {"records": records}


# Generous for one request, short enough that a request stuck on a vanished balancer ends the test.
# Longer than the balancer's Ollama wait (30 s) plus a generation: a request nginx lets in on its last
# try is answered after the bound, and the official ollama client has no timeout of its own.
SDK_TIMEOUT_S = 60.0


def openai_chat(base: str, model: str, max_tokens: int) -> Callable[[int], None]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=SDK_TIMEOUT_S)

    def chat(n: int) -> None:
        client.chat.completions.create(model=model, max_tokens=max_tokens, messages=load_messages(n))
    return chat


def ollama_chat(base: str, model: str, max_tokens: int) -> Callable[[int], None]:
    import ollama

    client = ollama.Client(host=base, timeout=SDK_TIMEOUT_S)

    def chat(n: int) -> None:
        client.chat(model=model, options={"num_predict": max_tokens},
                    messages=load_messages(n))
    return chat


def timed(call: Callable[[int], None], n: int) -> dict[str, object]:
    record: dict[str, object] = {"start": time.time()}
    try:
        call(n)
        record["status"] = 200
    except Exception as exc:  # the record names whatever the client raised
        record["status"] = getattr(exc, "status_code", None)
        record["error"] = f"{type(exc).__name__}: {exc}"[:300]
    record["end"] = time.time()
    return record


def sdk_continuous(call: Callable[[int], None], concurrency: int, seconds: float,
                   stop_file: Path | None) -> dict[str, object]:
    deadline = time.monotonic() + seconds

    def worker(worker_id: int) -> list[dict[str, object]]:
        records, n = [], 0
        while time.monotonic() < deadline and not (stop_file and stop_file.exists()):
            n += 1
            records.append(timed(call, worker_id * 1_000_000 + n))
        return records

    with ThreadPoolExecutor(concurrency) as pool:
        per_worker = list(pool.map(worker, range(concurrency)))
    return {"records": sorted((r for records in per_worker for r in records), key=lambda r: r["start"])}


def sdk_batch(call: Callable[[int], None], count: int) -> dict[str, object]:
    with ThreadPoolExecutor(count) as pool:
        return {"records": list(pool.map(lambda n: timed(call, n), range(count)))}


def probe(base: str, seconds: float, stop_file: Path | None) -> dict[str, object]:
    deadline = time.monotonic() + seconds
    answered: list[float] = []
    with httpx.Client(timeout=httpx.Timeout(0.3)) as client:
        while time.monotonic() < deadline and not (stop_file and stop_file.exists()):
            try:
                # A new connection each time: a client's next request finds whichever balancer holds it.
                if client.get(f"{base}/healthz", headers={"Connection": "close"}).status_code == 200:
                    answered.append(time.time())
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    return {"answered": answered}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("mode", choices=["openai-stream", "batch", "continuous", "openai-continuous",
                                         "ollama-continuous", "ollama-batch", "probe"])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--stop-file", type=Path)
    parser.add_argument("--interval", type=float, default=0.0,
                        help="continuous: least seconds from one request's start to its worker's next")
    args = parser.parse_args()
    if args.mode == "openai-stream":
        result = openai_stream(args.base, args.model)
    elif args.mode in ("openai-continuous", "ollama-continuous"):
        sdk = openai_chat if args.mode.startswith("openai") else ollama_chat
        result = sdk_continuous(sdk(args.base, args.model, args.max_tokens), args.concurrency, args.seconds,
                                args.stop_file)
    elif args.mode == "ollama-batch":
        result = sdk_batch(ollama_chat(args.base, args.model, args.max_tokens), args.count)
    elif args.mode == "probe":
        result = probe(args.base, args.seconds, args.stop_file)
    elif args.mode == "batch":
        result = asyncio.run(batch(args.base, args.model, args.count, args.max_tokens, args.stream))
    else:
        result = asyncio.run(continuous(args.base, args.model, args.concurrency, args.seconds,
                                        args.max_tokens, args.stop_file, args.interval))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
