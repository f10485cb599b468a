"""KV slots: several conversations' caches per model, over the real binding and the C double.

The double's replies depend on everything in the handle's KV cache (tests/fakelib/README.md), so a
turn that continued the wrong conversation's cache answers differently from the same conversation
prefilled whole on a server that never reuses its cache.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from balancer_harness import ANSIBLE_PLAYBOOK, local_host
from server_client import Conversation, cached, metric, samples
from server_harness import QWEN, log_lines, model_entry, render_server_config, start_server

from rkllm_runtime.config import load_config, parse_config
from rkllm_runtime.registry import KvSlot, LoadedModel
from rkllm_runtime.slot_policy import choose_slot, continues
from tests.support import REPO_ROOT

__all__ = ["start_server"]

def run_handles(double_log) -> list[str]:
    """The double's handle id of every rkllm_run, in order."""
    return [re.search(r"handle=(\d+)", line).group(1) for line in log_lines(double_log, "RUN")]


def slot_states(http: httpx.Client) -> dict[str, str]:
    """slot index -> the state whose series is 1."""
    values = samples(http.get("/metrics").text)
    return {
        dict(labels)["slot"]: dict(labels)["state"]
        for (name, labels), value in values.items()
        if name == "rkllm_kv_slot_state" and dict(labels)["model"] == QWEN and value == 1
    }


# --- slot choice, as a pure function -------------------------------------------------------------

NOW = 1000.0  # time.monotonic() of the choice in these tests; slots were last used a little before


def loaded_with(
    texts: list[str],
    last_used: list[float],
    kv_cache_reuse: bool = True,
    conversations: frozenset[int] = frozenset(),
    keep_seconds: float = 300.0,
) -> LoadedModel:
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "path": "/m",
                    "kv_slots": len(texts),
                    "kv_cache_reuse": kv_cache_reuse,
                    "kv_slot_keep_seconds": keep_seconds,
                }
            ]
        }
    )
    slots = [
        KvSlot(index, engine=None, kv_text=text, last_used=used, conversation=index in conversations)  # type: ignore[arg-type]
        for index, (text, used) in enumerate(zip(texts, last_used, strict=True))
    ]
    return LoadedModel(config.models[0], slots, load_seconds=0.0, loaded_at=0.0)


def chosen(model: LoadedModel, prompt: str, tools_json: str = "", now: float = NOW) -> int:
    return choose_slot(model, prompt, tools_json, now).index


def serve(model: LoadedModel, prompt: str, now: float, later_turn: bool = False) -> int:
    """What the scheduler does to the slots around one request; returns the slot it ran on."""
    slot = choose_slot(model, prompt, "", now)
    slot.conversation = continues(slot, prompt, "") or later_turn
    slot.kv_text, slot.last_used = f"{prompt}<reply>", now
    return slot.index


def test_the_slot_holding_the_longest_prefix_wins():
    model = loaded_with(["<a>", "<a><b>", "<c>"], last_used=[998.0, 996.0, 997.0], conversations={2})
    assert chosen(model, "<a><b><d>") == 1
    assert chosen(model, "<a><x>") == 0
    assert chosen(model, "<c><more>") == 2


def test_a_new_conversation_takes_an_empty_slot_before_evicting():
    model = loaded_with(["<a>", "", "<c>"], last_used=[991.0, 995.0, 992.0])
    assert chosen(model, "<new>") == 1


def test_without_an_empty_slot_the_least_recently_used_one_turn_cache_goes():
    model = loaded_with(["<a>", "<b>", "<c>"], last_used=[998.0, 996.0, 997.0])
    assert chosen(model, "<new>") == 1


def test_a_conversation_is_evicted_only_when_every_slot_holds_one():
    model = loaded_with(["<a>", "<b>", "<c>"], last_used=[990.0, 995.0, 999.0], conversations={0, 1})
    assert chosen(model, "<new>") == 2, "the one-turn cache, although the most recently used"
    model.slots[2].conversation = True
    assert chosen(model, "<new>") == 0, "then the least recently used conversation"


def test_protection_ends_after_the_keep_window():
    model = loaded_with(["<a>", "<b>"], last_used=[NOW - 301.0, NOW - 5.0], conversations={0})
    assert chosen(model, "<new>") == 0, "idle past the window: its user is gone"
    assert chosen(model, "<new>", now=NOW - 2.0) == 1, "inside the window the one-turn cache goes first"


def test_keep_seconds_zero_is_plain_least_recently_used():
    model = loaded_with(["<a>", "<b>", "<c>"], [997.0, 999.0, 998.0], conversations={0}, keep_seconds=0)
    assert chosen(model, "<new>") == 0


@pytest.mark.parametrize(("keep_seconds", "survives"), [(300.0, True), (0.0, False)])
def test_a_conversation_survives_a_stream_of_one_turn_requests(keep_seconds, survives):
    model = loaded_with(["", ""], [0.0, 0.0], keep_seconds=keep_seconds)
    history = "<sys><q1>"
    serve(model, history, now=100.0)  # its first turn looks like any one-turn request
    history += "<reply><q2>"
    home = serve(model, history, now=101.0)  # the second continues it: a conversation now
    for second in range(20):  # the user reads the answer while other users ask one question each
        serve(model, f"<sys><one-shot {second}>", now=102.0 + second)
    history += "<reply><q3>"
    slot = choose_slot(model, history, "", 130.0)
    assert continues(slot, history, "") == survives
    assert slot.index == home or not survives


def test_a_first_turn_lives_as_long_as_least_recently_used_keeps_it():
    model = loaded_with(["", ""], [0.0, 0.0])
    serve(model, "<sys><q1>", now=100.0)
    serve(model, "<sys><one-shot 1>", now=101.0)  # the empty slot
    second_turn = "<sys><q1><reply><q2>"
    assert continues(choose_slot(model, second_turn, "", 102.0), second_turn, "")
    serve(model, "<sys><one-shot 2>", now=102.0)  # the least recently used: the first turn
    assert not continues(choose_slot(model, second_turn, "", 103.0), second_turn, "")


def test_a_later_turn_that_missed_is_kept_at_once():
    """A conversation that moved boards (or lost its first turn) prefills its history once, then keeps it."""
    model = loaded_with(["<x>", "<y>"], [90.0, 91.0])
    history = "<sys><q1><reply><q2>"
    serve(model, history, now=100.0, later_turn=True)
    for second in range(5):
        serve(model, f"<sys><one-shot {second}>", now=101.0 + second)
    history += "<reply><q3>"
    assert continues(choose_slot(model, history, "", 110.0), history, "")


def test_a_cache_built_under_other_tools_is_not_continued():
    tools = '[{"type": "function"}]'
    model = loaded_with(["<a>", "<b>"], last_used=[999.0, 991.0])
    model.slots[0].tools_json = tools
    assert chosen(model, "<a><more>", tools) == 0
    assert chosen(model, "<a><more>") == 1, "the least recently used, not a continuation"


def test_with_cache_reuse_off_no_slot_is_continued():
    model = loaded_with(["<a>", "<b>"], last_used=[999.0, 991.0], kv_cache_reuse=False)
    assert chosen(model, "<a><more>") == 1


# --- end to end: the real server, binding and double ---------------------------------------------


def test_interleaved_conversations_each_continue_their_own_history(start_server, make_model, double_log):
    slotted = start_server([model_entry(make_model, QWEN, config={"kv_slots": 2})])
    fresh = start_server([model_entry(make_model, QWEN, config={"kv_cache_reuse": False})])
    first, second = Conversation("about boards"), Conversation("about fleets")
    with slotted.http() as http:
        for index in range(1, 5):
            for conversation in (first, second):
                body = conversation.turn(http, index)
                assert (cached(body) > 0) == (index > 1), (conversation.opening, index, body["usage"])
        evictions = metric(http, "rkllm_kv_slot_evictions_total")
    handles = run_handles(double_log)
    assert handles[0::2] == [handles[0]] * 4 and handles[1::2] == [handles[1]] * 4 != handles[0::2], handles
    assert evictions == 0
    # The same conversations prefilled whole on a server that never reuses a cache.
    with fresh.http() as http:
        for conversation in (first, second):
            replay = Conversation(conversation.opening)
            for index in range(1, 5):
                replay.turn(http, index)
            assert replay.messages == conversation.messages, "a slotted turn continued someone else's history"


def test_slots_still_run_one_generation_at_a_time(start_server, make_model, double_log):
    server = start_server(
        [model_entry(make_model, QWEN, decode_tokens_per_second=200, reply_tokens=10, config={"kv_slots": 2})]
    )
    conversations = [Conversation(f"client {i}") for i in range(4)]
    with server.http() as http, ThreadPoolExecutor(len(conversations)) as pool:
        for index in (1, 2):
            bodies = list(pool.map(Conversation.turn, conversations, [http] * 4, [index] * 4))
            assert all(body["choices"][0]["message"]["content"] for body in bodies)
    events = [line.split()[0] for line in log_lines(double_log, "") if line.split()[0] in ("RUN", "FINISH")]
    assert len(events) == 16 and events == ["RUN", "FINISH"] * 8, "two runs overlapped on the NPU"
    assert log_lines(double_log, "VIOLATION") == []


def test_one_slot_shared_by_two_conversations_evicts_every_turn(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    first, second = Conversation("about boards"), Conversation("about fleets")
    with server.http() as http:
        bodies = [conversation.turn(http, index) for index in (1, 2, 3) for conversation in (first, second)]
        assert [cached(body) for body in bodies] == [0] * 6
        assert metric(http, "rkllm_kv_slot_evictions_total") == 5
        assert metric(http, "rkllm_prompt_tokens_cached_total") == 0


def test_a_one_turn_cache_is_evicted_before_a_conversation(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, config={"kv_slots": 2})])
    a, b, c = Conversation("a"), Conversation("b"), Conversation("c")
    with server.http() as http:
        a.turn(http, 1)
        b.turn(http, 1)
        assert cached(a.turn(http, 2)) > 0  # a's slot now holds a conversation
        c.turn(http, 1)  # both slots are taken: b's holds one turn only
        assert metric(http, "rkllm_kv_slot_evictions_total") == 1
        assert cached(a.turn(http, 3)) > 0, "a's slot was kept"
        assert cached(b.turn(http, 2)) == 0, "b's cache was the one reused"
        assert cached(c.turn(http, 2)) == 0, "b took c's one-turn slot, not a's conversation"
        assert metric(http, "rkllm_kv_slot_evictions_total") == 3
        # b's second turn carried a reply, so its slot holds a conversation too: c evicts the least
        # recently used of the two, and that is counted as a conversation lost.
        assert metric(http, "rkllm_kv_slot_conversation_evictions_total") == 1


@pytest.mark.parametrize(("keep_seconds", "kept"), [(300.0, True), (0.0, False)])
def test_a_conversation_keeps_its_cache_among_one_turn_requests(
    start_server, make_model, keep_seconds, kept
):
    """Other users' one-shot questions to the same model recycle the other slot; the conversation keeps
    its own from its second turn on, and every reply continues its own history (compared with a server
    that never reuses a cache)."""
    config = {"kv_slots": 2, "kv_slot_keep_seconds": keep_seconds}
    slotted = start_server([model_entry(make_model, QWEN, config=config)])
    fresh = start_server([model_entry(make_model, QWEN, config={"kv_cache_reuse": False})])
    chat, one_shots = Conversation("a long chat"), []
    with slotted.http() as http:
        for index in range(1, 7):
            hit = cached(chat.turn(http, index)) > 0
            # Two one-shots took both slots after turn 1; turn 2 carries a reply, so its slot is kept.
            assert hit == (index > 2 and kept), (index, hit)
            for other in range(2):
                one_shot = Conversation(f"one question {index}.{other}")
                one_shot.turn(http, 1)
                one_shots.append(one_shot)
        lost = metric(http, "rkllm_kv_slot_conversation_evictions_total")
    assert lost == 0, "no conversation was evicted while a one-turn slot was there to reuse"
    with fresh.http() as http:
        for original in [chat, *one_shots[-2:]]:
            replay = Conversation(original.opening)
            for index in range(1, len(original.messages) // 2 + 1):
                replay.turn(http, index)
            assert replay.messages == original.messages, f"{original.opening}: a reply crossed slots"


@pytest.mark.parametrize("slots", [1, 2])
def test_ready_leaves_conversation_caches_alone(start_server, make_model, double_log, slots):
    server = start_server([model_entry(make_model, QWEN, config={"kv_slots": slots, "pinned": True})])
    conversation = Conversation("kept")
    with server.http() as http:
        conversation.turn(http, 1)
        holder = f"handle={run_handles(double_log)[-1]} "
        before = log_lines(double_log, "")
        for _ in range(3):
            ready = http.get("/ready")
            assert ready.status_code == 200 and ready.json()["models"] == {QWEN: "ok"}, ready.text
        during = log_lines(double_log, "")[len(before) :]
        assert [line for line in during if holder in line] == [], "its handle was neither run nor cleared"
        # With an empty slot the probe generates there; a slot holding a conversation is only queried.
        assert sum(line.startswith("RUN") for line in during) == (3 if slots == 2 else 0)
        assert cached(conversation.turn(http, 2)) > 0, "the conversation's cache survived /ready"


def test_ready_reinitialises_only_the_broken_slot(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, config={"kv_slots": 2, "pinned": True})])
    conversation = Conversation("survivor")
    with server.http() as http:
        conversation.turn(http, 1)
        model = server.scheduler.registry.get(QWEN)
        broken = next(slot for slot in model.slots if not slot.kv_text)
        broken.engine.close()  # the handle is gone behind the server's back
        assert http.get("/ready").status_code == 200
        assert len(log_lines(double_log, "INIT")) == 3, "one fresh handle besides the two slots"
        assert cached(conversation.turn(http, 2)) > 0


def test_the_memory_budget_counts_every_slot(start_server, make_model, double_log):
    other = "Other-Model"
    server = start_server(
        [
            model_entry(make_model, QWEN, memory_mb=400, config={"memory_mb": 400, "kv_slots": 2}),
            model_entry(make_model, other, memory_mb=400, config={"memory_mb": 400}),
            model_entry(make_model, "Too-Big", memory_mb=400, config={"memory_mb": 400, "kv_slots": 3}),
        ],
        npu_memory_budget_mb=1000,
    )
    with server.http() as http:
        assert Conversation("q").turn(http, 1)["model"] == QWEN
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [QWEN]
        # 800 MB held by two slots: another 400 MB model does not fit beside them.
        answer = http.post(
            "/v1/chat/completions", json={"model": other, "messages": [{"role": "user", "content": "x"}]}
        )
        assert answer.status_code == 200, answer.text
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [other], (
            "the idle slots were evicted"
        )
        too_big = http.post(
            "/v1/chat/completions", json={"model": "Too-Big", "messages": [{"role": "user", "content": "x"}]}
        )
        assert too_big.status_code == 503 and "3 KV slots" in too_big.text, too_big.text
        assert [m["name"] for m in http.get("/api/ps").json()["models"]] == [other], "nothing evicted for it"
        assert metric(http, "rkllm_model_memory_bytes") == 0
    assert len(log_lines(double_log, "INIT")) == 3


def test_slots_that_overflow_one_npu_domain_go_to_the_next(start_server, make_model, double_log):
    server = start_server(
        [model_entry(make_model, QWEN, memory_mb=3000, config={"memory_mb": 3000, "kv_slots": 2})]
    )
    with server.http() as http:
        assert Conversation("big").turn(http, 1)["choices"][0]["message"]["content"]
        assert metric(http, "rkllm_model_memory_bytes") == 2 * 3000 * 1024 * 1024
    domains = [re.search(r"base_domain_id=(\d+)", line).group(1) for line in log_lines(double_log, "INIT")]
    assert domains == ["0", "1"]


def test_cache_and_slot_metrics_follow_the_conversations(start_server, make_model):
    server = start_server(
        [model_entry(make_model, QWEN, decode_tokens_per_second=100, reply_tokens=30, config={"kv_slots": 2})]
    )
    conversation = Conversation("metered")
    with server.http() as http:
        assert slot_states(http) == {}, "no slot exists before the model loads"
        first = conversation.turn(http, 1)
        assert slot_states(http) == {"0": "holding", "1": "empty"}
        second = conversation.turn(http, 2)
        assert metric(http, "rkllm_prompt_tokens_cached_total") == cached(second) > 0
        prefilled = metric(http, "rkllm_prompt_tokens_total")
        assert prefilled == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"] - cached(
            second
        )
        conversation.messages.append({"role": "user", "content": "and streaming?"})
        with http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": QWEN, "messages": conversation.messages, "stream": True},
        ) as streamed:
            # Keep the iterator: closing it would close the stream and abort the run.
            lines = streamed.iter_lines()
            assert '"content"' in next(lines)
            assert slot_states(http) == {"0": "running", "1": "empty"}
            assert "data: [DONE]" in list(lines)
        assert slot_states(http) == {"0": "holding", "1": "empty"}
        unload = http.post("/api/generate", json={"model": QWEN, "prompt": "", "keep_alive": 0})
        assert unload.status_code == 200
        assert slot_states(http) == {}


# --- the roles: slot counts from the board's RAM, rendered into the server config ----------------

CHOICE_PLAY = """\
- name: Choose the KV slots as rkllm_models does
  hosts: all
  gather_facts: false
  tasks:
    - name: Include the choice
      ansible.builtin.include_role:
        name: rkllm_models
        tasks_from: kv_slots
    - name: Write it down
      ansible.builtin.copy:
        content: "{{ _rkllm_models_kv_slots | to_json }}"
        dest: "{{ choice_path }}"
        mode: "0644"
"""
BOTH = ["Qwen2.5-1.5B-Instruct", "DeepSeek-R1-Distill-Qwen-1.5B"]  # 1660 MB each in the catalog


def choose_slots(workdir: Path, mem_total_kb: int, **role_vars: Any) -> dict[str, int]:
    """Run rkllm_models' KV slot choice and RAM check on this machine against a fake meminfo."""
    workdir.mkdir(parents=True, exist_ok=True)
    meminfo = workdir / "meminfo"
    meminfo.write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        {mem_total_kb // 2} kB\n")
    host = {
        **local_host(),
        "rkllm_models_meminfo_path": str(meminfo),
        "choice_path": str(workdir / "choice.json"),
    }
    (workdir / "inventory.json").write_text(json.dumps({"all": {"hosts": {"board1": host}}}))
    (workdir / "vars.json").write_text(json.dumps(role_vars))
    (workdir / "play.yml").write_text(CHOICE_PLAY)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO_ROOT / "roles"), "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", "inventory.json", "-e", "@vars.json", "play.yml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    return dict(json.loads((workdir / "choice.json").read_text()))


@pytest.mark.parametrize(
    ("mem_total_kb", "role_vars", "expected"),
    [
        # 8192 - 1024 reserved = 7168 MB: both models twice (6640 MB).
        (8388608, {"rkllm_models_enabled": BOTH}, {BOTH[0]: 2, BOTH[1]: 2}),
        # 4096 - 1024 = 3072 MB: one copy each is all there is room for.
        (4194304, {"rkllm_models_enabled": BOTH[:1]}, {BOTH[0]: 1}),
        (
            16777216,
            {"rkllm_models_enabled": BOTH, "rkllm_models_kv_slots_target": 3},
            {BOTH[0]: 3, BOTH[1]: 3},
        ),
        # A fixed count is served first; the other model gets what is left.
        (
            8388608,
            {"rkllm_models_enabled": BOTH, "rkllm_server_model_settings": {BOTH[0]: {"kv_slots": 3}}},
            {BOTH[0]: 3, BOTH[1]: 1},
        ),
    ],
)
def test_the_models_role_chooses_slots_from_the_boards_ram(tmp_path, mem_total_kb, role_vars, expected):
    assert choose_slots(tmp_path, mem_total_kb, **role_vars) == expected


def test_the_ram_preflight_counts_every_slot(tmp_path):
    settings = {BOTH[0]: {"kv_slots": 5}}
    with pytest.raises(RuntimeError) as refused:
        choose_slots(tmp_path, 8388608, rkllm_models_enabled=BOTH[:1], rkllm_server_model_settings=settings)
    assert (
        "board1: model Qwen2.5-1.5B-Instruct needs 8300 MB of RAM (5 KV slots of 1660 MB) but the board has "
        "8192 MB"
    ) in " ".join(str(refused.value).split())


def test_the_server_role_renders_the_chosen_slots_and_its_override(tmp_path, make_model):
    model = {"name": QWEN, "path": str(make_model("q")), "kind": "quick", "memory_mb": 1660, "kv_slots": 2}
    other = {**model, "name": "Other", "kv_slots": 2}
    config_path = render_server_config(
        tmp_path / "render",
        [model, other],
        rkllm_server_model_settings={"Other": {"kv_slots": 3, "kv_slot_keep_seconds": 600}},
    )
    models = load_config(config_path).models
    assert [(m.kv_slots, m.kv_slot_keep_seconds) for m in models] == [(2, 300.0), (3, 600.0)]
