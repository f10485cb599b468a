"""The Ollama details clients rely on, through the official ollama client where it has a method."""

from __future__ import annotations

import ollama
import pytest
from server_harness import QWEN, R1, log_lines, model_entry, start_server

from rkllm_runtime.api.ollama import OLLAMA_VERSION

__all__ = ["start_server"]


@pytest.fixture
def server(start_server, make_model):
    return start_server(
        [
            model_entry(make_model, QWEN, reply_tokens=4, config={"memory_mb": 300, "kv_slots": 2}),
            model_entry(make_model, R1, kind="reasoning", template="deepseek-r1", think="true"),
        ]
    )


def client_for(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=30)


def test_latest_tag_names_the_same_model(server):
    client = client_for(server)
    answer = client.chat(model=f"{QWEN}:latest", messages=[{"role": "user", "content": "hi"}])
    assert answer.model == QWEN and answer.eval_count == 4
    assert client.show(f"{QWEN}:latest").details.family == client.show(QWEN).details.family
    assert client.chat(model="auto:latest", messages=[{"role": "user", "content": "hi"}]).model == QWEN
    with pytest.raises(ollama.ResponseError) as other_tag:
        client.chat(model=f"{QWEN}:7b", messages=[{"role": "user", "content": "hi"}])
    assert other_tag.value.status_code == 404


def test_version_is_an_ollama_version_with_thinking(server):
    version = client_for(server)._request_raw("GET", "/api/version").json()
    assert version["version"] == OLLAMA_VERSION
    # 0.9.0 introduced `think`, which this server implements; clients gate it on the version.
    assert tuple(int(p) for p in version["version"].split(".")) >= (0, 9, 0)
    assert version["rkllm_runtime"]


def test_auto_is_listed_so_name_validation_passes_and_it_chats(server):
    client = client_for(server)
    names = [m.model for m in client.list().models]
    assert names == ["auto", QWEN, R1]
    assert client.chat(model="auto", messages=[{"role": "user", "content": "hi"}]).model in names


def test_root_answers_like_ollama_for_get_and_head(server):
    with server.http() as http:
        got, head = http.get("/"), http.head("/")
    assert got.status_code == 200 and got.text == "Ollama is running"
    assert got.headers["content-type"].startswith("text/plain")
    assert head.status_code == 200 and head.content == b""


def test_pull_of_an_installed_model_succeeds_without_work(server, double_log):
    client = client_for(server)
    assert client.pull(QWEN).status == "success"
    assert client.pull(f"{QWEN}:latest").status == "success"
    assert [p.status for p in client.pull(R1, stream=True)] == ["success"]
    assert log_lines(double_log, "INIT") == [], "pulling loads nothing"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.pull("llama3.2"),
        lambda c: c.create(model="mine", from_=QWEN, system="be brief"),
        lambda c: c.copy(QWEN, "copy-of-qwen"),
        lambda c: c.push(QWEN),
        lambda c: c.delete(QWEN),
    ],
    ids=["pull-unknown", "create", "copy", "push", "delete"],
)
def test_model_management_is_refused_naming_ansible(server, call):
    with pytest.raises(ollama.ResponseError) as refused:
        call(client_for(server))
    assert refused.value.status_code == 403
    assert "Ansible" in refused.value.error and "rkllm_models_enabled" in refused.value.error
    assert QWEN in refused.value.error, "the refusal lists what is installed"


def test_content_null_is_an_empty_turn(server, double_log):
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "18 C"},
    ]
    with server.http() as http:
        answer = http.post("/api/chat", json={"model": QWEN, "messages": messages, "stream": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["eval_count"] == 4
    assert "role=tool" in log_lines(double_log, "RUN")[-1]


def test_ps_counts_every_kv_slot(server):
    client = client_for(server)
    client.generate(model=QWEN, prompt="")  # an empty prompt loads the model
    (loaded,) = client.ps().models
    assert loaded.model == QWEN
    assert loaded.size_vram == loaded.size == 2 * 300 << 20, "two KV slots of 300 MB each"


def test_format_is_refused_with_what_to_do_instead(server):
    client = client_for(server)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    for fmt in ("json", schema):
        with pytest.raises(ollama.ResponseError) as refused:
            client.chat(model=QWEN, messages=[{"role": "user", "content": "x"}], format=fmt)
        assert refused.value.status_code == 400
        assert "Omit format" in refused.value.error
        assert "validate the reply client-side" in refused.value.error


def test_unknown_paths_and_methods_name_the_supported_endpoints(server):
    with server.http() as http:
        missing = http.post("/api/embedx", json={})
        wrong_method = http.get("/api/chat")
        elsewhere = http.get("/nothing-here")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert isinstance(error, str) and "POST /api/embedx" in error
    assert "POST /api/chat" in error and "GET /api/tags" in error and "/v1/" not in error
    assert wrong_method.status_code == 405 and "use POST" in wrong_method.json()["error"]
    assert "GET /health" in elsewhere.json()["error"] and "POST /v1/responses" in elsewhere.json()["error"]


def test_images_are_refused_with_what_to_send_instead(server):
    with pytest.raises(ollama.ResponseError) as refused:
        client_for(server).chat(model=QWEN, messages=[{"role": "user", "content": "x", "images": ["aGk="]}])
    assert refused.value.status_code == 400
    assert "send the message without images" in refused.value.error


def test_openai_model_lookup_accepts_the_latest_tag_and_shows_no_file_path(server):
    with server.http() as http:
        tagged, auto = http.get(f"/v1/models/{QWEN}:latest"), http.get("/v1/models/auto:latest")
        other_tag = http.get(f"/v1/models/{QWEN}:7b")
    assert tagged.status_code == 200 and tagged.json()["id"] == QWEN
    assert auto.status_code == 200 and auto.json()["id"] == "auto"
    assert other_tag.status_code == 404 and other_tag.json()["error"]["code"] == "model_not_found"
    assert client_for(server).show(QWEN).modelfile == f"FROM {QWEN}\n"
