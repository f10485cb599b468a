"""Fuzzing both APIs from the server's own OpenAPI document: no request may get a 5xx.

Bodies come from each route's request schema in /openapi.json, then some have fields
replaced by arbitrary JSON, and some are arbitrary JSON or bytes altogether; the model field
mostly names the served model so that requests get past routing into templates, tools and runs.
"""

from __future__ import annotations

from collections import Counter

from api_fuzzing import fuzz_route
from server_harness import QWEN, RunningServer, log_lines, model_entry, start_server

__all__ = ["start_server"]

POST_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/api/pull",
]

def test_fuzzed_requests_never_get_a_server_error(start_server, make_model, double_log):
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
        print(f"fuzzed {total} generated requests over {len(POST_ROUTES)} routes; statuses: {by_status}")
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
