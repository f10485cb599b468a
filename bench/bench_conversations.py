"""Multi-turn conversations through the balancer: does the fleet keep each chat's KV cache?

N rkllm-server boards (the double at Qwen2.5-1.5B speed: 3.22 ms per prefilled token, 16.3 tok/s)
behind the nginx.conf that the nginx_lb role renders, with conversation affinity off (least_conn
only) and on. C conversations run at once, each 8 turns back to back: a 200-token system prompt, a
50-token user message per turn, 6-token replies. Each turn is a streamed chat completion carrying the
whole history, as OpenAI and Ollama clients send it, after 0.2-1.5 s of "reading" the last answer
(seeded per conversation: every routing sees the same users).

With --one-shots K, K more clients ask the same model one-turn questions back to back through the same
nginx while the conversations run (other users of the fleet); --keep-seconds sets the boards'
kv_slot_keep_seconds (0 = the least-recently-used slot policy, without protection for conversations).

Usage (from the repository root, after `make double`):
    .venv/bin/python -m bench.bench_conversations [--boards 3] [--conversations 1 2 4] [--kv-slots 1 2]
        [--one-shots K] [--keep-seconds 300 0]
Prints a Markdown table per cell: TTFT p50 of each turn, turn 8 / turn 1, the share of prompt tokens
served from cache (usage.prompt_tokens_details.cached_tokens) over all turns and over turns 2-8
(turn 1 can never be cached), the ceiling of the first (every later turn served its whole history
from cache), later turns that missed the cache, how often a conversation changed boards, one-turn
requests answered, 503s and errors.
With --against URL it drives an existing fleet instead (boards x conversations of them) and prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.bench_balancer import TMPFS
from tests.component.balancer_harness import (
    BoardModel,
    access_log,
    render_balancers,
    running_boards,
    running_nginx,
)
from tests.support import REPO_ROOT

TURNS = 8
REPLY_TOKENS = 6
SYSTEM_CHARS = 800  # ~200 tokens at the double's 4 bytes per token
USER_CHARS = 200  # ~50 tokens
THINK_SECONDS = (0.2, 1.5)  # a user reads the answer and types the next question
ROUTINGS = {"least_conn": False, "affinity": True}
TURN_LOGGED = r'"POST /v1/chat/completions\?c=(\d+)&t=(\d+) [^"]*" 200 .*? ua="([^"]*)"'


def qwen(kv_slots: int | None, keep_seconds: float | None = None) -> BoardModel:
    return BoardModel("qwen", tokens_per_second=16.3, reply_tokens=REPLY_TOKENS, queue_size=8,
                      prefill_ms_per_token=3.22, kv_slots=kv_slots, kv_slot_keep_seconds=keep_seconds)


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class CellResult:
    turns: list[list[Turn]] = field(default_factory=list)  # per conversation, in the order they ended
    numbers: list[int] = field(default_factory=list)  # the conversation number of each entry of turns
    refused: int = 0
    errors: int = 0
    one_shots: int = 0  # one-turn requests of the background load answered
    seconds: float = 0.0


def padded(text: str, size: int) -> str:
    filler = " Keep answers short and precise, and cite the board that served each step."
    while len(text) < size:
        text += filler
    return text[:size]


async def one_turn(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, str]],
                   result: CellResult) -> tuple[Turn, str]:
    """One streamed turn, repeated after Retry-After while the fleet answers 503."""
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": REPLY_TOKENS,
            "stream_options": {"include_usage": True}}
    while True:
        sent = time.monotonic()
        first: float | None = None
        reply: list[str] = []
        usage: dict[str, object] = {}
        async with client.stream("POST", url, json=body) as response:
            if response.status_code == 503:
                result.refused += 1
                await response.aread()
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            if response.status_code != 200:
                raise RuntimeError(f"status {response.status_code}: {(await response.aread())[:200]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    content = choice.get("delta", {}).get("content") or ""
                    if content and first is None:
                        first = time.monotonic() - sent
                    reply.append(content)
        if first is None or not usage:
            raise RuntimeError("stream ended without a token or usage")
        details = usage.get("prompt_tokens_details") or {}
        assert isinstance(details, dict)
        measured = Turn(first, int(str(usage["prompt_tokens"])), int(details.get("cached_tokens", 0)),
                        int(str(usage["completion_tokens"])))
        return measured, "".join(reply)


async def conversation(client: httpx.AsyncClient, url: str, model: str, cell: str, number: int,
                       turns_wanted: int, result: CellResult) -> None:
    messages = [{"role": "system", "content": padded(f"Conversation {cell}/{number}. You are a helpful "
                                                     "assistant running on a fleet of RK3588 boards.",
                                                     SYSTEM_CHARS)}]
    turns: list[Turn] = []
    # The same users (seeded by conversation) in every cell, so routings see the same arrivals.
    user = random.Random(number)
    try:
        for turn in range(1, turns_wanted + 1):
            if turn > 1:
                await asyncio.sleep(user.uniform(*THINK_SECONDS))
            messages.append({"role": "user",
                             "content": padded(f"Question {turn} of conversation {number}:", USER_CHARS)})
            measured, reply = await one_turn(client, f"{url}?c={number}&t={turn}", model, messages, result)
            turns.append(measured)
            messages.append({"role": "assistant", "content": reply})
    except (httpx.HTTPError, RuntimeError):
        result.errors += 1
    result.turns.append(turns)
    result.numbers.append(number)


async def one_shot_user(client: httpx.AsyncClient, url: str, model: str, cell: str, number: int,
                        done: asyncio.Event, result: CellResult) -> None:
    """Another user of the same model: one question per conversation, asked back to back."""
    asked = 0
    while not done.is_set():
        asked += 1
        question = padded(f"One-shot question {cell}/{number}/{asked}:", USER_CHARS)
        try:
            await one_turn(client, f"{url}?one-shot={number}", model, [{"role": "user", "content": question}],
                           result)
            result.one_shots += 1
        except (httpx.HTTPError, RuntimeError):
            result.errors += 1


async def run_cell(base: str, cell: str, conversations: int, model: str = "qwen", turns: int = TURNS,
                   one_shots: int = 0) -> CellResult:
    result = CellResult()
    clients = conversations + one_shots + 4
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    started = time.monotonic()
    done = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as client:
        url = f"{base}/v1/chat/completions"
        load = [asyncio.create_task(one_shot_user(client, url, model, cell, number, done, result))
                for number in range(one_shots)]
        tasks = []
        for number in range(conversations):
            tasks.append(asyncio.create_task(conversation(client, url, model, cell, number, turns, result)))
            await asyncio.sleep(0.05)  # users do not start in the same millisecond
        await asyncio.gather(*tasks)
        done.set()
        await asyncio.gather(*load)
    result.seconds = time.monotonic() - started
    return result


def turn_boards(log: str) -> dict[int, dict[int, str]]:
    """The board that answered each turn, by conversation (from nginx's access log, where each turn's
    URI names its conversation and turn)."""
    boards: dict[int, dict[int, str]] = {}
    for conv, turn, tried in re.findall(TURN_LOGGED, log):
        boards.setdefault(int(conv), {})[int(turn)] = re.split(r", | : ", tried)[-1]
    return boards


def moves_per_conversation(boards: dict[int, dict[int, str]]) -> float:
    """Turns answered by another board than the conversation's previous turn, per conversation."""
    moves = [sum(1 for t in turns if t - 1 in turns and turns[t] != turns[t - 1])
             for turns in boards.values()]
    return statistics.mean(moves) if moves else float("nan")


def placement(boards: dict[int, dict[int, str]], n: int) -> str:
    """Conversations whose first turn each board answered, most first (e.g. 3/2/1 for 6 on 3 boards)."""
    homes = Counter(turns[min(turns)] for turns in boards.values())
    counts = sorted(homes.values(), reverse=True) + [0] * (n - len(homes))
    return "/".join(str(count) for count in counts)


def cache_shares(conversations: list[list[Turn]]) -> tuple[float, float]:
    """Share of prompt tokens served from cache over all turns, and over turns 2 and later."""
    every = [turn for turns in conversations for turn in turns]
    later = [turn for turns in conversations for turn in turns[1:]]
    return (sum(t.cached_tokens for t in every) / max(1, sum(t.prompt_tokens for t in every)),
            sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later)))


def cache_ceiling(conversations: list[list[Turn]]) -> float:
    """The share over all turns had every later turn found the previous turn's prompt and reply cached."""
    held = sum(before.prompt_tokens + before.completion_tokens
               for turns in conversations for before in turns[:-1])
    return held / max(1, sum(turn.prompt_tokens for turns in conversations for turn in turns))


def misses(conversations: list[list[Turn]]) -> int:
    """Later turns that prefilled their whole history (no cache hit is partial: a prefix or nothing)."""
    return sum(1 for turns in conversations for turn in turns[1:] if turn.cached_tokens == 0)


def row(kv_slots: int, keep: str, n: int, conversations: int, routing: str, result: CellResult,
        moves: float, placed: str, turns_wanted: int) -> str:
    complete = [turns for turns in result.turns if len(turns) == turns_wanted]
    p50 = [statistics.median(turns[t].ttft for turns in complete) if complete else float("nan")
           for t in range(turns_wanted)]
    share_all, share_later = cache_shares(complete)
    ttfts = " / ".join(f"{v * 1000:.0f}" for v in p50)
    return (f"| {kv_slots} | {keep} | {result.one_shots} | {conversations} ({conversations // n}N) | "
            f"{routing} | {ttfts} | {p50[TURNS - 1] / p50[0]:.2f} | {100 * share_all:.0f} % | "
            f"{100 * share_later:.0f} % | {100 * cache_ceiling(complete):.0f} % | {misses(complete)} | "
            f"{placed} | {moves:.2f} | {result.refused} | {result.errors + conversations - len(complete)} | "
            f"{result.seconds:.0f} |")


async def bench(workdir: Path, table_dir: Path, n: int, multiples: list[int], slot_counts: list[int],
                turns: int, keeps: list[float | None], one_shots: int, routings: list[str]) -> None:
    library = REPO_ROOT / "build" / "host" / "librkllmrt.so"
    print(f"{n} boards; TTFT p50 ms of turns 1-{turns}; 'keep s' = kv_slot_keep_seconds (0: least recently "
          f"used); 'one-shots' = one-turn requests answered meanwhile ({one_shots} clients); 'ceiling' = "
          "from cache over all turns if no later turn missed; 'missed' = later turns with nothing cached; "
          "'placed' = conversations that started on each board; "
          "'moves' = turns answered by another board than the conversation's previous turn, per conversation")
    print(f"| kv_slots | keep s | one-shots | conversations | routing | TTFT p50 ms, turns 1-{turns} | "
          f"turn {TURNS} / turn 1 | from cache, all turns | from cache, turns 2-{turns} | ceiling | missed | "
          "placed | moves | 503 | errors | cell s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kv_slots in slot_counts:
        for keep in keeps:
            keep_text = "default" if keep is None else f"{keep:g}"
            name = f"{kv_slots}-{keep_text}"
            fleet = {f"b{i + 1}": [qwen(kv_slots, keep)] for i in range(n)}
            with running_boards(workdir / f"boards-{name}", library, fleet) as started:
                boards = list(started.values())
                variants: dict[str, dict[str, object]] = {
                    routing: {"nginx_lb_conversation_affinity": ROUTINGS[routing],
                              "nginx_lb_affinity_dir": str(table_dir / f"{name}-{routing}")}
                    for routing in routings
                }
                rendered = render_balancers(workdir / f"lb-{name}", boards, variants)
                for multiple in multiples:
                    for routing in routings:
                        balancer = rendered[routing]
                        with running_nginx(balancer) as base:
                            offset = len(access_log(balancer))
                            cell = f"{name}-{multiple}-{routing}"
                            result = await run_cell(base, cell, n * multiple, turns=turns,
                                                    one_shots=one_shots)
                            boards_of_turns = turn_boards(access_log(balancer)[offset:])
                        print(row(kv_slots, keep_text, n, n * multiple, routing, result,
                                  moves_per_conversation(boards_of_turns), placement(boards_of_turns, n),
                                  turns), flush=True)


async def against(base: str, model: str, conversations: int, turns: int, one_shots: int) -> None:
    """Conversations against a running fleet (the simulated one): one JSON document on stdout."""
    result = await run_cell(base, f"{time.time():.0f}", conversations, model, turns, one_shots)
    share_all, share_later = cache_shares(result.turns)
    print(json.dumps({"turns_completed": [len(turns) for turns in result.turns], "errors": result.errors,
                      "refused": result.refused, "from_cache_all": share_all, "from_cache_later": share_later,
                      "missed": misses(result.turns), "one_shots": result.one_shots,
                      "missed_by_conversation": {str(number): misses([turns]) for number, turns in
                                                 zip(result.numbers, result.turns, strict=True)},
                      "ttft": [[t.ttft for t in turns] for turns in result.turns]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, default=3)
    parser.add_argument("--conversations", type=int, nargs="+", default=[1, 2, 4],
                        help="concurrent conversations per board")
    parser.add_argument("--kv-slots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--against", metavar="URL", help="drive an existing fleet instead; prints JSON")
    parser.add_argument("--model", default="Qwen2.5-1.5B-Instruct", help="with --against")
    parser.add_argument("--turns", type=int, default=TURNS,
                        help=f"turns per conversation, at least {TURNS} (turn {TURNS} / turn 1 is reported)")
    parser.add_argument("--one-shots", type=int, default=0, metavar="K",
                        help="clients asking the same model one-turn questions while the conversations run")
    parser.add_argument("--keep-seconds", type=float, nargs="+", default=[None],
                        help="the boards' kv_slot_keep_seconds, rows each (0: least recently used)")
    parser.add_argument("--routing", nargs="+", choices=list(ROUTINGS), default=list(ROUTINGS))
    args = parser.parse_args()
    if args.against:
        asyncio.run(against(args.against, args.model, args.boards * args.conversations[0], args.turns,
                            args.one_shots))
        return
    with tempfile.TemporaryDirectory(prefix="bench-conversations-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-conversations-", dir=TMPFS) as table:
        asyncio.run(bench(Path(tmp), Path(table), args.boards, args.conversations, args.kv_slots,
                          max(TURNS, args.turns), args.keep_seconds, args.one_shots, args.routing))


if __name__ == "__main__":
    main()
