"""A real uvicorn server on 127.0.0.1 (random free port) over the real binding and the C double, and
the server config as the rkllm_server role renders it."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from balancer_harness import local_host, run_role_tasks

from rkllm_runtime.app import create_app
from rkllm_runtime.cli import uvicorn_config
from rkllm_runtime.config import parse_config
from rkllm_runtime.scheduler import Scheduler
from tests.support import REPO_ROOT, wait_until

QWEN = "Qwen2.5-1.5B-Instruct"
R1 = "DeepSeek-R1-Distill-Qwen-1.5B"


@dataclass
class RunningServer:
    url: str
    scheduler: Scheduler

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)


@contextmanager
def serve(
    library: Path,
    models: list[dict[str, Any]],
    uvicorn_settings: dict[str, Any] | None = None,
    **settings: Any,
) -> Iterator[RunningServer]:
    """A server with the board's uvicorn settings (cli.uvicorn_config), some overridden if asked."""
    uvicorn_settings = uvicorn_settings or {}
    config = parse_config({"library": str(library), "models": models, **settings})
    app = create_app(config)
    sock = socket.socket()
    # Without it every request through this socket waited ~40 ms (Nagle against delayed ACK).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, "warning", access_log=False, **uvicorn_settings)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn started (or its thread ended)")
        assert server.started, "server failed to start"
        yield RunningServer(f"http://127.0.0.1:{port}", app.state.scheduler)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def log_lines(log: Path, kind: str) -> list[str]:
    """Lines of the double's log that start with kind (INIT, RUN, FINISH, ABORT, VIOLATION)."""
    if not log.exists():
        return []
    return [line for line in log.read_text().splitlines() if line.startswith(kind)]


def model_entry(
    make_model: Callable[..., Path],
    name: str = QWEN,
    *,
    kind: str = "quick",
    template: str = "chatml",
    config: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A [[models]] entry whose file is a fresh fake model (fields: fake model settings)."""
    path = make_model(name.lower().replace(".", "_"), **fields)
    return {"name": name, "path": str(path), "kind": kind, "template": template, **(config or {})}


@pytest.fixture
def start_server(double_library_path: Path, double_log: Path) -> Iterator[Callable[..., RunningServer]]:
    """start_server([model entries], **settings) -> a running server; stopped after the test."""
    stack = ExitStack()

    def start(models: list[dict[str, Any]], **settings: Any) -> RunningServer:
        return stack.enter_context(serve(double_library_path, models, **settings))

    with stack:
        yield start


def render_server_config(workdir: Path, models: list[dict[str, Any]], **role_vars: Any) -> Path:
    """Run the rkllm_server role's config tasks (template + the server's --check) on this machine."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    venv = home / "current"
    if not venv.exists():
        venv.symlink_to(REPO_ROOT / ".venv")  # the role checks with <home>/current/bin/rkllm-server
    config = workdir / "config.toml"
    host_vars = {
        **local_host(),
        "rkllm_server_home": str(home),
        "rkllm_server_config_path": str(config),
        "rkllm_server_template_dir": str(workdir / "templates"),
        "rkllm_server_group": "root",
        "rkllm_server_models": models,
        **role_vars,
    }
    inventory = {"all": {"hosts": {"board1": host_vars}}}
    run_role_tasks(workdir, inventory, {}, role="rkllm_server", tasks_from="config", hosts="all")
    return config
