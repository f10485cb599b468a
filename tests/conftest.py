"""Shared fixtures: the C test double (built once per session) and its paths, fake models, its log."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_models import write_model

from tests.support import REPO_ROOT

FAKELIB_DIR = REPO_ROOT / "tests" / "fakelib"
DOUBLE_BUILD_DIR = REPO_ROOT / "build"


@pytest.fixture(scope="session")
def fakelib_dir() -> Path:
    return FAKELIB_DIR


@pytest.fixture(scope="session")
def double_build() -> Path:
    """Build the test double (host and aarch64) once; returns the build directory."""
    subprocess.run(["make", "-s", "-C", str(FAKELIB_DIR)], check=True, capture_output=True, text=True)
    return DOUBLE_BUILD_DIR


@pytest.fixture(scope="session")
def double_library_path(double_build: Path) -> Path:
    return double_build / "host" / "librkllmrt.so"


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(name="tiny", reply_tokens=5, ...) -> path of a fresh fake model file."""

    def make(name: str = "tiny", **fields: object) -> Path:
        return write_model(tmp_path, name, **fields)

    return make


@pytest.fixture
def double_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point RKLLM_DOUBLE_LOG at a fresh file (read by the double at rkllm_init)."""
    log = tmp_path / "double.log"
    monkeypatch.setenv("RKLLM_DOUBLE_LOG", str(log))
    return log
