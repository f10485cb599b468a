"""nginx_lb's admission: each balancer's max_conns per board is its share of the board's capacity (the
shares of the balancers in the group add up to exactly that capacity), and when every board is full
Ollama requests wait at the balancer for a free board while OpenAI requests get 503 + Retry-After."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from balancer_harness import (
    Board,
    BoardModel,
    render_balancer,
    render_balancers,
    running_boards,
    running_nginx,
)

BOARDS = [Board(name="b1", port=18101, models=["alpha"]), Board(name="b2", port=18102, models=["alpha"])]
# 50 tokens per second: a 50-token reply holds the board for about a second.
TOKENS_PER_SECOND = 50
WAIT_SECONDS = 3


def _max_conns(conf: Path) -> set[int]:
    return {int(value) for value in re.findall(r"\bmax_conns=(\d+)", conf.read_text())}


@pytest.mark.parametrize(("balancers", "capacity", "shares"), [
    (2, 9, [5, 4]),
    (3, 9, [3, 3, 3]),
    (4, 9, [3, 2, 2, 2]),
])
def test_every_balancer_gets_its_share_and_the_shares_add_up(tmp_path: Path, balancers: int, capacity: int,
                                                              shares: list[int]) -> None:
    # Every host of the balancers group takes part (nginx_lb_admission_shares: 0).
    # Affinity off: each board is in one upstream, so its max_conns is the whole share.
    variants = {f"lb{i}": {"nginx_lb_admission_shares": 0, "nginx_lb_upstream_max_conns": capacity,
                           "nginx_lb_conversation_affinity": False}
                for i in range(1, balancers + 1)}
    rendered = render_balancers(tmp_path, BOARDS, variants)
    found = [_max_conns(rendered[f"lb{i}"].conf) for i in range(1, balancers + 1)]
    assert found == [{share} for share in shares]
    assert sum(shares) == capacity


def test_a_fixed_number_of_shares_overrides_the_group_size(tmp_path: Path) -> None:
    variants = {name: {"nginx_lb_admission_shares": 1, "nginx_lb_conversation_affinity": False}
                for name in ("lb1", "lb2")}
    rendered = render_balancers(tmp_path, BOARDS, variants)
    assert [_max_conns(rendered[name].conf) for name in ("lb1", "lb2")] == [{9}, {9}]


def test_affinity_splits_each_balancers_share_between_home_and_shared_upstreams(tmp_path: Path) -> None:
    variants = {f"lb{i}": {"nginx_lb_admission_shares": 0} for i in (1, 2)}
    rendered = render_balancers(tmp_path, BOARDS, variants)
    splits = []
    for name in ("lb1", "lb2"):
        conf = rendered[name].conf.read_text()
        home = {int(v) for v in re.findall(r"upstream rkllm_home_\d+ \{[^}]*?max_conns=(\d+)", conf)}
        shared = {int(v) for v in re.findall(r"upstream rkllm_all \{[^}]*?max_conns=(\d+)", conf)}
        assert len(home) == 1 and len(shared) == 1, conf
        splits.append(home.pop() + shared.pop())
    assert splits == [5, 4], "a board's two upstreams together take exactly this balancer's share"


@pytest.fixture(scope="module", params=[True, False], ids=["model-routing", "no-model-routing"])
def lb(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
       double_library_path: Path) -> Iterator[str]:
    """One board, one request at a time (max_conns 1), Ollama requests waiting up to WAIT_SECONDS; with
    and without the model router (whose locations the waits otherwise retry)."""
    fleet = {"b1": [BoardModel("alpha", tokens_per_second=TOKENS_PER_SECOND, reply_tokens=2000)]}
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path, fleet) as boards:
        balancer = render_balancer(tmp_path_factory.mktemp("lb"), list(boards.values()),
                                   nginx_lb_upstream_max_conns=1, nginx_lb_ollama_wait_seconds=WAIT_SECONDS,
                                   nginx_lb_conversation_affinity=False, nginx_lb_model_routing=request.param)
        with running_nginx(balancer) as base:
            yield base


@contextmanager
def holding_the_board(lb: str, tokens: int) -> Iterator[None]:
    """A stream through nginx that takes the board's only slot until it ends (or the block does)."""
    body = {"model": "alpha", "max_tokens": tokens, "stream": True,
            "messages": [{"role": "user", "content": "hold"}]}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{lb}/v1/chat/completions",
                                                           json=body) as response:
        assert response.status_code == 200
        events = response.iter_lines()
        next(events)
        yield


def ollama_chat(lb: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(f"{lb}/api/chat", timeout=60, json={
        "model": "alpha", "stream": False, "options": {"num_predict": 4},
        "messages": [{"role": "user", "content": "wait for me"}]})
    return response, time.monotonic() - started


def test_ollama_request_waits_for_the_board_openai_request_is_refused_at_once(lb: str) -> None:
    with holding_the_board(lb, tokens=TOKENS_PER_SECOND):  # about one second
        started = time.monotonic()
        refused = httpx.post(f"{lb}/v1/chat/completions", timeout=30, json={
            "model": "alpha", "max_tokens": 4, "messages": [{"role": "user", "content": "now"}]})
        refused_after = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "fleet_busy"
        waited, waited_for = ollama_chat(lb)
    print(f"OpenAI refused after {refused_after:.2f}s; "
          f"Ollama answered {waited.status_code} after {waited_for:.2f}s")
    assert refused_after < 1
    assert waited.status_code == 200, waited.text
    assert waited.json()["message"]["role"] == "assistant"
    assert waited_for < WAIT_SECONDS + 1


def test_ollama_request_gets_the_503_after_the_bound(lb: str) -> None:
    with holding_the_board(lb, tokens=2000):  # 40 seconds, far past the bound
        response, waited_for = ollama_chat(lb)
    print(f"Ollama refused after {waited_for:.2f}s (bound {WAIT_SECONDS}s)")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert isinstance(response.json()["error"], str)
    # The four waits add up to the bound (within the rounding of each to whole milliseconds).
    assert WAIT_SECONDS - 0.1 <= waited_for < WAIT_SECONDS + 2


# A board with a queue of 3 holds 4 requests; with affinity (the default) this balancer's 4 slots of
# each board are 2 shared (least_conn) + 2 home. A 0.4 s reply keeps a burst of 2x capacity waiting.
SPILL_MODEL = BoardModel("alpha", tokens_per_second=50, reply_tokens=20, queue_size=3)
SPILL_CAPACITY = 4
SPILL_WAIT_SECONDS = 8


def board_sample(board: Board) -> tuple[float, float]:
    """(requests waiting in the board's queue, its queue_full refusals so far)."""
    text = httpx.get(f"http://127.0.0.1:{board.port}/metrics", timeout=5).text

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    return (total(r"^rkllm_requests_waiting\{[^}]*\} (\S+)$"),
            total(r'^rkllm_requests_rejected_total\{[^}]*reason="queue_full"[^}]*\} (\S+)$'))


def test_waiting_ollama_requests_fill_the_home_slots_too(tmp_path: Path, double_library_path: Path) -> None:
    fleet = {name: [SPILL_MODEL] for name in ("b1", "b2")}
    with running_boards(tmp_path / "boards", double_library_path, fleet) as boards:
        balancer = render_balancer(tmp_path / "lb", list(boards.values()),
                                   nginx_lb_upstream_max_conns=SPILL_CAPACITY,
                                   nginx_lb_ollama_wait_seconds=SPILL_WAIT_SECONDS)
        conf = balancer.conf.read_text()
        assert re.search(r"upstream rkllm_all \{[^}]*?max_conns=2", conf), "shared part: 2 of the board's 4"
        peaks = dict.fromkeys(boards, 0.0)
        sampling = True

        def sample() -> None:
            while sampling:
                for name, board in boards.items():
                    peaks[name] = max(peaks[name], board_sample(board)[0])

        def chat(client: httpx.Client, n: int) -> tuple[int, float]:
            started = time.monotonic()
            response = client.post("/api/chat", json={
                "model": "alpha", "stream": False,
                "messages": [{"role": "user", "content": f"burst request {n}"}]})
            return response.status_code, time.monotonic() - started

        with running_nginx(balancer) as base, httpx.Client(base_url=base, timeout=60) as client:
            sampler = threading.Thread(target=sample)
            sampler.start()
            with ThreadPoolExecutor(max_workers=4 * SPILL_CAPACITY) as pool:
                results = list(pool.map(lambda n: chat(client, n), range(4 * SPILL_CAPACITY)))
            sampling = False
            sampler.join()
        refusals = sum(board_sample(board)[1] for board in boards.values())
    slowest = max(elapsed for _, elapsed in results)
    print(f"{len(results)} Ollama requests (capacity {2 * SPILL_CAPACITY}): "
          f"{sum(status == 200 for status, _ in results)} answered 200, slowest {slowest:.1f}s; "
          f"board queue peaks {peaks}, queue_full refusals {refusals:.0f}")
    assert [status for status, _ in results if status != 200] == []
    assert slowest < SPILL_WAIT_SECONDS + 2
    # Shared slots alone would queue at most 1 request on a board (1 running + 1 waiting): 3 waiting
    # means the waiting requests also took the home slots, and never more than the board holds.
    assert max(peaks.values()) == SPILL_CAPACITY - 1
    assert refusals == 0
