"""Sampling values: accepted and named when not applied (default), refused with sampling = "strict".

librkllmrt fixes sampling at rkllm_init; the double's log shows that no request re-initialises.
"""

from __future__ import annotations

import json

import ollama
import openai
import pytest
from server_harness import QWEN, RunningServer, log_lines, model_entry, start_server

__all__ = ["start_server"]

HEADER = "x-rkllm-sampling-ignored"
HELLO = [{"role": "user", "content": "Hello"}]


def serve_qwen(start_server, make_model, **config) -> RunningServer:
    return start_server([model_entry(make_model, QWEN, reply_tokens=6, config=config)])


def openai_client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def ignored_counts(server: RunningServer) -> dict[str, float]:
    with server.http() as http:
        text = http.get("/metrics").text
    prefix = f'rkllm_sampling_ignored_total{{model="{QWEN}",parameter="'
    return {
        line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def test_openai_sampling_values_are_accepted_and_named(start_server, make_model, double_log):
    server = serve_qwen(start_server, make_model)
    client = openai_client(server)
    plain = client.chat.completions.with_raw_response.create(model=QWEN, messages=HELLO)
    assert HEADER not in plain.headers
    expected = plain.parse().choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(
        model=QWEN, messages=HELLO, temperature=0, top_p=1, seed=7, presence_penalty=0.5, frequency_penalty=0
    )
    assert raw.headers[HEADER] == "temperature,top_p,seed,presence_penalty"
    assert raw.parse().choices[0].message.content == expected, "generated with the configured sampling"
    # The configured values themselves are applied: nothing to report.
    same = client.chat.completions.with_raw_response.create(
        model=QWEN, messages=HELLO, temperature=0.8, top_p=0.9, extra_body={"top_k": 1}
    )
    assert HEADER not in same.headers
    with client.chat.completions.with_streaming_response.create(
        model=QWEN, messages=HELLO, temperature=0.1, stream=True
    ) as streamed:
        assert streamed.headers[HEADER] == "temperature"
        assert "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices) == expected
    legacy = client.completions.with_raw_response.create(model=QWEN, prompt="abcd", max_tokens=2, top_p=0.5)
    assert legacy.headers[HEADER] == "top_p"
    assert ignored_counts(server) == {
        "temperature": 2.0,
        "top_p": 2.0,
        "seed": 1.0,
        "presence_penalty": 1.0,
    }
    assert len(log_lines(double_log, "INIT")) == 1, "no request re-initialised the model"


def test_ollama_options_are_accepted_and_named(start_server, make_model, double_log):
    server = serve_qwen(start_server, make_model)
    client = ollama.Client(host=server.url, timeout=30)
    expected = client.chat(model=QWEN, messages=HELLO).message.content
    options = {
        "temperature": 0.1,
        "top_k": 40,
        "top_p": 0.9,
        "seed": 42,
        "repeat_penalty": 1.1,
        "min_p": 0.05,
    }
    assert client.chat(model=QWEN, messages=HELLO, options=options).message.content == expected
    assert client.generate(model=QWEN, prompt="Hello", options={"seed": -1}).done
    with server.http() as http:
        body = {"model": QWEN, "messages": HELLO, "options": options, "stream": False}
        response = http.post("/api/chat", json=body)
        streamed = http.post("/api/chat", json={**body, "stream": True})
    assert response.headers[HEADER] == streamed.headers[HEADER] == "temperature,top_k,min_p,seed"
    assert ignored_counts(server) == {"temperature": 3.0, "top_k": 3.0, "min_p": 3.0, "seed": 4.0}
    assert len(log_lines(double_log, "INIT")) == 1


def test_strict_models_refuse_values_they_do_not_run_with(start_server, make_model, double_log):
    server = serve_qwen(start_server, make_model, sampling="strict")
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=QWEN, messages=HELLO, temperature=0)
    assert refused.value.body["param"] == "temperature" and refused.value.body["code"] == "unsupported_value"
    assert "runs with temperature=0.8" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as seeded:
        client.chat.completions.create(model=QWEN, messages=HELLO, seed=1)
    assert "has no seed" in seeded.value.body["message"]
    accepted = client.chat.completions.with_raw_response.create(model=QWEN, messages=HELLO, temperature=0.8)
    assert HEADER not in accepted.headers
    with pytest.raises(ollama.ResponseError) as refused_ollama:
        ollama.Client(host=server.url).chat(model=QWEN, messages=HELLO, options={"top_k": 40})
    assert refused_ollama.value.status_code == 400 and "top_k=40" in refused_ollama.value.error
    assert ignored_counts(server) == {}
    assert len(log_lines(double_log, "RUN")) == 1, "only the accepted request ran"


INVALID = {
    "temperature": [-0.1, 2.5],
    "top_p": [-1, 1.5],
    "top_k": [-1, 0.5],
    "seed": ["seven", 2**64],
    "presence_penalty": [-3, 2.01],
    "frequency_penalty": [3],
}


@pytest.mark.parametrize("sampling", ["configured", "strict"])
def test_invalid_values_are_a_400_in_both_modes(start_server, make_model, double_log, sampling):
    server = serve_qwen(start_server, make_model, sampling=sampling)
    with server.http() as http:
        for name, values in INVALID.items():
            for value in values:
                body = {"model": QWEN, "messages": HELLO, name: value}
                answer = http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 400 and answer.json()["error"]["param"] == name, (name, value)
                ollama_body = {"model": QWEN, "messages": HELLO, "stream": False, "options": {name: value}}
                refused = http.post("/api/chat", json=ollama_body)
                assert refused.status_code == 400 and name in refused.json()["error"], (name, value)
        for constant in ("NaN", "Infinity", "-Infinity"):
            raw = json.dumps({"model": QWEN, "messages": HELLO})[:-1] + f', "temperature": {constant}}}'
            answer = http.post("/v1/chat/completions", content=raw)
            assert answer.status_code == 400 and constant in answer.json()["error"]["message"]
    assert log_lines(double_log, "RUN") == []
