"""Every answer the server sends, whole or streamed, against the shape declared for it
(rkllm_runtime/api/*_shapes.py), from a real server over the binding and the double.

A body passes when pydantic validates its JSON text strictly (no coercion) against the shape AND the
validated value, dumped back, equals the body: a key the shape does not declare (which validation
would drop), a missing required key or a value of another type all fail. And /openapi.json names,
for every route, the shapes its answers are checked against here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NotRequired, get_args, get_origin, get_type_hints

import httpx
import pytest
from pydantic import TypeAdapter
from server_harness import QWEN, R1, RunningServer, model_entry, start_server

from rkllm_runtime.api import node_shapes as node
from rkllm_runtime.api import ollama_shapes as ollama
from rkllm_runtime.api import openai_shapes as openai
from rkllm_runtime.api import responses_shapes as responses

__all__ = ["start_server"]

FAILING = "Qwen2.5-0.5B-Failing"  # the double fails its runs at the third token
WEATHER_FUNCTION = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
}
CHAT_TOOLS = [{"type": "function", "function": WEATHER_FUNCTION}]
RESPONSES_TOOLS = [{"type": "function", **WEATHER_FUNCTION}]
WEATHER_QUESTION = "weather in Paris?"  # the double answers it with a get_weather call when tools are set


def conforms(shape: Any, raw: str | bytes) -> Any:
    """The body, parsed, after checking it has exactly the declared shape."""
    adapter: TypeAdapter[Any] = TypeAdapter(shape)
    validated = adapter.validate_json(raw, strict=True)
    body = json.loads(raw)
    assert adapter.dump_python(validated, mode="json") == body, f"{shape} does not declare all of {raw!r}"
    return body


def sse_data(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]


def ndjson_lines(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return response.text.splitlines()


def whole(response: httpx.Response) -> bytes:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.content


@pytest.fixture
def server(start_server, make_model) -> RunningServer:
    return start_server(
        [
            model_entry(make_model, QWEN, reply_tokens=12, embd_size=32),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true"),
            model_entry(make_model, FAILING, error_at_token=3),
        ]
    )


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


def chat_body(model: str = QWEN, text: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


# --- OpenAI ----------------------------------------------------------------------------------------
def test_openai_model_list_and_model(http):
    listed = conforms(openai.OpenAIModelList, whole(http.get("/v1/models")))
    assert [m["id"] for m in listed["data"]] == ["auto", QWEN, R1, FAILING]
    assert conforms(openai.OpenAIModel, whole(http.get(f"/v1/models/{QWEN}")))["id"] == QWEN


@pytest.mark.parametrize(
    "body",
    [
        chat_body(),
        chat_body(R1, "why?"),
        chat_body(text=WEATHER_QUESTION, tools=CHAT_TOOLS),
        chat_body(max_tokens=2),
    ],
    ids=["plain", "reasoning", "tool call", "cut at max_tokens"],
)
def test_chat_completion_whole_and_streamed(http, body):
    check_chat_completion(http, body)


def check_chat_completion(
    http: httpx.Client, body: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The whole answer and the stream's chunks, each checked against its shape."""
    answer = conforms(openai.ChatCompletion, whole(http.post("/v1/chat/completions", json=body)))
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    data = sse_data(http.post("/v1/chat/completions", json=streamed))
    assert data[-1] == "[DONE]"
    chunks = [conforms(openai.ChatCompletionChunk, item) for item in data[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == answer["choices"][0]["finish_reason"]
    return answer, chunks


def test_the_optional_chat_fields_are_really_sent(http):
    """The optional keys the shapes declare are produced (else the checks above would prove less)."""
    reasoning, chunks = check_chat_completion(http, chat_body(R1, "why?"))
    assert reasoning["choices"][0]["message"]["reasoning_content"]
    assert any("reasoning_content" in c["choices"][0]["delta"] for c in chunks if c["choices"])
    tools, chunks = check_chat_completion(http, chat_body(text=WEATHER_QUESTION, tools=CHAT_TOOLS))
    message = tools["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather" and message["content"] is None
    assert any("tool_calls" in c["choices"][0]["delta"] for c in chunks if c["choices"])


def test_text_completion_whole_and_streamed(http):
    body = {"model": QWEN, "prompt": "Once", "max_tokens": 5}
    answer = conforms(openai.TextCompletion, whole(http.post("/v1/completions", json=body)))
    assert answer["usage"]["completion_tokens"] == 5
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    data = sse_data(http.post("/v1/completions", json=streamed))
    assert data[-1] == "[DONE]"
    chunks = [conforms(openai.TextCompletion, item) for item in data[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == answer["choices"][0]["text"]
    assert "usage" in chunks[-1]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_openai_embeddings(http, encoding):
    body = {"model": QWEN, "input": ["one", "two"], "encoding_format": encoding}
    answer = conforms(openai.OpenAIEmbeddingList, whole(http.post("/v1/embeddings", json=body)))
    assert [item["index"] for item in answer["data"]] == [0, 1]


def test_openai_errors_whole_and_mid_stream(http):
    for response in (
        http.post("/v1/chat/completions", json=chat_body("llama3")),
        http.post("/v1/chat/completions", json={"model": QWEN}),
        http.get("/v1/nothing"),
    ):
        assert response.status_code in (400, 404)
        conforms(openai.OpenAIError, response.content)
    data = sse_data(http.post("/v1/chat/completions", json=chat_body(FAILING, stream=True)))
    assert "error" in conforms(openai.OpenAIError, data[-1])


# --- OpenAI Responses ------------------------------------------------------------------------------
EVENT = get_args(responses.ResponseStreamEvent)


def response_events(response: httpx.Response) -> list[dict[str, Any]]:
    events = [conforms(responses.ResponseStreamEvent, item) for item in sse_data(response)]
    names = [
        line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")
    ]
    assert names == [e["type"] for e in events]
    return events


@pytest.mark.parametrize(
    ("body", "status", "item_types"),
    [
        ({"model": QWEN, "input": "hello"}, "completed", ["message"]),
        ({"model": R1, "input": "why?"}, "completed", ["reasoning", "message"]),
        (
            {"model": QWEN, "input": WEATHER_QUESTION, "tools": RESPONSES_TOOLS},
            "completed",
            ["function_call"],
        ),
        ({"model": QWEN, "input": "hello", "max_output_tokens": 2}, "incomplete", ["message"]),
    ],
    ids=["message", "reasoning", "function call", "incomplete"],
)
def test_responses_whole_and_streamed(http, body, status, item_types):
    answer = conforms(responses.ResponseObject, whole(http.post("/v1/responses", json=body)))
    assert answer["status"] == status and [i["type"] for i in answer["output"]] == item_types
    events = response_events(http.post("/v1/responses", json={**body, "stream": True}))
    assert events[-1]["type"] == f"response.{status}"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_every_declared_response_event_is_sent(http):
    seen = set()
    for body in (
        {"model": R1, "input": "why?"},
        {"model": QWEN, "input": WEATHER_QUESTION, "tools": RESPONSES_TOOLS},
        {"model": FAILING, "input": "go"},
    ):
        seen |= {
            e["type"] for e in response_events(http.post("/v1/responses", json={**body, "stream": True}))
        }
    declared = {kind for shape in EVENT for kind in get_args(get_type_hints(shape)["type"])}
    # Lifecycle kinds are one shape; "incomplete" is covered by test_responses_whole_and_streamed.
    assert declared - seen == {"response.incomplete"}


# --- Ollama ----------------------------------------------------------------------------------------
def test_ollama_model_listings(http):
    assert conforms(ollama.OllamaVersion, whole(http.get("/api/version")))["version"]
    tags = conforms(ollama.OllamaTags, whole(http.get("/api/tags")))
    assert [m["name"] for m in tags["models"]] == ["auto", QWEN, R1, FAILING]
    shown = conforms(ollama.OllamaShow, whole(http.post("/api/show", json={"model": R1})))
    assert "thinking" in shown["capabilities"]
    assert http.post("/api/generate", json={"model": QWEN, "prompt": "", "stream": False}).status_code == 200
    running = conforms(ollama.OllamaRunning, whole(http.get("/api/ps")))
    assert QWEN in [m["name"] for m in running["models"]]


@pytest.mark.parametrize(
    "body",
    [
        chat_body(),
        chat_body(R1, "why?", think=True),
        chat_body(text=WEATHER_QUESTION, tools=CHAT_TOOLS),
        chat_body(options={"num_predict": 2}),
    ],
    ids=["plain", "thinking", "tool call", "cut at num_predict"],
)
def test_ollama_chat_whole_and_streamed(http, body):
    done = conforms(ollama.OllamaChatDone, whole(http.post("/api/chat", json={**body, "stream": False})))
    lines = ndjson_lines(http.post("/api/chat", json={**body, "stream": True}))
    for line in lines[:-1]:
        assert conforms(ollama.OllamaChatLine, line)["done"] is False
    last = conforms(ollama.OllamaChatDone, lines[-1])
    assert last["done"] and last["done_reason"] == done["done_reason"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi"},
        {"model": R1, "prompt": "why?", "think": True},
        {"prompt": "hi", "options": {"num_predict": 2}},
    ],
    ids=["plain", "thinking", "cut at num_predict"],
)
def test_ollama_generate_whole_and_streamed(http, body):
    body = {"model": QWEN, **body}
    done = conforms(
        ollama.OllamaGenerateDone, whole(http.post("/api/generate", json={**body, "stream": False}))
    )
    lines = ndjson_lines(http.post("/api/generate", json={**body, "stream": True}))
    for line in lines[:-1]:
        assert conforms(ollama.OllamaGenerateLine, line)["done"] is False
    assert conforms(ollama.OllamaGenerateDone, lines[-1])["done_reason"] == done["done_reason"]


def test_ollama_optional_fields_are_reached(http):
    thinking = http.post("/api/chat", json=chat_body(R1, "why?", think=True, stream=False)).json()
    assert thinking["message"]["thinking"]
    tools = http.post(
        "/api/chat", json=chat_body(text=WEATHER_QUESTION, tools=CHAT_TOOLS, stream=False)
    ).json()
    assert tools["message"]["tool_calls"][0]["function"]["arguments"] == {"location": "Paris"}
    generated = http.post(
        "/api/generate", json={"model": R1, "prompt": "why?", "think": True, "stream": False}
    )
    assert generated.json()["thinking"]


def test_ollama_load_and_unload_answers(http):
    for keep_alive, reason in ((None, "load"), (0, "unload")):
        chat = {"model": QWEN, "messages": [], "keep_alive": keep_alive}
        loaded = conforms(ollama.OllamaChatLoaded, whole(http.post("/api/chat", json=chat)))
        generate = {"model": QWEN, "prompt": "", "keep_alive": keep_alive}
        generated = conforms(ollama.OllamaGenerateLoaded, whole(http.post("/api/generate", json=generate)))
        assert loaded["done_reason"] == generated["done_reason"] == reason


def test_ollama_embeddings(http):
    embedded = conforms(
        ollama.OllamaEmbed, whole(http.post("/api/embed", json={"model": QWEN, "input": ["a", "b"]}))
    )
    assert len(embedded["embeddings"]) == 2 and "total_duration" in embedded
    assert conforms(ollama.OllamaEmbed, whole(http.post("/api/embed", json={"model": QWEN, "input": []})))
    single = conforms(
        ollama.OllamaEmbedding, whole(http.post("/api/embeddings", json={"model": QWEN, "prompt": "a"}))
    )
    assert len(single["embedding"]) == 32
    assert conforms(ollama.OllamaEmbedding, whole(http.post("/api/embeddings", json={"model": QWEN})))


def test_ollama_pull_status_whole_and_streamed(http):
    conforms(ollama.OllamaStatus, whole(http.post("/api/pull", json={"model": QWEN, "stream": False})))
    (line,) = ndjson_lines(http.post("/api/pull", json={"model": QWEN}))
    conforms(ollama.OllamaStatus, line)


def test_ollama_errors_whole_and_mid_stream(http):
    for response in (
        http.post("/api/chat", json=chat_body("llama3", stream=False)),
        http.post("/api/chat", json={"model": QWEN, "messages": "x"}),
        http.post("/api/pull", json={"model": "llama3"}),
        http.get("/api/nothing"),
    ):
        assert 400 <= response.status_code < 500
        conforms(ollama.OllamaError, response.content)
    lines = ndjson_lines(http.post("/api/chat", json=chat_body(FAILING, stream=True)))
    assert conforms(ollama.OllamaError, lines[-1])["error"]


# --- the board's probes ----------------------------------------------------------------------------
def test_health_and_readiness(http):
    assert conforms(node.NodeHealth, whole(http.get("/health")))["status"] == "alive"
    assert http.post("/api/generate", json={"model": QWEN, "prompt": ""}).status_code == 200
    ready = conforms(node.NodeReadiness, whole(http.get("/ready")))
    assert ready == {"status": "ready", "models": {QWEN: "ok"}}


# --- the OpenAPI document ---------------------------------------------------------------------------
DOCUMENTED = {
    ("get", "/v1/models"): (["OpenAIModelList"], None),
    ("get", "/v1/models/{name}"): (["OpenAIModel"], None),
    ("post", "/v1/chat/completions"): (["ChatCompletion"], ("text/event-stream", ["ChatCompletionChunk"])),
    ("post", "/v1/completions"): (["TextCompletion"], ("text/event-stream", ["TextCompletion"])),
    ("post", "/v1/embeddings"): (["OpenAIEmbeddingList"], None),
    ("post", "/v1/responses"): (
        ["ResponseObject"],
        ("text/event-stream", [shape.__name__ for shape in EVENT]),
    ),
    ("get", "/api/version"): (["OllamaVersion"], None),
    ("get", "/api/tags"): (["OllamaTags"], None),
    ("get", "/api/ps"): (["OllamaRunning"], None),
    ("post", "/api/show"): (["OllamaShow"], None),
    ("post", "/api/chat"): (
        ["OllamaChatDone", "OllamaChatLoaded"],
        ("application/x-ndjson", ["OllamaChatLine", "OllamaChatDone"]),
    ),
    ("post", "/api/generate"): (
        ["OllamaGenerateDone", "OllamaGenerateLoaded"],
        ("application/x-ndjson", ["OllamaGenerateLine", "OllamaGenerateDone"]),
    ),
    ("post", "/api/embed"): (["OllamaEmbed"], None),
    ("post", "/api/embeddings"): (["OllamaEmbedding"], None),
    ("post", "/api/pull"): (["OllamaStatus"], ("application/x-ndjson", ["OllamaStatus"])),
    ("get", "/health"): (["NodeHealth"], None),
    ("get", "/ready"): (["NodeReadiness"], None),
}
SHAPE_MODULES = (openai, ollama, responses, node)


def named(schema: dict[str, Any]) -> list[str]:
    refs = schema.get("anyOf", [schema])
    return [ref["$ref"].removeprefix("#/components/schemas/") for ref in refs]


def test_openapi_names_the_declared_shapes_of_each_answer(http):
    document = http.get("/openapi.json").json()
    components = document["components"]["schemas"]
    for (method, path), (body_shapes, stream) in DOCUMENTED.items():
        content = document["paths"][path][method]["responses"]["200"]["content"]
        assert named(content["application/json"]["schema"]) == body_shapes, path
        if stream is not None:
            media_type, stream_shapes = stream
            assert named(content[media_type]["schema"]) == stream_shapes, path
        for name in body_shapes + (stream[1] if stream else []):
            shape = next(getattr(m, name) for m in SHAPE_MODULES if hasattr(m, name))
            keys = get_type_hints(shape, include_extras=True)
            assert set(components[name]["properties"]) == set(keys), name
            assert set(components[name].get("required", [])) == required_keys(shape), name
    refs = {ref for ref in _refs(document) if ref.startswith("#/components/schemas/")}
    missing = {ref for ref in refs if ref.removeprefix("#/components/schemas/") not in components}
    assert not missing, f"references to undocumented schemas: {missing}"


def required_keys(shape: Any) -> set[str]:
    """Read from the evaluated hints: __required_keys__ misses NotRequired in postponed annotations."""
    hints = get_type_hints(shape, include_extras=True)
    return {key for key, hint in hints.items() if shape.__total__ and get_origin(hint) is not NotRequired}


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)
