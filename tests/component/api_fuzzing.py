"""Requests generated from a route's JSON Schema (the server's /openapi.json), sent to find 5xx answers."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_harness import QWEN

EXAMPLES_PER_ROUTE = 300

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
