"""Real `rkllm-server` processes on 127.0.0.1 over the C double, which can be stopped and restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support import free_port, wait_until

SERVER_BIN = Path(sys.executable).parent / "rkllm-server"


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class LocalServer:
    library: Path
    models: dict[str, Path]
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [str(SERVER_BIN), "--lib", str(self.library), "--port", str(self.port),
                "--log-level", "warning"]
        for name, path in self.models.items():
            argv += ["--model", f"{name}={path}"]
        log = (self.log_dir / f"server-{self.port}.log").open("ab")
        self.process = subprocess.Popen(argv, env={**os.environ, **self.env}, stdout=log, stderr=log)
        log.close()
        wait_until(lambda: _healthy(self.url) or self.process.poll() is not None,
                   "the server answers /health (or exits)", deadline_s=30, interval=0.05)
        assert self.process.poll() is None, (self.log_dir / f"server-{self.port}.log").read_text()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def local_servers(servers: list[LocalServer]) -> Iterator[list[LocalServer]]:
    with ExitStack() as stack:
        for server in servers:
            stack.callback(server.stop)
            server.start()
        yield servers
