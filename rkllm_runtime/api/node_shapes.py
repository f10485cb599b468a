"""What a board's own probes answer: /health (the process is alive) and /ready (its models answer)."""

from __future__ import annotations

from typing import Literal

from typing_extensions import TypedDict  # pydantic reads typing.TypedDict from 3.12 on


class NodeHealth(TypedDict):
    status: Literal["alive"]


class NodeReadiness(TypedDict):
    """200 when ready; 503 (same shape) when not ready or draining, so the balancer skips the board."""

    status: Literal["ready", "not ready", "draining"]
    models: dict[str, str]  # model name: "ok" or what its probe found wrong
