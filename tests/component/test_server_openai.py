"""The OpenAI API driven by the official openai client, against a real server, binding and double."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from server_client import send_without_reading
from server_harness import QWEN, R1, log_lines, model_entry, start_server

from tests.support import wait_until

__all__ = ["start_server"]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def qwen_server(start_server, make_model):
    return start_server([model_entry(make_model, QWEN, reply_tokens=12)])


def stopped_early(finish_line: str) -> bool:
    """The run was stopped (rkllm_abort, or the callback's 1) long before its 400-token reply at 20 tok/s."""
    reason = finish_line.split("reason=")[1].split()[0]
    generated = int(finish_line.split("generated=")[1].split()[0])
    return reason in ("abort", "callback") and generated < 40


def first_token(stream) -> str:
    """Read up to the first generated text (the role chunk comes before the run starts)."""
    return next(c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_models_lists_auto_and_every_configured_model(qwen_server):
    ids = [m.id for m in client_for(qwen_server).models.list()]
    assert ids == ["auto", QWEN]


def test_stream_and_whole_answer_carry_the_same_text_and_usage(qwen_server):
    client = client_for(qwen_server)
    whole = client.chat.completions.create(model=QWEN, messages=user("Hello there"))
    assert whole.model == QWEN and whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=QWEN, messages=user("Hello there"), stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1, "one id per completion"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_sse_framing_ends_with_done(qwen_server):
    with qwen_server.http() as http:
        body = {"model": QWEN, "messages": user("Hi"), "stream": True}
        response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[-2][6:]), "usage only with stream_options.include_usage"


def test_max_tokens_and_max_completion_tokens_cap_the_reply(qwen_server):
    client = client_for(qwen_server)
    capped = client.chat.completions.create(model=QWEN, messages=user("x"), max_tokens=3)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    newer = client.chat.completions.create(model=QWEN, messages=user("x"), max_completion_tokens=2)
    assert newer.usage.completion_tokens == 2


def test_stop_sequence_cuts_the_reply_and_aborts_the_run(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=100, reply_tokens=12)])
    client = client_for(server)
    full = client.chat.completions.create(model=QWEN, messages=user("stop test")).choices[0].message.content
    words = full.split()
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(model=QWEN, messages=user("stop test"), stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    finish = log_lines(double_log, "FINISH")[-1]
    assert "reason=abort" in finish and "generated=12" not in finish


def test_legacy_completions_use_the_raw_prompt(qwen_server, double_log):
    client = client_for(qwen_server)
    result = client.completions.create(model=QWEN, prompt="abcdefgh", max_tokens=4)
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 4
    assert "prompt_tokens=2 " in log_lines(double_log, "RUN")[-1], "8 bytes = 2 tokens: no template added"
    streamed = client.completions.create(model=QWEN, prompt="abcdefgh", max_tokens=4, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text


def test_multi_turn_prefills_only_the_new_turn(qwen_server, double_log):
    client = client_for(qwen_server)
    messages = [{"role": "system", "content": "You are terse."}, *user("First question")]
    prefills, totals = [], []
    for turn in range(4):
        answer = client.chat.completions.create(model=QWEN, messages=messages)
        run = log_lines(double_log, "RUN")[-1]
        prefills.append(int(run.split("prefill_tokens=")[1].split()[0]))
        totals.append(answer.usage.prompt_tokens)
        if turn:
            assert answer.usage.prompt_tokens_details.cached_tokens > 0
            assert "keep_history=1" in run and "kv_before=0 " not in run
        messages += [{"role": "assistant", "content": answer.choices[0].message.content}, *user(f"Q{turn}")]
    # Only "<|im_end|>\n<|im_start|>user\nQn<|im_end|>\n<|im_start|>assistant\n" is new each turn.
    new_turn = "<|im_end|>\n<|im_start|>user\nQ0<|im_end|>\n<|im_start|>assistant\n"
    assert prefills[1:] == [math.ceil(len(new_turn) / 4)] * 3, prefills
    assert totals == sorted(totals) and totals[-1] > 2 * prefills[0], "the conversation grew, prefill did not"
    assert len(log_lines(double_log, "CLEAR_KV")) == 1, "only the first turn starts from an empty cache"


def test_a_different_conversation_clears_the_cache_and_prefills_everything(qwen_server, double_log):
    client = client_for(qwen_server)
    first = client.chat.completions.create(model=QWEN, messages=user("Topic A, a long first message"))
    edited = [*user("Topic B, a long first message"), {"role": "assistant", "content": "x"}, *user("more")]
    again = client.chat.completions.create(model=QWEN, messages=edited)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert len(log_lines(double_log, "CLEAR_KV")) == 2
    run = log_lines(double_log, "RUN")[-1]
    assert int(run.split("prefill_tokens=")[1].split()[0]) > first.usage.prompt_tokens


def test_auto_routes_by_request_fields_and_rules(start_server, make_model):
    server = start_server(
        [model_entry(make_model, QWEN), model_entry(make_model, R1, kind="reasoning", template="deepseek-r1")]
    )
    client = client_for(server)
    assert client.chat.completions.create(model="auto", messages=user("hi")).model == QWEN
    effort = client.chat.completions.create(model="auto", messages=user("hi"), reasoning_effort="high")
    assert effort.model == R1
    assert client.chat.completions.create(model="auto", messages=user("Prove it is prime")).model == R1
    low = client.chat.completions.create(model="auto", messages=user("prove it"), reasoning_effort="none")
    assert low.model == QWEN, "an explicit field beats the keyword rule"


def test_auto_falls_back_to_what_the_node_has(start_server, make_model):
    server = start_server([model_entry(make_model, "Phi-3-mini", kind="quick")])
    client = client_for(server)
    assert client.chat.completions.create(model="auto", messages=user("hi")).model == "Phi-3-mini"
    reasoning = client.chat.completions.create(model="auto", messages=user("hi"), reasoning_effort="high")
    assert reasoning.model == "Phi-3-mini"


def test_thinking_goes_to_reasoning_content(start_server, make_model):
    server = start_server(
        [model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true")]
    )
    client = client_for(server)
    whole = client.chat.completions.create(model=R1, messages=user("why?")).choices[0].message
    assert whole.reasoning_content and "<think>" not in whole.content and "</think>" not in whole.content
    assert whole.content.strip()
    chunks = list(client.chat.completions.create(model=R1, messages=user("why?"), stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == whole.reasoning_content
    assert "".join(d.content or "" for d in deltas) == whole.content


def test_thinking_can_stay_inline(start_server, make_model):
    server = start_server(
        [model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true")], think="inline"
    )
    content = client_for(server).chat.completions.create(model=R1, messages=user("why?")).choices[0].message
    assert content.content.startswith("<think>") and "</think>" in content.content


def test_tools_reach_the_runtime_and_tool_calls_come_back(qwen_server, double_log):
    client = client_for(qwen_server)
    answer = client.chat.completions.create(
        model=QWEN, messages=user("weather in Paris?"), tools=[WEATHER_TOOL]
    )
    assert "first_function=get_weather" in log_lines(double_log, "TOOLS")[-1]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
        "location": "Paris"
    }
    streamed = list(
        client.chat.completions.create(
            model=QWEN, messages=user("weather now?"), tools=[WEATHER_TOOL], stream=True
        )
    )
    calls = [tc for c in streamed if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    # The tool result goes back as a "tool" turn.
    follow_up = [
        *user("weather in Paris?"),
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C"},
    ]
    client.chat.completions.create(model=QWEN, messages=follow_up, tools=[WEATHER_TOOL])
    assert "role=tool" in log_lines(double_log, "RUN")[-1]


def test_run_error_mid_stream_ends_that_request_and_the_next_is_served(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, error_at_token=3)])
    client = client_for(server)
    received = []
    with pytest.raises(openai.APIError, match=r"RUN_ERROR|failed"):
        for chunk in client.chat.completions.create(model=QWEN, messages=user("go"), stream=True):
            received.append(chunk)
    assert any(c.choices and c.choices[0].delta.content for c in received), "tokens before the error arrived"
    with pytest.raises(openai.InternalServerError) as whole:
        client.chat.completions.create(model=QWEN, messages=user("go"))
    assert whole.value.body["code"] == "run_error"
    after = client.chat.completions.create(model=QWEN, messages=user("go"), max_tokens=2)
    assert after.usage.completion_tokens == 2


def test_eight_concurrent_clients_on_one_handle_are_served_one_at_a_time(
    start_server, make_model, double_log
):
    import concurrent.futures

    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=500, reply_tokens=8)])
    client = client_for(server)
    prompts = [f"client {i} asks" for i in range(8)]
    expected = {
        p: client.chat.completions.create(model=QWEN, messages=user(p)).choices[0].message.content
        for p in prompts
    }
    assert len(set(expected.values())) == 8

    def ask(prompt: str) -> str:
        stream = client.chat.completions.create(model=QWEN, messages=user(prompt), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = dict(zip(prompts, pool.map(ask, prompts), strict=True))
    assert answers == expected, "every answer complete and unmixed"
    assert log_lines(double_log, "VIOLATION") == []
    events = [
        line.split()[0]
        for line in double_log.read_text().splitlines()
        if line.split()[0] in ("RUN", "FINISH")
    ]
    assert events == ["RUN", "FINISH"] * 16, "runs never overlap on the handle"


def test_queue_full_is_refused_at_once_with_retry_after_and_no_work(start_server, make_model, double_log):
    server = start_server(
        [
            model_entry(
                make_model, QWEN, decode_tokens_per_second=20, reply_tokens=200, config={"queue_size": 1}
            )
        ]
    )
    import threading

    client = client_for(server)
    running = client.chat.completions.create(model=QWEN, messages=user("first"), stream=True)
    first_token(running)
    waiter_answer = []
    waiter = threading.Thread(
        target=lambda: waiter_answer.append(
            client.chat.completions.create(model=QWEN, messages=user("second"), max_tokens=2)
        )
    )
    waiter.start()
    with server.http() as http:
        wait_until(lambda: f'rkllm_requests_waiting{{model="{QWEN}"}} 1.0' in http.get("/metrics").text,
                   "one request waiting")
        runs_before = len(log_lines(double_log, "RUN"))
        refused = http.post("/v1/chat/completions", json={"model": QWEN, "messages": user("third")})
        refused_ollama = http.post(
            "/api/chat", json={"model": QWEN, "messages": user("third"), "stream": False}
        )
        assert refused.status_code == 503 and refused.elapsed.total_seconds() < 2, "not after the 10 s run"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused_ollama.status_code == 503 and isinstance(refused_ollama.json()["error"], str)
        assert int(refused_ollama.headers["retry-after"]) >= 1
        assert len(log_lines(double_log, "RUN")) == runs_before == 1, "the refused requests did no work"
        metrics = http.get("/metrics").text
        assert (
            'rkllm_requests_rejected_total{model="Qwen2.5-1.5B-Instruct",reason="queue_full"} 2.0' in metrics
        )
    running.close()
    waiter.join(timeout=10)
    assert waiter_answer and waiter_answer[0].usage.completion_tokens == 2


def test_stream_disconnect_aborts_within_a_token(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=20, reply_tokens=400)])
    client = client_for(server)
    stream = client.chat.completions.create(model=QWEN, messages=user("long"), stream=True)
    first_token(stream)
    stream.close()
    finish = wait_until(lambda: log_lines(double_log, "FINISH"), "the double finishes a run")
    assert stopped_early(finish[0])
    follow = client.chat.completions.create(model=QWEN, messages=user("short"), max_tokens=1)
    assert follow.usage.completion_tokens == 1


def test_non_streaming_disconnect_aborts_too(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=20, reply_tokens=400)])
    left = send_without_reading(server, "/v1/chat/completions", {"model": QWEN, "messages": user("long")})
    wait_until(lambda: log_lines(double_log, "RUN"), "the request's run starts")
    left.close()
    finish = wait_until(lambda: log_lines(double_log, "FINISH"), "the double finishes a run")
    assert stopped_early(finish[0])
    with server.http() as http:
        wait_until(lambda: f'rkllm_requests_running{{model="{QWEN}"}} 0.0' in http.get("/metrics").text,
                   "no request running")


def test_kv_reuse_can_be_switched_off(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, config={"kv_cache_reuse": False})])
    client = client_for(server)
    first = client.chat.completions.create(model=QWEN, messages=user("one"))
    reply = {"role": "assistant", "content": first.choices[0].message.content}
    messages = [*user("one"), reply, *user("two")]
    second = client.chat.completions.create(model=QWEN, messages=messages)
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    assert len(log_lines(double_log, "CLEAR_KV")) == 2


def test_a_client_leaving_the_queue_never_reaches_the_handle(start_server, make_model, double_log):
    server = start_server([model_entry(make_model, QWEN, decode_tokens_per_second=20, reply_tokens=200)])
    client = client_for(server)
    running = client.chat.completions.create(model=QWEN, messages=user("first"), stream=True)
    first_token(running)
    with server.http(timeout=0.3) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": user("second"), "stream": True}
        )
    with server.http() as http:
        waiting = 'rkllm_requests_waiting{model="Qwen2.5-1.5B-Instruct"} 0.0'
        wait_until(lambda: waiting in http.get("/metrics").text, "the second request waiting")
        running.close()
        wait_until(lambda: f'rkllm_requests_running{{model="{QWEN}"}} 0.0' in http.get("/metrics").text,
                   "no request running")
    assert len(log_lines(double_log, "RUN")) == 1, "the departed request did no work"


def test_multibyte_characters_split_by_the_runtime_arrive_whole(start_server, make_model):
    server = start_server(
        [model_entry(make_model, QWEN, reply_tokens=40, split_utf8_every=1, fragment_every=3)]
    )
    client = client_for(server)
    whole = client.chat.completions.create(model=QWEN, messages=user("unicode")).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=QWEN, messages=user("unicode"), stream=True)
        if c.choices
    )
    assert streamed == whole and "\ufffd" not in whole
    assert any(ch in whole for ch in ("é", "世界", "🙂")), whole


def test_unsupported_parameters_say_what_to_send_instead(qwen_server, double_log):
    client = client_for(qwen_server)
    for extra, instead in (
        ({"n": 2}, "omit n or send 1"),
        ({"logprobs": True}, "omit logprobs or send false"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=QWEN, messages=user("x"), **extra)
        assert instead in refused.value.body["message"]
        assert refused.value.body["code"] == "unsupported_parameter"
    assert log_lines(double_log, "RUN") == []
