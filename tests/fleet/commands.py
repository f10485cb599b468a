"""Subprocess helpers shared by the simulator modules."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


class SimError(RuntimeError):
    """A simulator step failed; the message says which and why."""


def run(args: Sequence[str], *, check: bool = True, input_text: str | None = None,
        timeout: float | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; a failure raises SimError carrying stderr."""
    proc = subprocess.run(list(args), capture_output=True, text=True, input=input_text,
                          timeout=timeout, env=env, check=False)
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise SimError(f"{' '.join(args)} exited {proc.returncode}: {detail}")
    return proc


def log(message: str) -> None:
    """Progress goes to stderr so stdout stays parseable (status, exec output)."""
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


def mount_points() -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]


def mounts_under(directory: Path) -> list[str]:
    """Mount points strictly below directory, deepest first so nested ones come off first."""
    prefix = str(directory) + "/"
    return sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True)
