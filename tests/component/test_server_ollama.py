"""The Ollama API driven by the official ollama client, against a real server, binding and double."""

from __future__ import annotations

import ollama
import pytest
from server_harness import QWEN, R1, log_lines, model_entry, start_server

__all__ = ["start_server"]

WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def two_models(start_server, make_model):
    return start_server(
        [
            model_entry(make_model, QWEN, reply_tokens=12, config={"pinned": True, "sha256": "ab" * 32}),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true"),
        ]
    )


def client_for(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=30)


def test_version_tags_ps_and_show(two_models):
    client = client_for(two_models)
    assert client._request_raw("GET", "/api/version").json()["version"]
    tags = client.list()
    assert [m.model for m in tags.models] == ["auto", QWEN, R1]
    assert tags.models[1].digest == "ab" * 32 and tags.models[1].size > 0
    assert [m.model for m in client.ps().models] == [QWEN], "only the pinned model is loaded at start"
    shown = client.show(R1)
    assert "thinking" in shown.capabilities and shown.modelinfo["rkllm.context_length"] == 4096


def test_chat_stream_and_whole_agree_and_report_durations_in_ns(start_server, make_model):
    server = start_server(
        [model_entry(make_model, QWEN, decode_tokens_per_second=200, prefill_ms_per_token=1, reply_tokens=16)]
    )
    client = client_for(server)
    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat(model=QWEN, messages=messages, stream=False)
    parts = list(client.chat(model=QWEN, messages=messages, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content and whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert whole.done_reason == "stop" and whole.eval_count == 16
    # 16 tokens at 200 tok/s = 80 ms of decode, as nanoseconds (not ms, the rkllama bug).
    assert 60e6 < whole.eval_duration < 5e9
    assert whole.prompt_eval_duration >= whole.prompt_eval_count * 1e6 * 0.9
    assert whole.total_duration >= whole.eval_duration + whole.prompt_eval_duration


def test_generate_stream_and_options(two_models):
    client = client_for(two_models)
    whole = client.generate(model=QWEN, prompt="Why is the sky blue?", options={"num_predict": 5})
    assert whole.eval_count == 5 and whole.done_reason == "length"
    streamed = "".join(
        p.response for p in client.generate(model=QWEN, prompt="Why is the sky blue?", stream=True)
    )
    assert streamed.startswith(whole.response) and len(streamed) > len(whole.response)


def test_multi_turn_chat_prefills_only_the_new_turn(two_models, double_log):
    client = client_for(two_models)
    messages = [{"role": "user", "content": "A first question that is rather long"}]
    first = client.chat(model=QWEN, messages=messages)
    messages += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "Q2"}]
    second = client.chat(model=QWEN, messages=messages)
    assert second.prompt_eval_count < first.prompt_eval_count
    assert "keep_history=1" in log_lines(double_log, "RUN")[-1]


def test_think_routes_auto_and_separates_thinking(two_models):
    client = client_for(two_models)
    answer = client.chat(model="auto", messages=[{"role": "user", "content": "hi"}], think=True)
    assert answer.model == R1 and answer.message.thinking and "<think>" not in answer.message.content
    plain = client.chat(model="auto", messages=[{"role": "user", "content": "hi"}])
    assert plain.model == QWEN
    streamed = list(client.generate(model=R1, prompt="why", stream=True, think=True))
    assert "".join(p.thinking or "" for p in streamed) and "".join(p.response for p in streamed)


def test_tools_come_back_as_tool_calls(two_models):
    client = client_for(two_models)
    answer = client.chat(model=QWEN, messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL])
    call = answer.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"location": "Paris"}


def test_empty_prompt_loads_and_keep_alive_zero_unloads(two_models):
    client = client_for(two_models)
    assert client.generate(model=R1, prompt="").done_reason == "load"
    assert R1 in [m.model for m in client.ps().models]
    assert client.generate(model=R1, prompt="", keep_alive=0).done_reason == "unload"
    assert R1 not in [m.model for m in client.ps().models]


def test_run_error_ends_the_stream_with_an_error_and_the_next_is_served(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, error_at_token=3)])
    client = client_for(server)
    with pytest.raises(ollama.ResponseError, match=r"RUN_ERROR|failed"):
        list(client.chat(model=QWEN, messages=[{"role": "user", "content": "go"}], stream=True))
    after = client.chat(model=QWEN, messages=[{"role": "user", "content": "go"}], options={"num_predict": 2})
    assert after.eval_count == 2


def test_unknown_model_and_bad_options_are_ollama_errors(two_models):
    client = client_for(two_models)
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 404 and "llama3" in missing.value.error
    with pytest.raises(ollama.ResponseError) as sampling:
        client.chat(model=QWEN, messages=[{"role": "user", "content": "x"}], options={"temperature": -0.1})
    assert sampling.value.status_code == 400 and "temperature" in sampling.value.error
