"""What to benchmark: boards, the balancer and the model catalog, read from one JSON file.

Format (ansible/benchmark.yml writes it from the inventory)::

    {"boards": [{"name": "board1", "url": "http://10.0.0.11:8080", "ram_mb": 8192}],
     "balancer_url": "http://10.0.0.2",            # optional
     "balancer_api_key": "...",                    # optional, sent as a Bearer token
     "catalog": [{"name": "Qwen2.5-1.5B-Instruct", "expected_tokens_per_second": 16.3,
                  "memory_mb": 1659, ...}]}       # the rkllm_models_catalog entries
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SIZE = re.compile(r"(\d+(?:\.\d+)?)[Bb](?![A-Za-z])")
# Families whose names do not carry the parameter count.
_SIZE_BY_FAMILY = {"phi-3-mini": "3.8B", "phi3-mini": "3.8B"}


class PlanError(ValueError):
    """The benchmark plan file is missing something."""


@dataclass(frozen=True)
class Board:
    name: str
    url: str
    ram_mb: int | None = None


@dataclass(frozen=True)
class CatalogModel:
    name: str
    expected_tokens_per_second: float | None = None
    memory_mb: int | None = None

    @property
    def size(self) -> str | None:
        """Parameter count as written in the name ("Qwen2.5-1.5B-Instruct" -> "1.5B")."""
        base = self.name.split("/")[-1].lower()
        family = next((size for prefix, size in _SIZE_BY_FAMILY.items() if base.startswith(prefix)), None)
        match = _SIZE.search(base)
        return family or (f"{match.group(1)}B" if match else None)


@dataclass(frozen=True)
class BenchPlan:
    boards: tuple[Board, ...]
    catalog: tuple[CatalogModel, ...]
    balancer_url: str | None = None
    balancer_api_key: str | None = None

    def model(self, name: str) -> CatalogModel:
        return next((m for m in self.catalog if m.name == name), CatalogModel(name))


def _number(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    return float(value) if isinstance(value, int | float) and value > 0 else None


def parse_plan(data: dict[str, Any]) -> BenchPlan:
    try:
        boards = tuple(
            Board(b["name"], b["url"].rstrip("/"), int(b["ram_mb"]) if b.get("ram_mb") else None)
            for b in data["boards"]
        )
        catalog = tuple(
            CatalogModel(
                m["name"], _number(m, "expected_tokens_per_second"),
                int(m["memory_mb"]) if m.get("memory_mb") else None,
            )
            for m in data.get("catalog", [])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"benchmark plan: boards need name and url, models a name ({exc})") from exc
    if not boards:
        raise PlanError("benchmark plan: no boards")
    balancer = data.get("balancer_url")
    return BenchPlan(boards, catalog, balancer.rstrip("/") if balancer else None,
                     data.get("balancer_api_key") or None)


def load_plan(path: Path) -> BenchPlan:
    return parse_plan(json.loads(path.read_text(encoding="utf-8")))
