from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from rkllm_runtime import abi
from rkllm_runtime.errors import LibraryError
from rkllm_runtime.library import (
    DEFAULT_LIBRARY_PATH,
    OPEN_FILES_TARGET,
    load_library,
    resolve_library_path,
)
from tests.support import REPO_ROOT


def test_explicit_path_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RKLLM_LIB", "/from/env/librkllmrt.so")
    assert resolve_library_path("/explicit/librkllmrt.so") == Path("/explicit/librkllmrt.so")
    assert resolve_library_path() == Path("/from/env/librkllmrt.so")
    monkeypatch.delenv("RKLLM_LIB")
    assert resolve_library_path() == Path(DEFAULT_LIBRARY_PATH)


def test_missing_library_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "librkllmrt.so"
    with pytest.raises(LibraryError, match=str(missing)):
        load_library(missing)


def test_environment_variable_selects_the_library(
    double_library_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RKLLM_LIB", str(double_library_path))
    assert load_library().path == double_library_path


def test_refuses_a_library_without_the_1_2_symbols(double_build: Path) -> None:
    old = double_build / "host" / "librkllmrt_114.so"
    with pytest.raises(LibraryError) as refused:
        load_library(old)
    message = str(refused.value)
    assert "1.2.x" in message
    assert "rkllm_set_function_tools" in message
    assert str(old) in message


def test_prototypes_are_applied_from_the_table(double_library_path: Path) -> None:
    library = load_library(double_library_path)
    for name, (restype, argtypes) in abi.FUNCTIONS.items():
        function = getattr(library._cdll, name)
        assert function.restype is restype, name
        assert tuple(function.argtypes) == argtypes, name


def test_default_param_comes_back_by_value(double_library_path: Path) -> None:
    param = load_library(double_library_path).create_default_param()
    assert isinstance(param, abi.RKLLMParam)
    # Documented 1.2.3 defaults; a wrong return convention or layout would scramble them.
    assert (param.top_k, param.mirostat) == (40, 0)
    assert param.top_p == pytest.approx(0.9)
    assert param.repeat_penalty == pytest.approx(1.1)
    assert param.mirostat_tau == pytest.approx(5.0)
    assert (param.extend_param.enabled_cpus_num, param.extend_param.n_batch) == (4, 1)


def test_loading_raises_the_open_file_limit(double_library_path: Path) -> None:
    script = (
        "import resource, sys\n"
        "from rkllm_runtime.library import load_library\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "load_library(sys.argv[1])\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(double_library_path)],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    reachable = OPEN_FILES_TARGET if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_TARGET)
    # Root may lift the hard limit too (up to the target); anyone else gets at least the hard limit.
    assert reachable <= int(result.stdout) <= OPEN_FILES_TARGET
