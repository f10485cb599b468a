"""What every test, simulator and bench module shares: the repo root, a deadline poller, a free port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str, *, deadline_s: float = 10.0,
               interval: float = 0.01) -> T:
    """Poll condition until it returns something truthy and return that; never a fixed sleep.

    Raises AssertionError naming what was awaited when deadline_s passes first.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        time.sleep(interval)


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick) on address."""
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])
