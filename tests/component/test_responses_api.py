"""POST /v1/responses driven by the official openai client, against a real server, binding and double."""

from __future__ import annotations

import json

import openai
import pytest
from server_harness import QWEN, R1, log_lines, model_entry, start_server

__all__ = ["start_server"]

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}
TEXT_ITEM_EVENTS = [
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def collapsed(types: list[str]) -> list[str]:
    """Event types with runs of deltas written once."""
    return [t for i, t in enumerate(types) if not (t.endswith(".delta") and i and types[i - 1] == t)]


@pytest.fixture
def qwen_server(start_server, make_model):
    return start_server([model_entry(make_model, QWEN, reply_tokens=12)])


@pytest.fixture
def r1_server(start_server, make_model):
    return start_server([model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true")])


def test_whole_response_matches_the_chat_path_with_usage(qwen_server):
    client = client_for(qwen_server)
    response = client.responses.create(model=QWEN, input="Hello there")
    chat = client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "Hello there"}])
    assert response.status == "completed" and response.model == QWEN and response.id.startswith("resp_")
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == chat.choices[0].message.content and response.output_text
    usage = response.usage
    assert usage.output_tokens == 12 and usage.input_tokens == chat.usage.prompt_tokens
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert usage.input_tokens_details.cached_tokens == chat.usage.prompt_tokens_details.cached_tokens


def test_stream_follows_the_documented_event_sequence(qwen_server):
    client = client_for(qwen_server)
    whole = client.responses.create(model=QWEN, input="Hello there")
    events = list(client.responses.create(model=QWEN, input="Hello there", stream=True))
    types = [e.type for e in events]
    assert collapsed(types) == [
        "response.created",
        "response.in_progress",
        *TEXT_ITEM_EVENTS,
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(d.delta for d in deltas) == whole.output_text
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 12
    assert final.id == events[0].response.id
    # The client's stream helper checks every item's identity from added to done to completed.
    with client.responses.stream(model=QWEN, input="Hello there") as helper:
        assert helper.get_final_response().output_text == whole.output_text


def test_instructions_and_message_input_continue_a_conversation_from_the_cache(qwen_server, double_log):
    client = client_for(qwen_server)
    first_input = [{"role": "user", "content": "A first question that is rather long"}]
    bare = client.responses.create(model=QWEN, input=first_input)
    first = client.responses.create(model=QWEN, instructions="You are terse.", input=first_input)
    assert first.instructions == "You are terse."
    assert first.usage.input_tokens > bare.usage.input_tokens, "instructions became a system turn"
    clears = len(log_lines(double_log, "CLEAR_KV"))
    second_input = [
        *first_input,
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": [{"type": "input_text", "text": "Q2"}]},
    ]
    second = client.responses.create(model=QWEN, instructions="You are terse.", input=second_input)
    assert second.usage.input_tokens_details.cached_tokens > 0
    assert "keep_history=1" in log_lines(double_log, "RUN")[-1]
    assert len(log_lines(double_log, "CLEAR_KV")) == clears, "the second turn extended the first one's cache"


def test_max_output_tokens_makes_the_response_incomplete(qwen_server):
    client = client_for(qwen_server)
    capped = client.responses.create(model=QWEN, input="x", max_output_tokens=3)
    assert capped.status == "incomplete" and capped.incomplete_details.reason == "max_output_tokens"
    assert capped.usage.output_tokens == 3 and capped.max_output_tokens == 3
    assert capped.output[0].status == "incomplete"
    streamed = list(client.responses.create(model=QWEN, input="x", max_output_tokens=3, stream=True))
    assert streamed[-1].type == "response.incomplete"
    assert streamed[-1].response.output_text == capped.output_text


def test_thinking_becomes_a_reasoning_item(r1_server):
    client = client_for(r1_server)
    response = client.responses.create(model=R1, input="why?")
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    thought = reasoning.content[0].text
    assert thought and "<think>" not in thought and "</think>" not in response.output_text
    assert response.output_text.strip()
    details = response.usage.output_tokens_details
    assert 0 < details.reasoning_tokens < response.usage.output_tokens
    events = list(client.responses.create(model=R1, input="why?", stream=True))
    types = collapsed([e.type for e in events])
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *TEXT_ITEM_EVENTS,
        "response.completed",
    ]
    streamed_thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed_thought == thought
    assert events[-1].response.output_text == response.output_text
    with client.responses.stream(model=R1, input="why?") as helper:
        final = helper.get_final_response()
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_function_tools_come_back_as_function_call_items(qwen_server, double_log):
    client = client_for(qwen_server)
    question = [{"role": "user", "content": "weather in Paris?"}]
    response = client.responses.create(model=QWEN, input=question, tools=[WEATHER])
    assert "first_function=get_weather" in log_lines(double_log, "TOOLS")[-1]
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "Paris"}
    assert call.call_id and call.status == "completed"
    events = list(client.responses.create(model=QWEN, input=question, tools=[WEATHER], stream=True))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added][-1] == "function_call"
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"location": "Paris"}
    with client.responses.stream(model=QWEN, input=question, tools=[WEATHER]) as helper:
        (helped,) = [i for i in helper.get_final_response().output if i.type == "function_call"]
    assert json.loads(helped.arguments) == {"location": "Paris"}
    # The result goes back as a function_call_output item, rendered as a tool turn.
    follow_up = [
        *question,
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"},
    ]
    after = client.responses.create(model=QWEN, input=follow_up, tools=[WEATHER])
    assert after.status == "completed"
    assert "role=tool" in log_lines(double_log, "RUN")[-1]


def test_sampling_values_are_accepted_and_named_when_not_applied(qwen_server):
    raw = client_for(qwen_server).responses.with_raw_response.create(model=QWEN, input="x", temperature=0.3)
    assert raw.headers["x-rkllm-sampling-ignored"] == "temperature"
    assert raw.parse().temperature == pytest.approx(0.8), "the response reports the sampling applied"


REFUSALS = {
    "previous_response_id": ({"previous_response_id": "resp_1"}, "send the whole conversation as input"),
    "structured output": (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}},
        "validate the reply client-side",
    ),
    "forced tool": ({"tools": [WEATHER], "tool_choice": "required"}, "send 'auto'"),
    "named tool": (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}},
        "describe the required call in the system message",
    ),
    "built-in tool": ({"tools": [{"type": "web_search"}]}, "only 'function' tools"),
    "image input": (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
        "text only",
    ),
    "truncation auto": ({"truncation": "auto"}, "drop the oldest items client-side"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_unsupported_fields_are_refused_with_what_to_do_instead(qwen_server, double_log, case):
    fields, fragment = REFUSALS[case]
    arguments = {"model": QWEN, "input": "hi", **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(qwen_server).responses.create(**arguments)
    assert fragment in refused.value.body["message"], refused.value.body
    assert log_lines(double_log, "RUN") == []


def test_stored_responses_are_not_found_with_a_reason(qwen_server):
    with pytest.raises(openai.NotFoundError) as missing:
        client_for(qwen_server).responses.retrieve("resp_123")
    assert "not stored" in missing.value.body["message"]
    assert missing.value.body["code"] == "response_not_found"


def test_a_run_error_fails_the_streamed_response_and_the_next_is_served(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN, error_at_token=3)])
    client = client_for(server)
    events = list(client.responses.create(model=QWEN, input="go", stream=True))
    assert any(e.type == "response.output_text.delta" for e in events), "tokens before the error arrived"
    assert events[-1].type == "response.failed"
    assert "RUN_ERROR" in events[-1].response.error.message or "failed" in events[-1].response.error.message
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=QWEN, input="go")
    assert client.responses.create(model=QWEN, input="go", max_output_tokens=2).usage.output_tokens == 2


def test_unknown_v1_paths_list_the_openai_endpoints(qwen_server):
    with qwen_server.http() as http:
        missing = http.post("/v1/assistants", json={})
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["type"] == "not_found_error"
    assert "POST /v1/responses" in error["message"] and "POST /v1/chat/completions" in error["message"]
    assert "/api/" not in error["message"]


def test_chat_structured_output_refusal_names_what_to_do_instead(qwen_server):
    with pytest.raises(openai.BadRequestError) as refused:
        client_for(qwen_server).chat.completions.create(
            model=QWEN,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_object"},
        )
    assert refused.value.body["param"] == "response_format"
    assert "ask for JSON in the prompt" in refused.value.body["message"]
