"""Embeddings: the hidden-layer binding, pooling and normalisation, and the OpenAI and Ollama endpoints
driven by the official clients against a real server, binding and double.

Expected vectors come from the double's documented formula (tests/fakelib/README.md, "Hidden-layer
mode"), computed here independently.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import math
import random
import struct
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
from api_fuzzing import fuzz_route
from server_harness import QWEN, log_lines, model_entry, start_server

from rkllm_runtime.config import ModelConfig
from rkllm_runtime.embedding import to_json_array
from rkllm_runtime.engine import Engine, GenerationRequest, ModelParams, TokenEvent
from rkllm_runtime.generation import RequestRun
from rkllm_runtime.library import load_library
from rkllm_runtime.scheduler import pooled_vector
from tests.support import wait_until

__all__ = ["start_server"]

EMBED = "Tiny-Embed"
SIZE = 32


# --- the double's documented hidden states ----------------------------------------------------------
def _feature(data: bytes) -> list[float]:
    state = 2166136261
    for byte in data:
        state = ((state ^ byte) * 16777619) & 0xFFFFFFFF
    values = []
    for _ in range(SIZE):
        state = (state * 1664525 + 1013904223) & 0xFFFFFFFF
        values.append((state >> 8) / 2**23 - 1.0)
    return values


def hidden_rows(text: str) -> list[list[float]]:
    data = text.encode()
    tokens = max(1, math.ceil(len(data) / 4))
    separators = b" \t\r\n"
    words = [0.0] * SIZE
    rows = []
    for index in range(tokens):
        start, end = index * 4, min(index * 4 + 4, len(data))
        for pos in range(start, end):
            if data[pos] not in separators and (pos == 0 or data[pos - 1] in separators):
                stop = pos
                while stop < len(data) and data[stop] not in separators:
                    stop += 1
                words = [w + f for w, f in zip(words, _feature(data[pos:stop]), strict=True)]
        own = _feature(data[start:end])
        rows.append([w + 0.25 * f for w, f in zip(words, own, strict=True)])
    return rows


def normalised(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def expected_last(text: str) -> list[float]:
    return normalised(hidden_rows(text)[-1])


def expected_mean(text: str) -> list[float]:
    rows = hidden_rows(text)
    return normalised([sum(column) / len(rows) for column in zip(*rows, strict=True)])


def close_to(actual: list[float], expected: list[float]) -> bool:
    return len(actual) == len(expected) and all(
        abs(a - e) < 1e-5 for a, e in zip(actual, expected, strict=True)
    )


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- servers and clients ------------------------------------------------------------------------------
def embed_entry(make_model: Callable[..., Path], name: str = EMBED, **config: object) -> dict[str, object]:
    fields = config.pop("fields", {})
    assert isinstance(fields, dict)
    return model_entry(make_model, name, kind="embedding", config=config, embd_size=SIZE, **fields)


def openai_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def ollama_client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=30)


def metric(server, line_start: str) -> float:
    with server.http() as http:
        text = http.get("/metrics").text
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])


@pytest.fixture
def embed_server(start_server, make_model):
    return start_server([embed_entry(make_model)])


# --- binding -------------------------------------------------------------------------------------------
@pytest.fixture
def embed_engine(double_library_path: Path, make_model) -> Iterator[Engine]:
    path = make_model("tiny_embed", embd_size=SIZE)
    engine = Engine(load_library(double_library_path), ModelParams(str(path)))
    yield engine
    engine.close()


async def test_hidden_states_are_copied_inside_the_callback(embed_engine, monkeypatch) -> None:
    kept: list[tuple[int, int]] = []
    copy = RequestRun._copy_hidden_states

    def copy_and_keep_pointer(run, layer):  # what a binding that does not copy would hold on to
        kept.append(
            (ctypes.cast(layer.hidden_states, ctypes.c_void_p).value, layer.embd_size * layer.num_tokens)
        )
        copy(run, layer)

    monkeypatch.setattr(RequestRun, "_copy_hidden_states", copy_and_keep_pointer)
    text = "the cat sat on the mat"
    hidden, perf = await embed_engine.last_hidden_layer(text)
    assert (hidden.embd_size, hidden.num_tokens, perf.prefill_tokens, perf.generate_tokens) == (SIZE, 6, 6, 0)
    rows = struct.unpack(f"={SIZE * 6}f", hidden.data)
    expected = [value for row in hidden_rows(text) for value in row]
    assert close_to(list(rows), expected)
    ((address, count),) = kept
    after = struct.unpack(f"={count}f", ctypes.string_at(address, count * 4))
    assert all(math.isnan(value) for value in after), "the buffer outlived the callback: the proof is void"


async def test_a_hidden_layer_run_generates_nothing_and_the_engine_generates_afterwards(
    embed_engine, double_log
) -> None:
    await embed_engine.last_hidden_layer("first text")
    (run,) = log_lines(double_log, "RUN")
    assert "mode=last_hidden_layer" in run and "keep_history=0" in run
    # The binding pauses the runtime once it has the states: nothing is generated after them.
    assert "reason=callback generated=0" in log_lines(double_log, "FINISH")[0]
    # The same handle still generates normally.
    tokens = [
        e async for e in embed_engine.generate(GenerationRequest(prompt="hi")) if isinstance(e, TokenEvent)
    ]
    assert tokens and "mode=generate" in log_lines(double_log, "RUN")[1]


# --- OpenAI --------------------------------------------------------------------------------------------
def test_last_token_pooling_is_the_default_and_vectors_have_norm_one(embed_server) -> None:
    result = openai_client(embed_server).embeddings.create(model=EMBED, input="hello board, hello fleet")
    vector = result.data[0].embedding
    assert close_to(vector, expected_last("hello board, hello fleet"))
    assert abs(math.sqrt(sum(x * x for x in vector)) - 1) < 1e-5
    assert not close_to(vector, expected_mean("hello board, hello fleet"))
    assert result.model == EMBED
    assert result.usage.prompt_tokens == result.usage.total_tokens == 6


def test_mean_pooling_when_configured(start_server, make_model) -> None:
    server = start_server([embed_entry(make_model, embedding_pooling="mean")])
    text = "a longer text of several words to average"
    vector = openai_client(server).embeddings.create(model=EMBED, input=text).data[0].embedding
    assert close_to(vector, expected_mean(text))
    assert abs(math.sqrt(sum(x * x for x in vector)) - 1) < 1e-5


def test_similar_texts_get_similar_vectors(embed_server) -> None:
    data = (
        openai_client(embed_server)
        .embeddings.create(
            model=EMBED,
            input=["the cat sat on the mat", "the cat sat on a mat", "quantum chromodynamics lattice"],
        )
        .data
    )
    near, far = cosine(data[0].embedding, data[1].embedding), cosine(data[0].embedding, data[2].embedding)
    assert near > far + 0.3


def test_a_batch_is_one_admission_run_back_to_back_in_order(embed_server, double_log) -> None:
    texts = [f"input number {i} about topic {i * 7}" for i in range(5)]
    result = openai_client(embed_server).embeddings.create(model=EMBED, input=texts)
    assert [d.index for d in result.data] == [0, 1, 2, 3, 4]
    for datum, text in zip(result.data, texts, strict=True):
        assert close_to(datum.embedding, expected_last(text))
    assert len(log_lines(double_log, "RUN")) == 5
    assert metric(embed_server, 'rkllm_request_queue_time_seconds_count{model="Tiny-Embed"}') == 1
    assert metric(embed_server, 'rkllm_embedding_requests_total{model="Tiny-Embed"}') == 1
    assert metric(embed_server, 'rkllm_embedding_inputs_total{model="Tiny-Embed"}') == 5
    assert result.usage.prompt_tokens == sum(math.ceil(len(t) / 4) for t in texts)


def test_base64_is_little_endian_float32_of_the_float_answer(embed_server) -> None:
    body = {"model": EMBED, "input": ["round trip", "second"]}
    with embed_server.http() as http:
        floats = http.post("/v1/embeddings", json=body).json()["data"]
        encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for plain, packed in zip(floats, encoded, strict=True):
        raw = base64.b64decode(packed["embedding"])
        # The float answer carries 9 significant digits: exactly the same float32 values.
        as_float32 = struct.unpack(f"<{SIZE}f", struct.pack(f"<{SIZE}f", *plain["embedding"]))
        assert struct.unpack(f"<{SIZE}f", raw) == as_float32


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"input": [1, 2, 3]}, "input", "token-id arrays are not supported"),
        ({"input": [[1, 2], [3]]}, "input", "token-id arrays are not supported"),
        ({"input": []}, "input", "at least one text"),
        ({"input": ["ok", ""]}, "input", "input[1] is empty"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "use 'float' or 'base64'"),
        ({"input": "x", "dimensions": 8}, "dimensions", f"returns {SIZE}-dimensional"),
        ({"input": "x" * 20000}, "input", "context of 4096 tokens"),
    ],
)
def test_bad_embedding_requests_get_a_clear_400(embed_server, double_log, fields, param, fragment) -> None:
    with embed_server.http() as http:
        answer = http.post("/v1/embeddings", json={"model": EMBED, **fields})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    if param != "dimensions":  # dimensions is learnt from the model's first answer
        assert log_lines(double_log, "RUN") == []


def test_dimensions_equal_to_the_hidden_size_is_accepted_and_known_sizes_refuse_before_work(
    embed_server, double_log
) -> None:
    client = openai_client(embed_server)
    assert len(client.embeddings.create(model=EMBED, input="x", dimensions=SIZE).data[0].embedding) == SIZE
    runs = len(log_lines(double_log, "RUN"))
    with pytest.raises(openai.BadRequestError, match="omit dimensions"):
        client.embeddings.create(model=EMBED, input="x", dimensions=SIZE * 2)
    assert len(log_lines(double_log, "RUN")) == runs


def test_an_embedding_model_refuses_chat_and_completions_naming_the_embeddings_endpoints(
    embed_server,
) -> None:
    client = openai_client(embed_server)
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings") as chat:
        client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert chat.value.body["code"] == "model_not_supported"
    with pytest.raises(openai.BadRequestError, match="/v1/embeddings"):
        client.completions.create(model=EMBED, prompt="hi")
    with pytest.raises(ollama.ResponseError, match="/api/embed") as generate:
        ollama_client(embed_server).generate(model=EMBED, prompt="hi")
    assert generate.value.status_code == 400
    with pytest.raises(ollama.ResponseError, match="/api/embed"):
        ollama_client(embed_server).chat(model=EMBED, messages=[{"role": "user", "content": "hi"}])


def test_a_chat_model_serves_embeddings_without_polluting_its_conversation_slot(
    start_server, make_model, double_log
) -> None:
    server = start_server([model_entry(make_model, QWEN, embd_size=SIZE, reply_tokens=4)])
    client = openai_client(server)
    turn = [{"role": "user", "content": "Hello there"}]
    first = client.chat.completions.create(model=QWEN, messages=turn)
    vector = client.embeddings.create(model=QWEN, input="hello board").data[0].embedding
    assert close_to(vector, expected_last("hello board"))
    follow_up = [
        *turn,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(model=QWEN, messages=follow_up)
    # The embedding emptied the slot: the conversation is prefilled whole, not continued on its text.
    assert second.usage.prompt_tokens_details.cached_tokens == 0
    kinds = [
        line.split()[0]
        for line in double_log.read_text().splitlines()
        if line.split()[0] in ("RUN", "CLEAR_KV")
    ]
    runs = log_lines(double_log, "RUN")
    assert "mode=last_hidden_layer" in runs[1] and "keep_history=0" in runs[1]
    hidden_at = [i for i, k in enumerate(kinds) if k == "RUN"][1]
    assert kinds[hidden_at - 1] == "CLEAR_KV" and kinds[hidden_at + 1] == "CLEAR_KV"


def test_a_full_queue_refuses_embeddings_at_once_with_retry_after(
    start_server, make_model, double_log
) -> None:
    server = start_server([embed_entry(make_model, queue_size=0, fields={"prefill_ms_per_token": 20})])
    slow = "word " * 80  # 100 tokens: 2 s of prefill
    answers: list[httpx.Response] = []
    with server.http() as http:
        running = threading.Thread(
            target=lambda: answers.append(http.post("/v1/embeddings", json={"model": EMBED, "input": slow}))
        )
        running.start()
        wait_until(lambda: log_lines(double_log, "RUN"), "the double starts a run")
        refused = http.post("/v1/embeddings", json={"model": EMBED, "input": "second"})
        refused_ollama = http.post("/api/embed", json={"model": EMBED, "input": "second"})
        running.join()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused_ollama.status_code == 503 and isinstance(refused_ollama.json()["error"], str)
    assert answers[0].status_code == 200 and len(log_lines(double_log, "RUN")) == 1


def test_embeddings_wait_for_a_running_generation_and_never_interleave(start_server, make_model, double_log):
    server = start_server(
        [model_entry(make_model, QWEN, embd_size=SIZE, decode_tokens_per_second=50, reply_tokens=20)]
    )
    client = openai_client(server)
    stream = client.chat.completions.create(
        model=QWEN, messages=[{"role": "user", "content": "count"}], stream=True
    )
    next(c for c in stream if c.choices and c.choices[0].delta.content)
    batch: list[object] = []
    worker = threading.Thread(
        target=lambda: batch.append(client.embeddings.create(model=QWEN, input=["one", "two", "three"]))
    )
    worker.start()
    wait_until(lambda: metric(server, 'rkllm_requests_waiting{model="Qwen2.5-1.5B-Instruct"}') == 1,
               "one request waiting")
    list(stream)
    worker.join()
    events = [
        line.split()[0] + (" hidden" if "last_hidden_layer" in line else "")
        for line in double_log.read_text().splitlines()
        if line.split()[0] in ("RUN", "FINISH")
    ]
    assert events == ["RUN", "FINISH"] + ["RUN hidden", "FINISH"] * 3
    assert len(batch) == 1


# --- Ollama --------------------------------------------------------------------------------------------
def test_ollama_embed_and_legacy_embeddings_with_the_official_client(embed_server) -> None:
    client = ollama_client(embed_server)
    answer = client.embed(model=EMBED, input=["hello board", "good night"])
    assert len(answer.embeddings) == 2
    assert close_to(list(answer.embeddings[0]), expected_last("hello board"))
    assert close_to(list(answer.embeddings[1]), expected_last("good night"))
    assert answer.prompt_eval_count == 3 + 3
    single = client.embed(model=EMBED, input="hello board")
    assert close_to(list(single.embeddings[0]), expected_last("hello board"))
    legacy = client.embeddings(model=EMBED, prompt="hello board")
    assert close_to(list(legacy.embedding), expected_last("hello board"))


def test_ollama_truncates_long_input_unless_told_not_to(embed_server) -> None:
    long_text = "word " * 5000  # 6250 tokens by the estimate, more than the 4096 context
    with embed_server.http() as http:
        cut = http.post("/api/embed", json={"model": EMBED, "input": long_text})
        refused = http.post("/api/embed", json={"model": EMBED, "input": long_text, "truncate": False})
        empty = http.post("/api/embed", json={"model": EMBED, "input": []})
    assert cut.status_code == 200 and cut.json()["prompt_eval_count"] < 4096
    assert refused.status_code == 400 and "context" in refused.json()["error"]
    assert empty.json() == {"model": EMBED, "embeddings": []}


def test_ready_probes_an_embedding_model_with_a_hidden_layer_run(
    start_server, make_model, double_log
) -> None:
    server = start_server([embed_entry(make_model, pinned=True)])
    with server.http() as http:
        assert http.get("/ready").status_code == 200
    assert all("mode=last_hidden_layer" in line for line in log_lines(double_log, "RUN"))
    assert log_lines(double_log, "RUN")


async def test_pooled_vectors_are_computed_off_the_loop_for_long_mean_inputs(embed_engine) -> None:
    text = "many words " * 60  # 165 tokens: mean pooling goes to a worker thread
    hidden, _ = await embed_engine.last_hidden_layer(text)
    config = ModelConfig(name="m", path="/m", embedding_pooling="mean")
    vector = await asyncio.wait_for(pooled_vector(hidden, config), 10)
    assert close_to(vector.tolist(), expected_mean(text))


def test_the_json_float_encoding_gives_every_float32_back_exactly() -> None:
    generator = random.Random(7)
    values = array("f", [generator.uniform(-1, 1) * 10 ** generator.randint(-12, 3) for _ in range(5000)])
    values.extend([0.0, -0.0, 1.0, 3.4028234663852886e38, 1.401298464324817e-45])
    decoded = array("f", json.loads(to_json_array(values)))
    assert list(decoded) == list(values)  # -0.0 may come back as 0, equal in value


def test_fuzzed_embedding_requests_never_get_a_server_error(start_server, make_model, double_log) -> None:
    server = start_server([model_entry(make_model, QWEN, embd_size=SIZE)])
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    with server.http() as http:
        document = http.get("/openapi.json").json()
        for path in ("/v1/embeddings", "/api/embed", "/api/embeddings"):
            body = document["paths"][path]["post"]["requestBody"]
            assert body["required"] and "$ref" not in str(body), path
            fuzz_route(http, path, body["content"]["application/json"]["schema"], statuses, failures)
        metrics = http.get("/metrics").text
    assert failures == []
    assert statuses[200] > 0 and statuses[400] > 0, statuses
    assert 'rkllm_requests_rejected_total{model="",reason="internal"} 0.0' in metrics
    assert log_lines(double_log, "VIOLATION") == []


def test_show_says_an_embedding_model_only_embeds(embed_server) -> None:
    shown = ollama_client(embed_server).show(EMBED)
    assert shown.capabilities == ["embedding"]
    assert shown.modelfile == f"FROM {EMBED}\n"
