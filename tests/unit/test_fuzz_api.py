"""Fuzzing both APIs from the server's own OpenAPI document: no request may get a 5xx.

Bodies come from each route's request schema in /openapi.json, then some have fields
replaced by arbitrary JSON, and some are arbitrary JSON or bytes altogether; the model field
mostly names the served model so that requests get past routing into templates, tools and runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import QWEN, RunningServer, log_lines, model_entry, start_server

__all__ = ["start_server"]

EXAMPLES_PER_ROUTE = 300
POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/api/pull",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for the JSON Schema subset pydantic emits (bounds are respected, so most bodies pass
    validation and exercise the routes behind it; optional properties come and go)."""
    if "anyOf" in schema:
        return st.one_of([from_schema(option) for option in schema["anyOf"]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if not properties:
            return st.dictionaries(st.text(max_size=8), json_values, max_size=3)
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {name: from_schema(sub) for name, sub in properties.items() if name in required},
            optional={name: from_schema(sub) for name, sub in properties.items() if name not in required},
        )
    if kind == "array":
        items = from_schema(schema.get("items", {}))
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=max(3, schema.get("minItems", 0)))
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(min_size=schema.get("minLength", 0), max_size=40)
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("exclusiveMaximum", schema.get("maximum"))
        return st.integers(
            min_value=None if low is None else int(low), max_value=None if high is None else int(high) - 1
        )
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


def request_bodies(schema: dict[str, Any]) -> st.SearchStrategy[bytes | dict[str, Any] | object]:
    valid = from_schema(schema)

    @st.composite
    def routed(draw: st.DrawFn) -> object:
        body = draw(valid)
        if isinstance(body, dict):
            model = draw(st.sampled_from([QWEN, QWEN, "auto", None]))
            if model is not None:
                body["model"] = model
            if draw(st.booleans()) and body:
                # Type confusion: one field replaced by an arbitrary JSON value.
                body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
        return body

    return st.one_of(routed(), routed(), json_values, st.binary(max_size=64))


def send(http: httpx.Client, path: str, body: object) -> int:
    if isinstance(body, bytes):
        request = http.build_request("POST", path, content=body, headers={"content-type": "application/json"})
    else:
        request = http.build_request("POST", path, json=body)
    response = http.send(request, stream=True)
    try:
        response.read()  # a stream must also complete without a server error
    finally:
        response.close()
    return response.status_code


def fuzz_route(
    http: httpx.Client, path: str, schema: dict[str, Any], statuses: Counter[int], failures: list[str]
) -> None:
    @settings(
        max_examples=EXAMPLES_PER_ROUTE, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(body=request_bodies(schema))
    def one_request(body: object) -> None:
        status = send(http, path, body)
        statuses[status] += 1
        if status >= 500:
            failures.append(f"{path} {status}: {body!r:.300}")

    one_request()


def test_fuzzed_requests_never_get_a_server_error(start_server, make_model, double_log, capsys):
    server: RunningServer = start_server(
        [model_entry(make_model, QWEN, reply_tokens=3, config={"max_new_tokens": 8})]
    )
    with server.http(timeout=30) as http:
        document = http.get("/openapi.json").json()
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        for path in POST_ROUTES:
            schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
            fuzz_route(http, path, schema, statuses, failures)
        total, by_status = sum(statuses.values()), dict(sorted(statuses.items()))
        with capsys.disabled():
            print(
                f"\nfuzzed {total} generated requests over {len(POST_ROUTES)} routes; statuses: {by_status}"
            )
        assert failures == []
        assert http.get("/health").status_code == 200
        after = http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": [{"role": "user", "content": "hi"}]}
        )
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
        metrics = http.get("/metrics").text
    assert 'rkllm_requests_rejected_total{model="",reason="internal"} 0.0' in metrics
    assert statuses[200] > 0, "some requests got as far as a generation"
    assert log_lines(double_log, "VIOLATION") == []


def test_openapi_documents_every_request_body(start_server, make_model):
    server = start_server([model_entry(make_model, QWEN)])
    with server.http() as http:
        document = http.get("/openapi.json").json()
    for path in POST_ROUTES:
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] and "$ref" not in str(body), path
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert set(chat["schema"]["required"]) == {"model", "messages"}
    tool = chat["schema"]["properties"]["tools"]["anyOf"][0]["items"]
    assert tool["properties"]["function"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9_.:-]{1,64}$"
    responses = document["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"]
    assert set(responses["schema"]["required"]) == {"model", "input"}
    assert {"/v1/models", "/api/tags", "/health", "/ready", "/metrics"} <= set(document["paths"])
