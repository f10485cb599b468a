"""The balancer under load: N rkllm-server boards (the double at 16 tok/s) behind the nginx.conf that
the nginx_lb role renders, driven by an asyncio + httpx load generator on loopback.

Usage (from the repository root, after `make double`):
    .venv/bin/python -m bench.bench_balancer [--boards 1 2 4 8] [--loads 1 2 4] [--seconds 8] [--balancers 2]
With --balancers 2 two nginx, each rendered with its share of every board (nginx_lb_admission_shares),
take the clients in turn, as two balancers do that both take requests.
Prints a Markdown table: aggregate tokens/s against the ideal N x 16, TTFT p50/p95, mean queue wait
(from the boards' rkllm_request_queue_time_seconds), status/error counts; then nginx's added TTFT
(p50 of paired direct-vs-nginx requests to an idle board) with conversation affinity on (as in the
table) and off. Runs about four minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.component.balancer_harness import (
    Board,
    BoardModel,
    RenderedBalancer,
    render_balancers,
    running_boards,
    running_nginx,
)
from tests.support import REPO_ROOT

TOKENS_PER_SECOND = 16.0
TOKENS_PER_REQUEST = 32  # 2 s of decoding per request at 16 tok/s
PACED = BoardModel("paced", tokens_per_second=TOKENS_PER_SECOND, reply_tokens=4096, queue_size=8)
FLAT = BoardModel("flat", tokens_per_second=0, reply_tokens=4, queue_size=8)
WARMUP_S = 3.0
TMPFS = "/dev/shm"  # the conversation table's tmpfs (on a balancer: /run)


@dataclass
class CellResult:
    tokens_in_window: int = 0
    ttft: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0


def content_of(line: str) -> str:
    if not line.startswith("data: {"):
        return ""
    choices = json.loads(line[6:]).get("choices") or [{}]
    return choices[0].get("delta", {}).get("content") or ""


def body(model: str, max_tokens: int, n: int) -> dict[str, object]:
    return {"model": model, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": f"benchmark request {n}"}]}


async def client_loop(client: httpx.AsyncClient, url: str, window: tuple[float, float], result: CellResult,
                      client_id: int) -> None:
    """Requests back to back until the window ends. A request sent in the window is followed until its
    first token, however late: under overload it queues longer than the rest of the window, and
    dropping it would leave the TTFT columns with only the lucky requests (or none)."""
    sequence = 0
    while time.monotonic() < window[1]:
        sequence += 1
        sent = time.monotonic()
        try:
            async with client.stream("POST", url, json=body(PACED.name, TOKENS_PER_REQUEST,
                                                             client_id * 100000 + sequence)) as response:
                result.statuses[response.status_code] += 1
                if response.status_code != 200:
                    await response.aread()
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                first: float | None = None
                async for line in response.aiter_lines():
                    if not content_of(line):
                        continue
                    now = time.monotonic()
                    if first is None:
                        first = now - sent
                        if window[0] <= sent < window[1]:
                            result.ttft.append(first)
                    if now >= window[1]:
                        break
                    if window[0] <= now:
                        result.tokens_in_window += 1
        except httpx.HTTPError:
            result.errors += 1


def queue_totals(boards: list[Board]) -> tuple[float, float]:
    """(sum of queue seconds, number of requests) over the boards' queue-time histograms."""
    total_s = count = 0.0
    for board in boards:
        text = httpx.get(f"http://127.0.0.1:{board.port}/metrics", timeout=10).text
        total_s += sum(map(float, re.findall(r"^rkllm_request_queue_time_seconds_sum\S* (\S+)$", text, re.M)))
        count += sum(map(float, re.findall(r"^rkllm_request_queue_time_seconds_count\S* (\S+)$", text, re.M)))
    return total_s, count


async def wait_idle(boards: list[Board]) -> None:
    pattern = re.compile(r"^rkllm_requests_(?:running|waiting)\S* (\S+)$", re.M)
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            texts = [(await client.get(f"http://127.0.0.1:{b.port}/metrics")).text for b in boards]
            if all(float(v) == 0 for t in texts for v in pattern.findall(t)):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("boards still busy after the cell")


async def run_cell(bases: list[str], boards: list[Board], clients: int, seconds: float
                   ) -> tuple[CellResult, float]:
    result = CellResult()
    queue_before = queue_totals(boards)
    start = time.monotonic()
    window = (start + WARMUP_S, start + WARMUP_S + seconds)
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits) as client:
        urls = [f"{bases[i % len(bases)]}/v1/chat/completions" for i in range(clients)]
        tasks = [asyncio.create_task(client_loop(client, url, window, result, i))
                 for i, url in enumerate(urls)]
        # Each client ends after the window with its last request's first token (the client timeout
        # bounds a request that never gets one).
        await asyncio.gather(*tasks)
    await wait_idle(boards)
    queue_after = queue_totals(boards)
    requests = queue_after[1] - queue_before[1]
    mean_queue = (queue_after[0] - queue_before[0]) / requests if requests else 0.0
    return result, mean_queue


async def first_token_seconds(client: httpx.AsyncClient, url: str, n: int) -> float:
    sent = time.monotonic()
    async with client.stream("POST", url, json=body(FLAT.name, 1, n)) as response:
        async for line in response.aiter_lines():
            if content_of(line):
                return time.monotonic() - sent
    raise RuntimeError(f"no token from {url}")


async def nginx_added_ttft(base: str, board: Board, pairs: int = 40) -> tuple[float, float, float]:
    """p50 TTFT direct, p50 through nginx, p50 of the paired differences (seconds)."""
    direct_url = f"http://127.0.0.1:{board.port}/v1/chat/completions"
    direct: list[float] = []
    proxied: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for n in range(pairs + 5):
            d = await first_token_seconds(client, direct_url, n)
            p = await first_token_seconds(client, f"{base}/v1/chat/completions", n)
            if n >= 5:  # first pairs open connections and warm caches
                direct.append(d)
                proxied.append(p)
    diffs = [p - d for p, d in zip(proxied, direct, strict=True)]
    return statistics.median(direct), statistics.median(proxied), statistics.median(diffs)


def worker_cpu_seconds(balancer: RenderedBalancer) -> float:
    """CPU time the nginx workers have used so far (schedstat: nanoseconds on CPU), a measure of
    nginx's own work that the machine's load does not inflate the way it inflates latencies."""
    master = (balancer.prefix / "nginx.pid").read_text().strip()
    workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return sum(int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) for pid in workers) / 1e9


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(n: int, load: int, result: CellResult, mean_queue: float, seconds: float) -> str:
    rate = result.tokens_in_window / seconds
    ideal = n * TOKENS_PER_SECOND
    others = sum(c for s, c in result.statuses.items() if s not in (200, 503))
    return (f"| {n} | {load}x ({n * load} clients) | {rate:.1f} | {ideal:.0f} | {100 * rate / ideal:.1f} % | "
            f"{percentile(result.ttft, 0.5) * 1000:.0f} | {percentile(result.ttft, 0.95) * 1000:.0f} | "
            f"{mean_queue * 1000:.0f} | {result.statuses[200]} | {result.statuses[503]} | "
            f"{others + result.errors} |")


def render_fleet_sizes(workdir: Path, table_dir: Path, boards: list[Board], sizes: list[int], balancers: int
                       ) -> dict[int, list[RenderedBalancer]]:
    """For each fleet size N, `balancers` nginx configs whose max_conns shares add up to a board's capacity.

    Boards beyond N are drained (rendered `down`). With several balancers each size is rendered on its
    own, so the balancers group holds exactly the balancers that share the boards. Conversation affinity
    is on (the default), each balancer's table on tmpfs as in production (/run).
    """
    def variant(n: int, name: str) -> dict[str, object]:
        return {"nginx_lb_drained_boards": [b.name for b in boards[n:]],
                "nginx_lb_admission_shares": 1 if balancers == 1 else 0,
                "nginx_lb_affinity_dir": str(table_dir / name)}

    if balancers == 1:
        rendered = render_balancers(workdir / "lb", boards, {f"n{n}": variant(n, f"n{n}") for n in sizes})
        return {n: [rendered[f"n{n}"]] for n in sizes}
    fleets = {}
    for n in sizes:
        names = [f"n{n}lb{i}" for i in range(1, balancers + 1)]
        rendered = render_balancers(workdir / f"lb{n}", boards, {name: variant(n, name) for name in names})
        fleets[n] = [rendered[name] for name in names]
    return fleets


async def bench(workdir: Path, table_dir: Path, sizes: list[int], loads: list[int], seconds: float,
                balancers: int) -> None:
    largest = max(sizes)
    fleet = {f"b{i + 1}": [PACED, FLAT] for i in range(largest)}
    library = REPO_ROOT / "build" / "host" / "librkllmrt.so"
    with running_boards(workdir / "boards", library, fleet) as started:
        boards = list(started.values())
        rendered = render_fleet_sizes(workdir, table_dir, boards, sizes, balancers)
        # The affinity overhead is measured on one balancer in front of the whole fleet, on and off.
        overhead_variants: dict[str, dict[str, object]] = {
            "affinity": {"nginx_lb_affinity_dir": str(table_dir / "overhead")},
            "no_affinity": {"nginx_lb_conversation_affinity": False},
        }
        single = render_balancers(workdir / "overhead", boards, overhead_variants)
        print(f"{balancers} balancer(s)\n")
        print("| boards | load | tokens/s | ideal | of ideal | TTFT p50 ms | TTFT p95 ms | "
              "queue wait mean ms | 200 | 503 | errors |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for n in sizes:
            with ExitStack() as stack:
                bases = [stack.enter_context(running_nginx(balancer)) for balancer in rendered[n]]
                for load in loads:
                    result, mean_queue = await run_cell(bases, boards[:n], n * load, seconds)
                    print(row(n, load, result, mean_queue, seconds), flush=True)
        # Alternating rounds, so that load from elsewhere on the machine hits both configurations alike.
        # The same requests every round: the first round's are new conversations, later ones return.
        added: dict[str, list[float]] = {"affinity": [], "no_affinity": []}
        cpu: dict[str, float] = dict.fromkeys(added, 0.0)
        pairs = 40
        for _ in range(3):
            for variant, values in added.items():
                with running_nginx(single[variant]) as base:
                    cpu_before = worker_cpu_seconds(single[variant])
                    direct, proxied, difference = await nginx_added_ttft(base, boards[0], pairs)
                    cpu[variant] += worker_cpu_seconds(single[variant]) - cpu_before
                    values.append(difference)
        on, off = (statistics.median(added[v]) * 1000 for v in added)
        cpu_on, cpu_off = (cpu[v] / (3 * (pairs + 5)) * 1e6 for v in added)
        print(f"\nTTFT on an idle board (flat-out model, 1 token; last round: direct p50 "
              f"{direct * 1000:.2f} ms, through nginx p50 {proxied * 1000:.2f} ms): nginx adds p50 "
              f"{on:.2f} ms with conversation affinity, {off:.2f} ms without (median of 3 rounds of "
              f"{pairs} paired requests); nginx worker CPU per request {cpu_on:.0f} µs with affinity, "
              f"{cpu_off:.0f} µs without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--loads", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement window per cell")
    parser.add_argument("--balancers", type=int, default=1, choices=[1, 2, 3],
                        help="nginx instances sharing the boards, clients spread over them")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-balancer-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-balancer-", dir=TMPFS) as table:
        asyncio.run(bench(Path(tmp), Path(table), sorted(args.boards), args.loads, args.seconds,
                          args.balancers))


if __name__ == "__main__":
    main()
