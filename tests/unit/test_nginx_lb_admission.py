"""nginx_lb's admission: each balancer's max_conns per board is its share of the board's capacity (the
shares of the balancers in the group add up to exactly that capacity), and when every board is full
Ollama requests wait at the balancer for a free board while OpenAI requests get 503 + Retry-After."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def lb(tmp_path_factory: pytest.TempPathFactory, double_library_path: Path) -> Iterator[str]:
    """One board, one request at a time (max_conns 1), Ollama requests waiting up to WAIT_SECONDS."""
    fleet = {"b1": [BoardModel("alpha", tokens_per_second=TOKENS_PER_SECOND, reply_tokens=2000)]}
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path, fleet) as boards:
        balancer = render_balancer(tmp_path_factory.mktemp("lb"), list(boards.values()),
                                   nginx_lb_upstream_max_conns=1, nginx_lb_ollama_wait_seconds=WAIT_SECONDS,
                                   nginx_lb_conversation_affinity=False)
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
