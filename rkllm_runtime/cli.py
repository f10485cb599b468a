"""`rkllm-server`: run one node's API server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import logging
import sys
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rkllm_runtime.config import ConfigError, ServerConfig, load_config, with_overrides
from rkllm_runtime.errors import LibraryError

STARTUP_FAILURE = 3  # uvicorn.run's exit status when the server never started

# Connection limits of the board's HTTP server (uvicorn), documented in rkllm_runtime/README.md.
# Idle keep-alive outlives nginx's upstream keepalive_timeout (60 s), so nginx always closes an idle
# upstream connection first and never sends a request into one the board is closing.
KEEP_ALIVE_SECONDS = 75
# A request head (request line + headers) must arrive within this time of the connection opening,
# or of its first byte after an idle keep-alive period; silent or trickling clients are cut off.
HEAD_TIMEOUT_SECONDS = 10
# Open connections plus running requests; above it uvicorn answers 503 at once. Two balancers hold
# at most 2 x (4 workers x 16 idle keepalive + 9 admitted) = 146, so 256 leaves room for scrapes.
MAX_CONNECTIONS = 256


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head, which uvicorn lacks."""

    head_timeout_seconds: float = HEAD_TIMEOUT_SECONDS
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        if not self._in_request() and self._head_deadline is None:
            self._arm_head_deadline()  # the first byte of a request on an idle keep-alive connection
        super().data_received(data)
        if self._in_request():
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout_seconds, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()


def uvicorn_config(app: Any, host: str, port: int, log_level: str, **overrides: Any) -> uvicorn.Config:
    """The board's HTTP server settings (tests run their servers with the same ones)."""
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "http": HeadTimeoutProtocol,
        "timeout_keep_alive": KEEP_ALIVE_SECONDS,
        "limit_concurrency": MAX_CONNECTIONS,
        "timeout_graceful_shutdown": 5,
        **overrides,
    }
    return uvicorn.Config(app, **settings)


def _model_flag(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rkllm-server", description=__doc__)
    parser.add_argument("--config", help="TOML config file (see rkllm_runtime/config.py for the format)")
    parser.add_argument("--lib", help="librkllmrt.so to load (overrides the config's library)")
    parser.add_argument(
        "--model",
        action="append",
        type=_model_flag,
        default=[],
        metavar="NAME=PATH",
        help="serve this model file under NAME (repeatable; overrides a configured path)",
    )
    parser.add_argument("--host", help="address to bind (default from config, else 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default from config, else 8080)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only validate the configuration and exit (2 with the reason if it is invalid); "
        "loads no library, so it can check a config before it is installed",
    )
    return parser.parse_args(argv)


def describe(config: ServerConfig) -> str:
    models = ", ".join(f"{m.name} ({m.template})" for m in config.models) or "none"
    return f"models: {models}; chat templates from {config.template_dir}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A crash inside librkllmrt kills the process; this at least prints where Python was.
    faulthandler.enable()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config) if args.config else ServerConfig()
        config = with_overrides(
            config, library=args.lib, host=args.host, port=args.port, models=dict(args.model)
        )
        if args.check:
            print(f"rkllm-server: config OK: {describe(config)}")
            return 0
        from rkllm_runtime.app import create_app

        app = create_app(config)
    except (ConfigError, LibraryError) as exc:
        print(f"rkllm-server: {exc}", file=sys.stderr)
        return 2
    server = uvicorn.Server(uvicorn_config(app, config.host, config.port, args.log_level))
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else STARTUP_FAILURE
