"""Polling with a deadline, for conditions on the simulated fleet (never a fixed sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 120,
               interval: float = 0.2) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {deadline_s}s: {what}"
        time.sleep(interval)
