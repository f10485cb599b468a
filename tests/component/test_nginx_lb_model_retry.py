"""nginx_lb while its model map is behind the boards (a model just added or removed): a board's 404
for a model it lacks is retried on the next board, at most once per board; a 404 for a request that
names no model is final. Real nginx in front of real rkllm-server boards (the C double) on loopback.

Boards: b1 and b2 host alpha and fresh (just added), b3 hosts alpha only.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from balancer_harness import (
    Board,
    BoardModel,
    RenderedBalancer,
    access_log_size,
    logged_upstreams,
    render_balancers,
    running_boards,
    running_nginx,
)

FLEET = {
    "b1": [BoardModel("alpha"), BoardModel("fresh")],
    "b2": [BoardModel("alpha"), BoardModel("fresh")],
    "b3": [BoardModel("alpha")],
}
_requests = itertools.count()


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory, double_library_path: Path) -> Iterator[dict[str, Board]]:
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path, FLEET) as started:
        yield started


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory,
              boards: dict[str, Board]) -> dict[str, RenderedBalancer]:
    """"before": rendered before fresh was added (the map knows alpha only); "wrong": a map that puts
    fresh on b1 and b3, as when b3 had it removed before the map followed."""
    workdir = tmp_path_factory.mktemp("lb")
    before = [dataclasses.replace(b, models=["alpha"]) for b in boards.values()]
    wrong = [dataclasses.replace(b, models=["alpha", "fresh"] if b.name != "b2" else ["alpha"])
             for b in boards.values()]
    return {**render_balancers(workdir / "before", before, {"before": {}}),
            **render_balancers(workdir / "wrong", wrong, {"wrong": {}})}


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": f"retry {next(_requests)}"}],
            "max_tokens": 2}


def upstream_statuses(balancer: RenderedBalancer, offset: int,
                      count: int) -> list[tuple[list[str], list[str]]]:
    """(boards tried, their statuses) of the `count` requests logged after `offset`."""
    return [(addresses.split(", "), statuses.split(", "))
            for addresses, statuses in logged_upstreams(balancer, offset, count)]


@pytest.mark.parametrize("variant", ["before", "wrong"])
def test_a_boards_model_not_found_is_retried_on_a_board_that_has_the_model(
        balancers: dict[str, RenderedBalancer], boards: dict[str, Board], variant: str) -> None:
    balancer = balancers[variant]
    b3 = f"127.0.0.1:{boards['b3'].port}"
    with running_nginx(balancer) as base:
        offset = access_log_size(balancer)
        url = f"{base}/v1/chat/completions"
        replies = [httpx.post(url, json=chat("fresh"), timeout=30) for _ in range(9)]
        assert [r.status_code for r in replies] == [200] * 9, [r.text for r in replies]
        tried = upstream_statuses(balancer, offset, len(replies))
    # b3 was asked (least_conn spreads the requests) and its 404 passed the request on.
    retried = [(addresses, statuses) for addresses, statuses in tried if statuses[0] == "404"]
    assert retried, tried
    assert all(addresses[0] == b3 and statuses[-1] == "200" for addresses, statuses in retried)


def test_a_model_no_board_has_tries_each_board_once_and_answers_404(
        balancers: dict[str, RenderedBalancer], boards: dict[str, Board]) -> None:
    balancer = balancers["before"]
    with running_nginx(balancer) as base:
        offset = access_log_size(balancer)
        reply = httpx.post(f"{base}/v1/chat/completions", json=chat("no-such-model"), timeout=30)
        tried = upstream_statuses(balancer, offset, 1)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"
    [(addresses, statuses)] = tried
    assert statuses == ["404"] * 3
    assert sorted(addresses) == sorted(f"127.0.0.1:{b.port}" for b in boards.values())


def test_a_404_for_a_request_naming_no_model_is_not_retried(balancers: dict[str, RenderedBalancer]) -> None:
    balancer = balancers["before"]
    with running_nginx(balancer) as base:
        offset = access_log_size(balancer)
        reply = httpx.get(f"{base}/v1/responses/resp_123", timeout=30)
        tried = upstream_statuses(balancer, offset, 1)
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "response_not_found"
    assert [statuses for _, statuses in tried] == [["404"]]
