"""Conversation affinity of nginx_lb, rendered by Ansible and run as a real nginx in front of three real
rkllm-server boards (the C double): a conversation's turns go back to the board holding its KV cache,
new conversations to the least-loaded board, and a drained or killed home board hands the
conversation over once.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from balancer_harness import (
    Board,
    BoardModel,
    RenderedBalancer,
    access_log_size,
    logged_matches,
    reload_nginx,
    render_balancers,
    running_boards,
    running_nginx,
)
from server_client import cached

from tests.support import free_port, wait_until

# 200 tok/s: a 400-token stream holds a board for 2 s. Queues let a board take every conversation.
MODEL = BoardModel("alpha", tokens_per_second=200, reply_tokens=400, queue_size=8)
FLEET = {name: [MODEL] for name in ("b1", "b2", "b3")}
_numbers = itertools.count()


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory, double_library_path: Path) -> Iterator[dict[str, Board]]:
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path, FLEET) as started:
        yield started


def variants(workdir: Path) -> dict[str, dict[str, object]]:
    return {"affinity": {"nginx_lb_affinity_dir": str(workdir / "table")},
            "least_conn": {"nginx_lb_conversation_affinity": False}}


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory,
              boards: dict[str, Board]) -> dict[str, RenderedBalancer]:
    workdir = tmp_path_factory.mktemp("lb")
    return render_balancers(workdir, list(boards.values()), variants(workdir))


class Conversation:
    """A chat sent turn by turn with its whole history, as OpenAI and Ollama clients send it."""

    def __init__(self, base: str, **fields: object) -> None:
        self.base = base
        self.fields = fields
        self.headers: dict[str, str] = {}
        self.messages = [{"role": "system", "content": f"conversation {next(_numbers)}"}]

    def turn(self, text: str = "next question", *, max_tokens: int = 4) -> dict[str, object]:
        self.messages.append({"role": "user", "content": text})
        response = httpx.post(f"{self.base}/v1/chat/completions", headers=self.headers, timeout=60,
                              json={"model": MODEL.name, "messages": self.messages, "max_tokens": max_tokens,
                                    **self.fields})
        assert response.status_code == 200, response.text
        answer: dict[str, object] = response.json()
        self.messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        return answer


POSTED_UPSTREAMS = re.compile(r'"POST (\S+) [^"]*" .*? ua="([^"]*)"')


def requests_and_boards(balancer: RenderedBalancer, boards: dict[str, Board], offset: int, count: int = 1
                        ) -> list[tuple[str, str]]:
    """(URI, answering board: the last address nginx tried) of the requests logged after `offset`, once
    there are `count` of them (nginx logs a request after the client may already have its answer)."""
    by_address = {f"127.0.0.1:{b.port}": name for name, b in boards.items()}
    tried_by_uri = logged_matches(balancer, offset, count, POSTED_UPSTREAMS)
    return [(uri, by_address[re.split(r", | : ", tried)[-1]]) for uri, tried in tried_by_uri]


def answering_boards(balancer: RenderedBalancer, boards: dict[str, Board], offset: int) -> list[str]:
    """The board that answered the one request logged after `offset`."""
    return [board for _, board in requests_and_boards(balancer, boards, offset)]


def table(balancer: RenderedBalancer) -> set[str]:
    return {entry.name for entry in (balancer.prefix.parent / "table").iterdir()}


@pytest.mark.parametrize("routing", ["affinity", "least_conn"])
def test_interleaved_conversations_stick_to_their_boards_only_with_affinity(
        balancers: dict[str, RenderedBalancer], boards: dict[str, Board], routing: str) -> None:
    balancer = balancers[routing]
    with running_nginx(balancer) as base:
        chats = [Conversation(base) for _ in range(2)]
        homes: list[set[str]] = [set() for _ in chats]
        hits = 0
        for turn in range(4):
            for chat, home in zip(chats, homes, strict=True):
                offset = access_log_size(balancer)
                answer = chat.turn(f"question {turn}")
                home.update(answering_boards(balancer, boards, offset))
                hits += cached(answer) > 0
    if routing == "affinity":
        assert all(len(home) == 1 for home in homes), homes
        assert homes[0] != homes[1]  # placed apart on idle boards
        # Every turn after the first continues the board's cache.
        assert hits == 2 * 3
    else:
        # least_conn on idle boards rotates: the same conversations wander (what affinity prevents).
        assert any(len(home) > 1 for home in homes), homes


def test_a_new_conversation_goes_to_the_least_loaded_board(balancers: dict[str, RenderedBalancer],
                                                           boards: dict[str, Board]) -> None:
    balancer = balancers["affinity"]
    with running_nginx(balancer) as base:
        streaming = threading.Barrier(3)
        offset = access_log_size(balancer)

        def long_stream() -> None:
            body = {"model": MODEL.name, "stream": True, "max_tokens": 400,
                    "messages": [{"role": "user", "content": f"long request {next(_numbers)}"}]}
            with httpx.stream("POST", f"{base}/v1/chat/completions?long", json=body, timeout=60) as response:
                lines = response.iter_lines()
                next(lines)
                streaming.wait()
                for _ in lines:
                    pass

        streams = [threading.Thread(target=long_stream) for _ in range(2)]
        for stream in streams:
            stream.start()
        streaming.wait()
        chat = Conversation(base)
        chat.turn()
        for stream in streams:
            stream.join()
        served = requests_and_boards(balancer, boards, offset, count=3)
        loaded = {board for uri, board in served if uri.endswith("?long")}
        placed = [board for uri, board in served if not uri.endswith("?long")]
        assert len(loaded) == 2 and len(placed) == 1 and placed[0] not in loaded, served
        # Once the load is gone the conversation still goes home.
        later = access_log_size(balancer)
        assert cached(chat.turn()) > 0
        assert answering_boards(balancer, boards, later) == placed


def test_key_precedence_prompt_cache_key_then_user_then_session_header_then_head(
        balancers: dict[str, RenderedBalancer]) -> None:
    balancer = balancers["affinity"]
    tag = next(_numbers)
    with running_nginx(balancer) as base:
        def new_entries(before: set[str], fields: dict[str, object], session: str = "") -> set[str]:
            chat = Conversation(base, **fields)
            if session:
                chat.headers["X-Session-Id"] = session
            chat.turn()
            return table(balancer) - before

        start = table(balancer)
        everything = {"prompt_cache_key": f"pck-{tag}", "user": f"user-{tag}"}
        keyed = new_entries(start, everything, session=f"sid-{tag}")
        assert len(keyed) == 1
        # Same prompt_cache_key, other user, session and messages: the same conversation.
        same_key = {"prompt_cache_key": f"pck-{tag}", "user": "someone else"}
        assert new_entries(start, same_key, session="other") == keyed
        # Without prompt_cache_key the user names the conversation, above the session header.
        by_user = new_entries(start | keyed, {"user": f"user-{tag}"}, session=f"sid-{tag}")
        assert len(by_user) == 1
        assert new_entries(start | keyed, {"user": f"user-{tag}"}, session="other") == by_user
        # Then the X-Session-Id header.
        known = start | keyed | by_user
        by_session = new_entries(known, {}, session=f"sid-{tag}")
        assert len(by_session) == 1
        assert new_entries(known, {}, session=f"sid-{tag}") == by_session
        # Then the conversation's head: its second turn (same system and first message) adds nothing.
        known |= by_session
        chat = Conversation(base)
        chat.turn("the first question")
        by_head = table(balancer) - known
        assert len(by_head) == 1
        chat.turn("a follow-up")
        assert table(balancer) - known == by_head


def test_stateless_requests_still_spread_over_every_board(balancers: dict[str, RenderedBalancer],
                                                          boards: dict[str, Board]) -> None:
    balancer = balancers["affinity"]
    with running_nginx(balancer) as base:
        offset = access_log_size(balancer)
        for _ in range(6):
            Conversation(base).turn()
        assert set(answering_boards(balancer, boards, offset)) == set(boards)


@pytest.fixture
def own_boards(tmp_path: Path, double_library_path: Path) -> Iterator[dict[str, Board]]:
    """Boards of one test only: it drains or kills one of them."""
    with running_boards(tmp_path / "boards", double_library_path, FLEET) as started:
        yield started


def moved_once_then_stays(balancer: RenderedBalancer, boards: dict[str, Board], chat: Conversation,
                          home: str, take_out: object) -> None:
    """`take_out()` removes `home`; the next turn re-prefills on another board, later turns stay there."""
    assert callable(take_out)
    take_out()
    offset = access_log_size(balancer)
    moved = chat.turn("after the move")
    new_home = answering_boards(balancer, boards, offset)
    assert new_home[0] != home
    assert cached(moved) == 0  # the new board prefilled the whole history once
    for turn in range(3):
        offset = access_log_size(balancer)
        assert cached(chat.turn(f"settled {turn}")) > 0
        assert answering_boards(balancer, boards, offset) == new_home


def test_a_drained_home_board_hands_the_conversation_over_once(tmp_path: Path,
                                                               own_boards: dict[str, Board]) -> None:
    balancer = render_balancers(tmp_path / "lb", list(own_boards.values()), variants(tmp_path))["affinity"]
    with running_nginx(balancer) as base:
        chat = Conversation(base)
        offset = access_log_size(balancer)
        chat.turn()
        home = answering_boards(balancer, own_boards, offset)[0]
        drain_file = own_boards[home].drain_file
        assert drain_file is not None
        moved_once_then_stays(balancer, own_boards, chat, home, drain_file.touch)
        # Back from maintenance, the old board does not take the conversation back.
        drain_file.unlink()
        offset = access_log_size(balancer)
        chat.turn("after the resume")
        assert home not in answering_boards(balancer, own_boards, offset)


def test_a_killed_home_board_hands_the_conversation_over_once(tmp_path: Path,
                                                              own_boards: dict[str, Board]) -> None:
    balancer = render_balancers(tmp_path / "lb", list(own_boards.values()), variants(tmp_path))["affinity"]
    with running_nginx(balancer) as base:
        chat = Conversation(base)
        offset = access_log_size(balancer)
        chat.turn()
        home = answering_boards(balancer, own_boards, offset)[0]
        moved_once_then_stays(balancer, own_boards, chat, home,
                              lambda: os.kill(own_boards[home].pid, signal.SIGKILL))


def workers(balancer: RenderedBalancer) -> set[str]:
    master = (balancer.prefix / "nginx.pid").read_text().strip()
    return set(Path(f"/proc/{master}/task/{master}/children").read_text().split())


def reload_and_wait(balancer: RenderedBalancer, conf: Path) -> None:
    """Reload nginx with `conf` and return once every worker of the old configuration has exited."""
    old = workers(balancer)
    reload_nginx(balancer, conf)
    wait_until(lambda: not old & workers(balancer),
               "the old nginx workers gone", deadline_s=15, interval=0.05)


def test_a_board_drained_in_the_inventory_hands_its_conversations_over_once(
        tmp_path: Path, boards: dict[str, Board]) -> None:
    workdir = tmp_path / "lb"
    live = workdir / "live"
    # Each variant is the live balancer's configuration at one moment (same port, paths and table).
    # (each keeps its own njs file, which its nginx.conf imports by absolute path).
    shared = {"nginx_lb_http_port": free_port(), "nginx_lb_pid_path": str(live / "nginx.pid"),
              "nginx_lb_log_dir": str(live / "log"), "nginx_lb_state_dir": str(live / "state"),
              "nginx_lb_affinity_dir": str(tmp_path / "table")}
    drained = {f"without_{name}": {**shared, "nginx_lb_drained_boards": [name]} for name in boards}
    rendered = render_balancers(workdir, list(boards.values()), {"live": shared, "back": shared, **drained})
    balancer = rendered["live"]
    with running_nginx(balancer) as base:
        chat = Conversation(base)
        offset = access_log_size(balancer)
        chat.turn()
        home = answering_boards(balancer, boards, offset)[0]

        moved_once_then_stays(balancer, boards, chat, home,
                              lambda: reload_and_wait(balancer, rendered[f"without_{home}"].conf))
        # The board is back in the inventory: the conversation stays on its new board.
        reload_and_wait(balancer, rendered["back"].conf)
        offset = access_log_size(balancer)
        chat.turn("after the board came back")
        assert home not in answering_boards(balancer, boards, offset)


def test_rendered_affinity_splits_each_board_between_home_and_shared_upstreams(
        balancers: dict[str, RenderedBalancer], boards: dict[str, Board]) -> None:
    conf = balancers["affinity"].conf.read_text()
    for board in boards.values():
        server = f"server 127.0.0.1:{board.port} "
        caps = [int(cap) for cap in re.findall(re.escape(server) + r"[^;]*max_conns=(\d+)", conf)]
        # rkllm_all (least_conn) and the board's home upstream: together the board's capacity of 9.
        assert sorted(caps) == [4, 5]
    assert "js_header_filter rkllm.learn;" in conf
    plain = balancers["least_conn"].conf.read_text()
    assert "rkllm_home_" not in plain and "rkllm.learn" not in plain and " max_conns=9" in plain
