"""Chat templates and output parsing (pure functions; the server tests cover them end to end)."""

from __future__ import annotations

import json

import pytest

from rkllm_runtime.chat import (
    Message,
    OutputParser,
    StopMatcher,
    ToolCall,
    parse_tool_call,
)
from rkllm_runtime.chat_templates import builtin_templates


def test_chatml_renders_every_role_and_ends_with_the_assistant_prompt():
    messages = [
        Message("system", "Be brief."),
        Message("user", "Weather?"),
        Message("assistant", "", (ToolCall("c1", "get_weather", '{"location": "Paris"}'),)),
        Message("tool", "18 C"),
        Message("assistant", "It is 18 C."),
        Message("user", "Thanks"),
    ]
    text = builtin_templates()["chatml"].render(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"location": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 18 C.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_default_system_prompt_only_when_the_conversation_has_none():
    template = builtin_templates()["chatml"]
    assert template.render([Message("user", "hi")], "Sys").startswith("<|im_start|>system\nSys<|im_end|>")
    own = template.render([Message("system", "Mine"), Message("user", "hi")], "Sys")
    assert "Sys" not in own and "Mine" in own


def test_a_conversation_without_reasoning_renders_as_a_prefix_of_its_continuation():
    # KV reuse depends on it: turn n's prompt + the reply must be a prefix of turn n+1's prompt.
    for template in builtin_templates().values():
        first = template.render([Message("user", "a")])
        second = template.render([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
        assert second.startswith(first + "b")


def test_deepseek_drops_earlier_reasoning_from_the_history():
    text = builtin_templates()["deepseek-r1"].render(
        [Message("user", "q"), Message("assistant", "<think>secret</think>\n\nanswer"), Message("user", "q2")]
    )
    assert "secret" not in text and "answer" in text and text.endswith("<｜Assistant｜>")  # noqa: RUF001


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100])
def test_parser_splits_think_and_tool_calls_whatever_the_token_boundaries(chunk):
    raw = 'pre<think>deep thought</think>answer <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>!'
    parser = OutputParser(separate_thinking=True, parse_tool_calls=True)
    pieces = []
    for i in range(0, len(raw), chunk):
        pieces += parser.feed(raw[i : i + chunk])
    pieces += parser.close()
    joined: dict[str, str] = {}
    for channel, text in pieces:
        joined[channel] = joined.get(channel, "") + text
    assert joined["content"] == "preanswer !"
    assert joined["reasoning"] == "deep thought"
    assert json.loads(joined["tool_call"]) == {"name": "f", "arguments": {"a": 1}}


def test_inline_thinking_keeps_the_tags_in_the_content():
    parser = OutputParser(separate_thinking=False, parse_tool_calls=False)
    out = parser.feed("<think>x</think>y") + parser.close()
    assert out == [("content", "<think>x</think>y")]


def test_an_unclosed_tool_call_stays_visible_as_content():
    parser = OutputParser(separate_thinking=False, parse_tool_calls=True)
    out = parser.feed("a<tool_call>{broken") + parser.close()
    assert "".join(text for _, text in out) == "a<tool_call>{broken"


def test_parse_tool_call_accepts_object_or_string_arguments_and_rejects_junk():
    call = parse_tool_call('{"name": "f", "arguments": {"x": "é"}}', "id1")
    assert call == ToolCall("id1", "f", '{"x": "é"}')
    assert parse_tool_call('{"name": "f", "arguments": "{}"}', "id2") == ToolCall("id2", "f", "{}")
    assert parse_tool_call("not json", "id3") is None
    assert parse_tool_call('{"arguments": {}}', "id4") is None


def test_stop_matcher_cuts_at_a_stop_split_across_tokens():
    matcher = StopMatcher(["STOP"])
    out = matcher.feed("abc ST") + matcher.feed("OP tail")
    assert out == "abc " and matcher.stopped


def test_stop_matcher_releases_held_text_that_was_not_a_stop():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc ST") == "abc "
    assert matcher.feed("ART") == "START"
    assert not matcher.stopped
