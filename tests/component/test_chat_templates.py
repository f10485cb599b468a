"""Chat templates as Jinja2 files: the built-ins render what the prefix/suffix renderer they replaced
rendered, a template dropped in from a tokenizer_config.json works, the sandbox holds, and KV-cache
reuse is kept only for prefix-stable templates."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from double_replies import expected_reply
from server_client import QWEN_LABELS, cached, samples
from server_harness import QWEN, model_entry, start_server

from rkllm_runtime.chat import Message, ToolCall
from rkllm_runtime.chat_templates import (
    ChatTemplate,
    ChatTemplateError,
    builtin_templates,
)
from rkllm_runtime.config import ConfigError, parse_config, with_overrides

__all__ = ["start_server"]

# Rendered by the prefix/suffix templates (chatml, deepseek-r1, phi3) before they became Jinja files.
GOLDENS = json.loads((Path(__file__).parent / "data/chat_template_goldens.json").read_text())

# Written in the style of the chat_template strings shipped in tokenizer_config.json files: system
# message split off with a default, tools listed in the system turn, consecutive tool results
# grouped, bos/eos tokens, loop.previtem, raise_exception and tojson.
DROPPED_IN = """\
{%- if messages and messages[0].role == 'system' %}
    {%- set system_message = messages[0].content %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'You are a helpful assistant.' %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token + '<|system|>\\n' + system_message }}
{%- if tools %}
    {{- '\\n\\nFunctions you may call:' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
{%- endif %}
{{- '<|end|>\\n' }}
{%- for message in loop_messages %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Only the first message may be a system message') }}
    {%- endif %}
    {%- if message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|tool|>\\n' }}
        {%- endif %}
        {{- message.content + '\\n' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|' + message.role + '|>\\n' }}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- if message.tool_calls is defined %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '\\n<call>' + {'name': tool_call.name, 'arguments': tool_call.arguments} | tojson
                    + '</call>' }}
            {%- endfor %}
        {%- endif %}
        {%- if message.role == 'assistant' %}
            {{- eos_token }}
        {%- endif %}
        {{- '<|end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>\\n' }}
{%- endif %}
"""

# Like the templates of models trained without earlier turns' reasoning: the history loses it.
DROPS_REASONING = """\
{%- for message in messages %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip() %}
    {%- endif %}
    {{- '<|' + message.role + '|>' + content + '<|end|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>' }}{% endif %}
"""
KEEPS_REASONING = DROPS_REASONING.replace("'</think>' in content", "false")


def golden_messages(case: dict[str, Any]) -> list[Message]:
    return [
        Message(m["role"], m["content"], tuple(ToolCall(**call) for call in m.get("tool_calls", [])))
        for m in case["messages"]
    ]


@pytest.mark.parametrize(
    ("template", "case"), [(t, c) for t, renders in GOLDENS["renders"].items() for c in renders]
)
def test_each_builtin_template_renders_the_prompt_it_rendered_before_the_move(template, case):
    conversation = GOLDENS["conversations"][case]
    rendered = builtin_templates()[template].render(
        golden_messages(conversation), conversation["default_system"]
    )
    assert rendered == GOLDENS["renders"][template][case]


def test_the_goldens_cover_every_builtin_template_and_the_tricky_conversations():
    assert set(GOLDENS["renders"]) == set(builtin_templates()) == {"chatml", "deepseek-r1", "phi3"}
    conversations = GOLDENS["conversations"].values()
    assert any(m.get("tool_calls") for c in conversations for m in c["messages"])
    assert any(m["role"] == "tool" for c in conversations for m in c["messages"])
    assert any("</think>" in m["content"] for c in conversations for m in c["messages"])
    assert any(c["default_system"] for c in conversations)


def dropped_in_config(template_dir: Path, source: str, **model: Any) -> Any:
    (template_dir / "acme.jinja").write_text(source)
    entry = {"name": "acme", "path": "/m.rkllm", "template": "acme", **model}
    return parse_config({"template_dir": str(template_dir), "models": [entry]})


def test_a_template_dropped_in_from_a_tokenizer_config_renders_like_transformers_would(tmp_path):
    config = dropped_in_config(tmp_path, DROPPED_IN, bos_token="<s>", eos_token="</s>")
    template = config.template_for(config.models[0])
    messages = [
        Message("user", "Weather in Paris and Rome?"),
        Message(
            "assistant",
            "",
            (ToolCall("c1", "weather", '{"city": "Paris"}'), ToolCall("c2", "weather", '{"city":"Rome"}')),
        ),
        Message("tool", "18 C"),
        Message("tool", "21 C"),
        Message("user", "Thanks"),
    ]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"q": "<&>"}}}]
    assert template.render(messages, tools=tools) == (
        "<s><|system|>\nYou are a helpful assistant.\n\nFunctions you may call:\n"
        '{"type": "function", "function": {"name": "weather", "parameters": {"q": "<&>"}}}<|end|>\n'
        "<|user|>\nWeather in Paris and Rome?<|end|>\n"
        '<|assistant|>\n\n<call>{"name": "weather", "arguments": {"city": "Paris"}}</call>'
        '\n<call>{"name": "weather", "arguments": {"city": "Rome"}}</call></s><|end|>\n'
        "<|tool|>\n18 C\n21 C\n<|end|>\n"
        "<|user|>\nThanks<|end|>\n"
        "<|assistant|>\n"
    )
    assert template.render([Message("user", "Hi")], "Be brief.", add_generation_prompt=False) == (
        "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n"
    )
    assert template.prefix_break is None and config.models[0].kv_cache_reuse


def test_a_dropped_in_template_is_what_the_runtime_receives_and_its_refusal_is_a_400(
    tmp_path, make_model, start_server
):
    (tmp_path / "acme.jinja").write_text(DROPPED_IN)
    entry = model_entry(make_model, QWEN, template="acme", reply_tokens=5, config={"bos_token": "<s>"})
    server = start_server([entry], template_dir=str(tmp_path))
    with server.http() as http:
        answer = http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert answer.status_code == 200, answer.text
        # The double's reply is a function of the exact text rkllm_run received.
        prompt = "<s><|system|>\nYou are a helpful assistant.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
        assert answer.json()["choices"][0]["message"]["content"] == expected_reply(prompt, 5)
        late_system = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
        refused = http.post("/v1/chat/completions", json={"model": QWEN, "messages": late_system})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (
        "Only the first message may be a system message" in error["message"] and error["param"] == "messages"
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
        "{{ raise_exception('roles must alternate') }}",
        "{{ messages[0].content + undefined_thing.field }}",
    ],
)
def test_what_a_template_cannot_do_is_a_chat_template_error(source):
    with pytest.raises(ChatTemplateError, match="chat template t"):
        ChatTemplate("t", source).render([Message("user", "hi")])


def test_tojson_writes_json_as_transformers_does_not_html_escaped():
    template = ChatTemplate("t", "{{ {'a': '<b>&\\'é'} | tojson }}|{{ [1] | tojson(indent=2) }}")
    assert template.render([]) == '{"a": "<b>&\'é"}|[\n  1\n]'


def test_unusable_template_files_are_refused_at_config_load_naming_model_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"model acme: chat template acme: line 2: "):
        dropped_in_config(tmp_path, "ok\n{% for m in messages %}\n")
    with pytest.raises(ConfigError, match=r"model acme: unknown template 'missing': there is no file .*acme"):
        parse_config(
            {"template_dir": str(tmp_path), "models": [{"name": "acme", "path": "/m", "template": "missing"}]}
        )
    with pytest.raises(ConfigError, match=r"\[templates\.\*\] tables are no longer read"):
        parse_config({"templates": {"mine": {"user": ["U", ""]}}})


def test_a_template_may_be_named_by_path(tmp_path):
    path = tmp_path / "elsewhere.jinja"
    path.write_text(KEEPS_REASONING)
    config = parse_config({"models": [{"name": "m", "path": "/m", "template": str(path)}]})
    assert (
        config.template_for(config.models[0]).render([Message("user", "x")])
        == "<|user|>x<|end|><|assistant|>"
    )


def test_builtin_prefix_stability_is_known():
    assert builtin_templates()["chatml"].prefix_break is None
    assert builtin_templates()["phi3"].prefix_break is None
    assert "does not start the next turn's render" in (builtin_templates()["deepseek-r1"].prefix_break or "")


def test_a_template_that_drops_earlier_reasoning_switches_kv_reuse_off_saying_so_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rkllm_runtime.config"):
        config = dropped_in_config(tmp_path, DROPS_REASONING)
        with_overrides(config, port=9999)
    assert not config.models[0].kv_cache_reuse
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "model acme: chat template acme is not prefix-stable" in warnings[0]
    assert "every turn is prefilled in full" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rkllm_runtime.config"):
        assert dropped_in_config(tmp_path, KEEPS_REASONING).models[0].kv_cache_reuse
    assert not caplog.records


def two_turns(server: Any) -> tuple[dict[str, Any], dict[str, float]]:
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    with server.http() as http:
        for _ in range(2):
            answer = http.post("/v1/chat/completions", json={"model": QWEN, "messages": messages})
            assert answer.status_code == 200, answer.text
            reply = answer.json()["choices"][0]["message"]["content"]
            assert reply.startswith("<think>"), "the reply thinks aloud, inline"
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"}]
        metrics = samples(http.get("/metrics").text)
    return answer.json(), {
        name: metrics.get((name, QWEN_LABELS), 0.0)
        for name in ("rkllm_prompt_tokens_total", "rkllm_prompt_tokens_cached_total")
    }


@pytest.mark.parametrize(("source", "reused"), [(KEEPS_REASONING, True), (DROPS_REASONING, False)])
def test_kv_cache_reuse_follows_prefix_stability_of_the_template(
    tmp_path, make_model, start_server, source, reused
):
    (tmp_path / "acme.jinja").write_text(source)
    entry = model_entry(make_model, QWEN, template="acme", think="true")
    server = start_server([entry], template_dir=str(tmp_path), think="inline")
    last, counters = two_turns(server)
    assert counters["rkllm_prompt_tokens_total"] > 0
    if reused:
        assert cached(last) > 0 and counters["rkllm_prompt_tokens_cached_total"] == cached(last)
    else:
        assert cached(last) == 0 and counters["rkllm_prompt_tokens_cached_total"] == 0
