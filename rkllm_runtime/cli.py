"""`rkllm-server`: run one node's API server."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys

import uvicorn

from rkllm_runtime.config import ConfigError, ServerConfig, load_config, with_overrides
from rkllm_runtime.errors import LibraryError


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
    return f"models: {models}; custom templates: {', '.join(sorted(config.templates)) or 'none'}"


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
    uvicorn.run(
        app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5
    )
    return 0
