"""Engine behaviour against the C test double (tests/fakelib), one test per correctness rule."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import resource
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from double_replies import VOCAB, expected_ids, expected_reply

from rkllm_runtime import abi
from rkllm_runtime.engine import Engine, FinishEvent, GenerationRequest, ModelParams, TokenEvent
from rkllm_runtime.errors import EngineClosedError, HandleBusyError, InitError, RkllmError, RunError
from rkllm_runtime.generation import RequestRun
from rkllm_runtime.library import RkllmLibrary, load_library
from rkllm_runtime.npu_memory import NpuMemoryPlanner

DEADLINE_S = 10.0


async def collect(engine: Engine, request: GenerationRequest) -> tuple[list[TokenEvent], FinishEvent]:
    tokens: list[TokenEvent] = []
    finish: FinishEvent | None = None
    async for event in engine.generate(request):
        if isinstance(event, FinishEvent):
            finish = event
        else:
            tokens.append(event)
    assert finish is not None
    return tokens, finish


def text_of(tokens: list[TokenEvent]) -> str:
    return "".join(token.text for token in tokens)


def log_lines(log: Path, kind: str) -> list[str]:
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.startswith(kind + " ")]


def log_kinds(log: Path, kinds: set[str]) -> list[str]:
    """The kinds of the double's log lines among kinds, in log order."""
    return [line.split()[0] for line in log.read_text().splitlines() if line.split()[0] in kinds]


@pytest.fixture
def library(double_library_path: Path) -> RkllmLibrary:
    return load_library(double_library_path)


@pytest.fixture
def open_engine(library: RkllmLibrary, make_model: Callable[..., Path]) -> Iterator[Callable[..., Engine]]:
    """open_engine(model={...fake model fields}, **ModelParams fields) -> Engine, closed after the test."""
    engines: list[Engine] = []

    def open_(model: dict[str, object] | None = None, name: str = "tiny", **params: object) -> Engine:
        path = make_model(name, **(model or {}))
        engine = Engine(library, ModelParams(str(path), **params))  # type: ignore[arg-type]
        engines.append(engine)
        return engine

    yield open_
    for engine in engines:
        engine.close()


async def test_reply_text_ids_and_perf(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 12})
    tokens, finish = await collect(engine, GenerationRequest(prompt="Hello board"))
    # The double's per-token buffer is reused for the next callback: exact text proves the copy.
    assert text_of(tokens) == expected_reply("Hello board", 12)
    assert [token.token_id for token in tokens] == expected_ids("Hello board", 12)
    assert finish.finish_reason == "stop"
    assert (finish.perf.prefill_tokens, finish.perf.generate_tokens, finish.perf.memory_mb) == (3, 12, 512)
    assert log_lines(double_log, "VIOLATION") == []


async def test_every_init_parameter_is_set_explicitly(open_engine, double_log: Path) -> None:
    open_engine(
        max_context_len=1024, max_new_tokens=300, top_k=5, top_p=0.5, temperature=0.3, base_domain_id=2,
        enabled_cpus_mask=abi.CPU6 | abi.CPU7, enabled_cpus_num=2, embed_flash=False, n_keep=16,
    )
    (init,) = log_lines(double_log, "INIT")
    # The double's own defaults are 512/512/top_k 40: none of them may leak through.
    for expected in (
        "max_context_len=1024", "max_new_tokens=300", "top_k=5", "n_keep=16", "top_p=0.5", "temperature=0.3",
        "repeat_penalty=1.1", "mirostat=0", "is_async=0", "base_domain_id=2", "embed_flash=0",
        "enabled_cpus_num=2", "enabled_cpus_mask=0xc0", "n_batch=1", "use_cross_attn=0",
    ):
        assert f" {expected} " in f" {init} ", expected


@pytest.mark.parametrize(
    ("field", "value"),
    [("top_k", 1.5), ("max_context_len", 20000), ("enabled_cpus_num", 3), ("top_p", float("nan"))],
)
def test_model_params_refuse_values_the_runtime_would_misread(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelParams("/models/x.rkllm", **{field: value})  # type: ignore[arg-type]


async def test_split_utf8_is_reassembled_exactly(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 60, "split_utf8_every": 1, "fragment_every": 4})
    prompt = "split every multibyte token"
    assert any(len(VOCAB[i].encode()) > len(VOCAB[i]) for i in expected_ids(prompt, 60))
    tokens, finish = await collect(engine, GenerationRequest(prompt=prompt))
    assert text_of(tokens) == expected_reply(prompt, 60)
    assert "\ufffd" not in text_of(tokens)
    assert finish.perf.generate_tokens == 60


async def test_max_tokens_stops_by_callback_without_touching_max_new_tokens(
    open_engine, double_log: Path
) -> None:
    engine = open_engine({"reply_tokens": 40}, max_new_tokens=2048)
    tokens, finish = await collect(engine, GenerationRequest(prompt="long answer", max_tokens=5))
    assert text_of(tokens) == expected_reply("long answer", 5)
    assert (finish.finish_reason, finish.perf.generate_tokens) == ("length", 5)
    assert "reason=callback generated=5" in log_lines(double_log, "FINISH")[0]
    # The paused single-turn KV cache is dropped so the next request starts clean.
    assert len(log_lines(double_log, "CLEAR_KV")) == 1
    tokens, finish = await collect(engine, GenerationRequest(prompt="long answer"))
    assert (len(tokens), finish.finish_reason) == (40, "stop")
    assert "max_new_tokens=2048" in log_lines(double_log, "INIT")[0]
    assert log_lines(double_log, "VIOLATION") == []


async def test_run_error_is_typed_and_the_handle_stays_usable(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 6}, max_context_len=64)
    with pytest.raises(RunError, match="RKLLM_RUN_ERROR"):
        await collect(engine, GenerationRequest(prompt="x" * 400))  # 100 tokens > 64
    tokens, finish = await collect(engine, GenerationRequest(prompt="short"))
    assert text_of(tokens) == expected_reply("short", 6)
    assert finish.finish_reason == "stop"


async def test_run_error_mid_stream_after_tokens(open_engine) -> None:
    engine = open_engine({"reply_tokens": 10, "error_at_token": 3})
    seen: list[TokenEvent] = []
    with pytest.raises(RunError, match="after 3 tokens"):
        async for event in engine.generate(GenerationRequest(prompt="fault")):
            if isinstance(event, TokenEvent):
                seen.append(event)
    assert text_of(seen) == expected_reply("fault", 3)
    assert engine.kv_cache_size() == 0


async def test_callback_exception_stops_the_run_and_never_poisons_the_next(
    open_engine, double_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = open_engine({"reply_tokens": 30, "split_utf8_every": 1})
    original = RequestRun._on_token

    def fail_on_third(self: RequestRun, raw: bytes, token_id: int) -> None:
        if self.tokens == 2:
            raise ZeroDivisionError("boom")
        original(self, raw, token_id)

    monkeypatch.setattr(RequestRun, "_on_token", fail_on_third)
    with pytest.raises(RunError, match="ZeroDivisionError"):
        await collect(engine, GenerationRequest(prompt="first"))
    monkeypatch.setattr(RequestRun, "_on_token", original)
    # The callback answered 1 (an int), so the double saw a pause, not garbage.
    assert "reason=callback" in log_lines(double_log, "FINISH")[0]
    tokens, _ = await collect(engine, GenerationRequest(prompt="second"))
    assert text_of(tokens) == expected_reply("second", 30)
    assert log_lines(double_log, "VIOLATION") == []


def test_callback_returns_an_int_for_a_request_it_does_not_know(open_engine) -> None:
    engine = open_engine()
    result = abi.RKLLMResult()
    verdict = engine._callback(ctypes.pointer(result), 424242, abi.LLMCallState.RKLLM_RUN_NORMAL)
    assert (type(verdict), verdict) == (int, abi.CALLBACK_STOP)


def test_init_failure_names_model_and_likely_causes(library: RkllmLibrary, make_model) -> None:
    path = make_model("broken", fail_init="true")
    with pytest.raises(InitError) as failed:
        Engine(library, ModelParams(str(path), base_domain_id=3))
    message = str(failed.value)
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for expected in (str(path), "0.9.8", f"RLIMIT_NOFILE soft limit is {soft_limit}", "memory domain 3",
                     "base_domain_id", "toolkit"):
        assert expected in message


def test_missing_model_file_is_refused_before_init(library: RkllmLibrary, tmp_path: Path) -> None:
    with pytest.raises(InitError, match="does not exist"):
        Engine(library, ModelParams(str(tmp_path / "absent.rkllm")))


def test_second_model_goes_to_the_next_npu_domain(open_engine, double_log: Path) -> None:
    open_engine({"memory_mb": 3000}, name="first")
    with pytest.raises(InitError, match="memory domain 0"):
        open_engine({"memory_mb": 3000}, name="second")
    planner = NpuMemoryPlanner(budget_mb=8000)
    assert planner.place("first", 3000).base_domain_id == 0
    placement = planner.place("second", 3000)
    open_engine({"memory_mb": 3000}, name="second", base_domain_id=placement.base_domain_id)
    assert "base_domain_id=1" in log_lines(double_log, "INIT")[-1]


def generated_by_runtime(log: Path) -> int:
    """Tokens the double produced in the (only) run of the log."""
    (finish,) = log_lines(log, "FINISH")
    return int(finish.split("generated=")[1].split()[0])


async def test_abort_stops_within_one_token(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 500, "decode_tokens_per_second": 50})

    def abort_counting_tokens() -> int:
        run = engine._active
        engine.abort()
        # Read after abort() returned; the runtime may be tokens ahead of this consumer, so
        # counting received events would measure the machine's load, not the abort.
        return run.tokens

    received = 0
    produced_at_abort = None
    finish = None
    async for event in engine.generate(GenerationRequest(prompt="abort me")):
        if isinstance(event, FinishEvent):
            finish = event
            continue
        received += 1
        if received == 3:
            produced_at_abort = await asyncio.to_thread(abort_counting_tokens)
    assert finish is not None and finish.finish_reason == "abort"
    assert len(log_lines(double_log, "ABORT")) == 1
    assert "reason=abort" in log_lines(double_log, "FINISH")[0]
    # At most the token being delivered when the abort landed follows it, and every token the
    # runtime produced reached the consumer.
    assert produced_at_abort is not None
    assert generated_by_runtime(double_log) - produced_at_abort <= 1
    assert received == generated_by_runtime(double_log) == finish.perf.generate_tokens


async def test_cancelling_the_consumer_aborts_and_releases_the_handle(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 1000, "decode_tokens_per_second": 20})
    got_tokens = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in engine.generate(GenerationRequest(prompt="cancel me")):
            count += 1
            if count == 2:
                got_tokens.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_tokens.wait(), DEADLINE_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    # When the cancelled generator is finished, rkllm_run has returned: the handle is free now,
    # and the aborted single-turn KV cache has been dropped.
    assert "reason=abort" in log_lines(double_log, "FINISH")[0]
    assert len(log_lines(double_log, "CLEAR_KV")) == 1
    assert engine.kv_cache_size() == 0
    tokens, _ = await collect(engine, GenerationRequest(prompt="again", max_tokens=2))
    assert text_of(tokens) == expected_reply("again", 2)
    assert log_lines(double_log, "VIOLATION") == []


async def test_cancelling_a_queued_request_does_not_wait_for_the_run_ahead(
    open_engine, double_log: Path
) -> None:
    # The run ahead hangs after its first token until it is aborted, so however long the loop takes
    # to cancel the queued request, the run ahead is still going when it does.
    engine = open_engine({"reply_tokens": 100, "hang_at_token": 1})
    running = engine.generate(GenerationRequest(prompt="ahead"))
    await anext(running)
    queued = asyncio.create_task(collect(engine, GenerationRequest(prompt="queued")))
    await asyncio.sleep(0)  # let it enter the engine's queue
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    # The cancellation completed while the run ahead was still going (the double logs FINISH
    # when a run ends), i.e. it did not wait for the handle.
    assert log_lines(double_log, "FINISH") == []
    engine.abort()
    rest = [event async for event in running]
    assert isinstance(rest[-1], FinishEvent) and rest[-1].finish_reason == "abort"
    assert len(log_lines(double_log, "RUN")) == 1  # the cancelled request never reached the runtime


async def test_closing_the_iterator_early_aborts_the_run(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 1000, "decode_tokens_per_second": 20})
    async with contextlib.aclosing(engine.generate(GenerationRequest(prompt="stop early"))) as events:
        async for _ in events:
            break
    # Closing waited for rkllm_run to return, and the run ended by the abort, not after 1000 tokens.
    assert len(log_lines(double_log, "ABORT")) == 1
    assert "reason=abort" in log_lines(double_log, "FINISH")[0]
    assert generated_by_runtime(double_log) < 1000
    assert engine.kv_cache_size() == 0


async def test_concurrent_callers_are_serialized(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 8, "decode_tokens_per_second": 400})
    prompts = [f"caller {n}" for n in range(4)]
    results = await asyncio.gather(*(collect(engine, GenerationRequest(prompt=p)) for p in prompts))
    for prompt, (tokens, finish) in zip(prompts, results, strict=True):
        assert text_of(tokens) == expected_reply(prompt, 8)
        assert finish.finish_reason == "stop"
    assert log_kinds(double_log, {"RUN", "FINISH"}) == ["RUN", "FINISH"] * 4
    assert log_lines(double_log, "VIOLATION") == []


async def test_control_call_during_a_run_is_refused_not_interleaved(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 200, "decode_tokens_per_second": 50})
    events = engine.generate(GenerationRequest(prompt="busy"))
    async with contextlib.aclosing(events):
        await anext(events)
        with pytest.raises(HandleBusyError):
            engine.clear_kv_cache()
    assert log_lines(double_log, "VIOLATION") == []


async def test_event_loop_keeps_running_while_rkllm_run_blocks(open_engine, double_log: Path) -> None:
    # The double's run hangs before its first token until it is aborted: rkllm_run blocks without a
    # callback for as long as the test takes, so no wall-clock window is involved that a loaded machine
    # could shrink. A loop blocked by the call would never tick once the double reports the hang.
    engine = open_engine({"reply_tokens": 6, "hang_at_token": 0})
    async with contextlib.aclosing(engine.generate(GenerationRequest(prompt="blocked run"))) as events:
        first = asyncio.create_task(anext(events))
        ticks_while_blocked = 0
        deadline = time.monotonic() + DEADLINE_S
        while ticks_while_blocked < 5:
            assert time.monotonic() < deadline, "the double never reported the hang"
            await asyncio.sleep(0.01)
            if log_lines(double_log, "HANG"):
                ticks_while_blocked += 1
        # Still inside rkllm_run: it returns only after the abort below.
        assert not first.done() and log_lines(double_log, "FINISH") == []
        engine.abort()
        finish = await asyncio.wait_for(first, DEADLINE_S)
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "abort"
    assert finish.perf.generate_tokens == 0


async def test_token_id_input(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 5})
    tokens, finish = await collect(engine, GenerationRequest(token_ids=[0, 2, 6]))
    # The double turns ids into vocabulary text: "Hello world NPU".
    assert text_of(tokens) == expected_reply("Hello world NPU", 5)
    assert finish.perf.prefill_tokens == 3
    assert "input_type=TOKEN" in log_lines(double_log, "RUN")[0]


async def test_keep_history_prefills_only_new_input(open_engine) -> None:
    engine = open_engine({"reply_tokens": 4})
    _, first = await collect(engine, GenerationRequest(prompt="twelve bytes", keep_history=True))
    assert first.perf.prefill_tokens == 3
    assert engine.kv_cache_size() == 3 + 4
    _, second = await collect(engine, GenerationRequest(prompt="next", keep_history=True))
    assert second.perf.prefill_tokens == 1
    assert engine.kv_cache_size() == 7 + 1 + 4
    engine.clear_kv_cache()
    assert engine.kv_cache_size() == 0
    _, fresh = await collect(engine, GenerationRequest(prompt="twelve bytes"))
    assert fresh.perf.prefill_tokens == 3


async def test_chat_template_and_function_tools_reach_the_runtime(open_engine) -> None:
    engine = open_engine({"reply_tokens": 4})
    engine.set_chat_template("You are a board.", "<u>", "</u>")  # 16 bytes: 4 system tokens
    _, finish = await collect(engine, GenerationRequest(prompt="hi"))
    assert finish.perf.prefill_tokens == 1 + 4
    tools = '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]'
    engine.set_function_tools("Use tools.", tools)
    tokens, _ = await collect(engine, GenerationRequest(prompt="weather in Paris?"))
    expected = '<tool_call>{"name": "get_weather", "arguments": {"location": "Paris"}}</tool_call>'
    assert text_of(tokens) == expected


async def test_lora_and_prompt_cache(open_engine, double_log: Path, tmp_path: Path) -> None:
    engine = open_engine({"reply_tokens": 3})
    adapter = tmp_path / "style.lora"
    adapter.write_text("lora")
    engine.load_lora(str(adapter), "style", 0.5)
    await collect(engine, GenerationRequest(prompt="styled", lora_adapter="style"))
    assert "lora=style" in log_lines(double_log, "RUN")[0]
    with pytest.raises(RunError, match="rkllm_run returned -1"):
        await collect(engine, GenerationRequest(prompt="styled", lora_adapter="unknown"))
    cache = tmp_path / "prefix.cache"
    saving = GenerationRequest(prompt="prefix", prompt_cache_path=str(cache), save_prompt_cache=True)
    await collect(engine, saving)
    assert cache.is_file()
    engine.load_prompt_cache(str(cache))
    engine.release_prompt_cache()
    with pytest.raises(RkllmError, match="rkllm_load_prompt_cache failed"):
        engine.load_prompt_cache(str(adapter))


async def test_close_aborts_a_running_generation_and_is_idempotent(open_engine, double_log: Path) -> None:
    engine = open_engine({"reply_tokens": 1000, "decode_tokens_per_second": 20})
    events = engine.generate(GenerationRequest(prompt="closing"))
    first = await anext(events)
    assert isinstance(first, TokenEvent)
    await asyncio.to_thread(engine.close)
    remaining = [event async for event in events]
    assert isinstance(remaining[-1], FinishEvent) and remaining[-1].finish_reason == "abort"
    engine.close()
    assert len(log_lines(double_log, "DESTROY")) == 1
    with pytest.raises(EngineClosedError):
        await collect(engine, GenerationRequest(prompt="after close"))
    with pytest.raises(EngineClosedError):
        engine.kv_cache_size()
    assert log_lines(double_log, "VIOLATION") == []


async def test_two_engines_run_side_by_side_without_sharing_state(open_engine, double_log: Path) -> None:
    fast = open_engine({"reply_tokens": 20, "split_utf8_every": 1, "decode_tokens_per_second": 500}, name="a")
    slow = open_engine({"reply_tokens": 10, "split_utf8_every": 2, "decode_tokens_per_second": 200}, name="b")
    (a_tokens, _), (b_tokens, _) = await asyncio.gather(
        collect(fast, GenerationRequest(prompt="model a")), collect(slow, GenerationRequest(prompt="model b"))
    )
    assert text_of(a_tokens) == expected_reply("model a", 20)
    assert text_of(b_tokens) == expected_reply("model b", 10)
    assert log_lines(double_log, "VIOLATION") == []
