"""A runtime failure before a run costs that request, not the board: the scheduler over the real binding
and the C double, whose rkllm_set_function_tools refuses a tools JSON without a function name.

The API refuses such tools itself (test_hostile_input.py); here they reach the runtime on purpose, as
any input the runtime refuses for reasons the server cannot check beforehand would.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from server_client import CHAT, assert_error_shape, chat_body, samples
from server_harness import QWEN, log_lines, model_entry, start_server

from rkllm_runtime.api import ollama, openai
from rkllm_runtime.app import library_engine_factory
from rkllm_runtime.config import parse_config
from rkllm_runtime.engine import TokenEvent
from rkllm_runtime.metrics import Metrics
from rkllm_runtime.scheduler import Job, Scheduler, ToolsRefusedError

__all__ = ["start_server"]

NAMELESS_TOOLS = '[{"type": "function", "function": {}}]'
GOOD_TOOLS = '[{"type": "function", "function": {"name": "get_weather"}}]'


def scheduler_over_the_double(library: Path, make_model: Any, **config: Any) -> Scheduler:
    settings = parse_config(
        {"library": str(library), "models": [model_entry(make_model, QWEN, config=config)]}
    )
    return Scheduler(settings, library_engine_factory(str(library)), Metrics(settings))


async def answer(scheduler: Scheduler, prompt: str, tools_json: str = "") -> str:
    """The whole reply of one request through admission, slot choice and the run."""
    events = scheduler.generate(scheduler.admit(QWEN), QWEN, Job(prompt, tools_json=tools_json))
    async with aclosing(events) as stream:
        return "".join([event.text async for event in stream if isinstance(event, TokenEvent)])


def reinits(scheduler: Scheduler) -> dict[str, float]:
    values = samples(scheduler.metrics.render().decode())
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in values.items()
        if name == "rkllm_handle_reinits_total"
    }


def test_tools_the_runtime_refuses_fail_that_request_only(double_library_path, make_model, double_log):
    async def scenario() -> None:
        scheduler = scheduler_over_the_double(double_library_path, make_model, kv_slots=2)
        try:
            conversation = "<|im_start|>user\nkept<|im_end|>\n"
            reply = await answer(scheduler, conversation)
            for _ in range(3):
                with pytest.raises(ToolsRefusedError, match="refused this request's tools"):
                    await answer(scheduler, "<|im_start|>user\nweather?<|im_end|>\n", NAMELESS_TOOLS)
            assert await answer(scheduler, "<|im_start|>user\nweather?<|im_end|>\n", GOOD_TOOLS)
            holder = next(slot for slot in scheduler.registry.get(QWEN).slots if slot.kv_text)
            assert holder.kv_text == conversation + reply, "the other slot's conversation was left alone"
            assert reinits(scheduler) == {"poisoned": 0, "handle_failed": 0}
        finally:
            await scheduler.close()

    asyncio.run(scenario())
    assert len(log_lines(double_log, "INIT")) == 2, "nothing but the two slots was initialised"
    assert len(log_lines(double_log, "DESTROY")) == 2, "destroyed only at close"


def test_a_broken_handle_is_initialised_again_and_counted(double_library_path, make_model, double_log):
    async def scenario() -> None:
        scheduler = scheduler_over_the_double(double_library_path, make_model)
        try:
            await answer(scheduler, "first")
            scheduler.registry.get(QWEN).slots[0].engine.close()  # the handle is gone behind our back
            assert await answer(scheduler, "second"), "the request was served on a fresh handle"
            assert reinits(scheduler) == {"poisoned": 0, "handle_failed": 1}
            scheduler.registry.get(QWEN).slots[0].poisoned = True  # as a failed run leaves it
            assert await answer(scheduler, "third")
            assert reinits(scheduler) == {"poisoned": 1, "handle_failed": 1}
        finally:
            await scheduler.close()

    asyncio.run(scenario())
    assert len(log_lines(double_log, "INIT")) == 3


def test_refused_tools_on_a_broken_handle_cost_one_reinit_not_a_loop(
    double_library_path, make_model, double_log
):
    async def scenario() -> None:
        scheduler = scheduler_over_the_double(double_library_path, make_model)
        try:
            await answer(scheduler, "first")
            scheduler.registry.get(QWEN).slots[0].engine.close()
            # The broken handle fails even the empty tool list: a fresh one, which refuses the tools too.
            with pytest.raises(ToolsRefusedError):
                await answer(scheduler, "weather?", NAMELESS_TOOLS)
            with pytest.raises(ToolsRefusedError):
                await answer(scheduler, "weather?", NAMELESS_TOOLS)
            assert reinits(scheduler) == {"poisoned": 0, "handle_failed": 1}
            assert await answer(scheduler, "after")
        finally:
            await scheduler.close()

    asyncio.run(scenario())
    assert len(log_lines(double_log, "INIT")) == 2


@pytest.mark.parametrize("api", ["openai", "ollama"])
def test_refused_tools_are_a_400_in_the_apis_shape(start_server, make_model, double_log, monkeypatch, api):
    server = start_server([model_entry(make_model, QWEN, reply_tokens=4)])
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    with server.http() as http:
        assert http.post(CHAT[api], json=chat_body(api)).status_code == 200
        # Tools the API accepts but this runtime refuses.
        for module in (openai, ollama):
            monkeypatch.setattr(module, "tools_text", lambda _tools: NAMELESS_TOOLS)
        refused = http.post(CHAT[api], json=chat_body(api, tools=tools))
        assert_error_shape(api, refused, 400, "refused this request's tools")
        monkeypatch.undo()
        assert http.post(CHAT[api], json=chat_body(api, tools=tools)).status_code == 200
        values = samples(http.get("/metrics").text)
    assert (
        values[("rkllm_handle_reinits_total", frozenset({("model", QWEN), ("reason", "handle_failed")}))] == 0
    )
    assert len(log_lines(double_log, "INIT")) == 1 and log_lines(double_log, "DESTROY") == []
