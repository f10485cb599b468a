"""The Python code stays ruff-clean and mypy-strict-clean (rules in pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGE = "rkllm_runtime"


def test_ruff_finds_nothing() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    done = subprocess.run([str(ruff), "check", PACKAGE, "tests", "bench"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_finds_nothing_in_the_whole_package() -> None:
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "-p", PACKAGE], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # A module left out of the check (an exclude in the config, a package without __init__.py)
    # would pass silently: every source file must have been checked.
    checked = re.search(r"no issues found in (\d+) source files", done.stdout)
    assert checked is not None, done.stdout
    assert int(checked.group(1)) == len(list((REPO_ROOT / PACKAGE).rglob("*.py")))
