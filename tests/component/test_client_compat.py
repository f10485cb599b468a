"""Real client libraries, each with its default settings, against a real server on the double.

Each client runs in its own process (tests/compat/drive.py) with every connection beyond this machine
refused and recorded, so a library that fetches data from the internet fails here. litellm and
llama-index need openai 2.x while the rest of the suite pins openai 3.x, so they run from a second
environment built by `make venv` from requirements/compat-clients.txt. The test prints the matrix
(client x feature) and fails on any "broken" cell; README.md carries the same matrix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from compat.cells import FEATURES
from compat.drive import CLIENTS
from fake_models import write_model
from server_harness import QWEN, serve

from tests.support import REPO_ROOT, wait_until

BUSY = "Busy-Model"
EMBEDDER = "Qwen3-Embedding-0.6B"
EMBEDDING_SIZE = 64
SECOND_ENVIRONMENT = {
    "litellm openai/",
    "litellm ollama_chat/",
    "llama-index OpenAILike",
    "llama-index Ollama",
}
CLIENTS_PYTHON = Path(
    os.environ.get("RKLLM_COMPAT_PYTHON", REPO_ROOT / ".venv" / "clients" / "bin" / "python")
)
VOCABULARY = "Hello|,| world| é| 世界| 🙂| NPU| fleet| token| board| rock| chip"
README_START = "<!-- client matrix start -->"
README_END = "<!-- client matrix end -->"


def python_for(client: str) -> str:
    return str(CLIENTS_PYTHON) if client in SECOND_ENVIRONMENT else sys.executable


def run_client(client: str, arguments: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [python_for(client), "-m", "tests.compat.drive", client, *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"},
    )
    if done.returncode != 0:
        return {
            "client": client,
            "cells": dict.fromkeys(FEATURES, f"broken: driver failed: {done.stderr[-600:]}"),
        }
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def occupy(url: str, model: str, started: threading.Event, stop: threading.Event) -> None:
    """Hold the busy model's only place with a long stream until the clients are done."""
    body = {"model": model, "messages": [{"role": "user", "content": "keep busy"}], "stream": True}
    with (
        httpx.Client(base_url=url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as answer,
    ):
        for _ in answer.iter_lines():
            started.set()
            if stop.is_set():
                return


def render(rows: dict[str, dict[str, Any]]) -> str:
    def cell(outcome: str) -> str:
        return "broken" if outcome.startswith("broken") else outcome

    lines = ["| client | " + " | ".join(FEATURES) + " |", "|---" * (len(FEATURES) + 1) + "|"]
    for client, row in rows.items():
        lines.append(f"| {client} | " + " | ".join(cell(row["cells"][f]) for f in FEATURES) + " |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def matrix(
    double_library_path: Path, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[dict[str, dict[str, Any]]]:
    assert CLIENTS_PYTHON.exists(), f"{CLIENTS_PYTHON} is missing: `make venv` builds it"
    models_dir = tmp_path_factory.mktemp("compat-models")
    models = [
        {
            "name": QWEN,
            "path": str(
                write_model(models_dir, "qwen", reply_tokens=len(VOCABULARY.split("|")), vocab=VOCABULARY)
            ),
        },
        {
            "name": BUSY,
            "path": str(write_model(models_dir, "busy", reply_tokens=100000, decode_tokens_per_second=20)),
            "queue_size": 0,
        },
        {
            "name": EMBEDDER,
            "path": str(write_model(models_dir, "embedder", embd_size=EMBEDDING_SIZE)),
            "kind": "embedding",
        },
    ]
    # Retry-After of 1 s: the clients that honour it retry within the test's time.
    with serve(double_library_path, models, retry_after_max_seconds=1) as server:
        started, stop = threading.Event(), threading.Event()
        holder = threading.Thread(target=occupy, args=(server.url, BUSY, started, stop), daemon=True)
        holder.start()
        wait_until(started.is_set, "the server thread started", deadline_s=30)
        arguments = [server.url, QWEN, BUSY, EMBEDDER, VOCABULARY]
        # The second environment's clients take longest to import: they start first.
        slowest_first = sorted(CLIENTS, key=lambda client: client not in SECOND_ENVIRONMENT)
        with ThreadPoolExecutor(max_workers=3) as pool:
            rows = dict(
                zip(slowest_first, pool.map(lambda c: run_client(c, arguments), slowest_first), strict=True)
            )
        results = {client: rows[client] for client in CLIENTS}
        stop.set()
        holder.join(timeout=30)
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    reporter.write_line("\nClient compatibility (client x feature):\n" + render(results))
    for client, row in results.items():
        timings = ", ".join(f"{feature} {seconds}" for feature, seconds in row.get("seconds", {}).items())
        reporter.write_line(f"{client}: setup {row.get('setup_seconds')} s; {timings}")
        for feature, outcome in row["cells"].items():
            if outcome.startswith("broken"):
                reporter.write_line(f"{client} / {feature}: {outcome[:500]}")
    yield results


@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_works_or_refuses_clearly_offline(matrix: dict[str, dict[str, Any]], client: str) -> None:
    row = matrix[client]
    broken = {feature: outcome for feature, outcome in row["cells"].items() if outcome.startswith("broken")}
    assert not broken, f"{client}: {broken}"
    assert row["outbound"] == [], f"{client} tried to reach the internet: {row['outbound']}"
    assert row["tiktoken_cache"] == [], "no tokenizer encoding was needed"


def test_the_offline_guard_refuses_and_records_connections_beyond_this_machine() -> None:
    probe = """
import json, socket
from tests.compat.offline import go_offline
guard = go_offline()
def connect():
    socket.socket().connect(("192.0.2.1", 443))
def resolve():
    socket.getaddrinfo("pypi.org", 443)
for attempt in (connect, resolve):
    try:
        attempt()
    except ConnectionRefusedError:
        pass
with socket.create_server(("127.0.0.1", 0)) as listener:
    socket.create_connection(listener.getsockname()).close()
print(json.dumps(guard.attempts))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
    )
    assert json.loads(done.stdout) == ["socket.connect 192.0.2.1", "socket.getaddrinfo pypi.org"]


def test_readme_shows_the_matrix_of_this_run(matrix: dict[str, dict[str, Any]]) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    shown = readme.split(README_START)[1].split(README_END)[0].strip()
    assert shown == render(matrix)
