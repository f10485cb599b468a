"""Shared fixtures: repo paths, the C test double (built once per session), fake models, its log."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKELIB_DIR = REPO_ROOT / "tests" / "fakelib"
DOUBLE_BUILD_DIR = REPO_ROOT / "build"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


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


def write_model(directory: Path, name: str = "tiny", **fields: object) -> Path:
    """Write a fake .rkllm model (format in tests/fakelib); fields override the defaults."""
    settings: dict[str, object] = {
        "format": "rkllm-double/1",
        "name": name,
        "toolkit_version": "1.2.3",
        "target_platform": "rk3588",
        "max_context": 4096,
        "memory_mb": 512,
        "decode_tokens_per_second": 0,
        "prefill_ms_per_token": 0,
        "reply_tokens": 12,
        "vocab": "Hello|,| world| é| 世界| 🙂| NPU| fleet| token| board| rock| chip",
        "think": "false",
        "split_utf8_every": 0,
        "fragment_every": 0,
        "error_at_token": -1,
        "segv_at_token": -1,
        "fail_init": "false",
        "slow_abort_ms": 0,
    }
    settings.update(fields)
    path = directory / f"{name}.rkllm"
    path.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
    return path


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
