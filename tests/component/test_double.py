"""The librkllmrt 1.2.3 test double: its C self-test (host, sanitizers, aarch64 under qemu), its layout
probe against the reference layout, and its exported symbols.

The behavioural checks live in tests/fakelib/double_selftest.c so they drive the double through our C
header exactly as a C client would; here we build and run them and require every test to report ok.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

QEMU = "/usr/bin/qemu-aarch64-static"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
API_SYMBOLS = {
    "rkllm_createDefaultParam",
    "rkllm_init",
    "rkllm_load_lora",
    "rkllm_load_prompt_cache",
    "rkllm_release_prompt_cache",
    "rkllm_destroy",
    "rkllm_run",
    "rkllm_run_async",
    "rkllm_abort",
    "rkllm_is_running",
    "rkllm_clear_kv_cache",
    "rkllm_get_kv_cache_size",
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_set_cross_attn_params",
}
ONLY_IN_1_2 = {
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_get_kv_cache_size",
    "rkllm_set_cross_attn_params",
    "rkllm_clear_kv_cache",
}


def run_on(
    arch: str, binary: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    # Called through qemu explicitly so the test does not depend on binfmt being registered.
    prefix = [] if arch == "host" else [QEMU, "-L", AARCH64_SYSROOT]
    return subprocess.run(
        [*prefix, str(binary), *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


def assert_selftest_passes(arch: str, binary: Path, models: Path, env: dict[str, str] | None = None) -> None:
    names = run_on(arch, binary, "--list").stdout.split()
    assert len(names) >= 20
    result = run_on(arch, binary, str(models), env=env)
    passed = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    # The double's own info lines would bury the failed checks and sanitizer reports.
    diagnostics = [line for line in result.stderr.splitlines() if not line.startswith("I rkllm")]
    assert result.returncode == 0 and passed == set(names), (
        f"failed: {sorted(set(names) - passed)}\n{result.stdout}\n" + "\n".join(diagnostics[-80:])
    )


def test_selftest_against_host_library(double_build: Path, fakelib_dir: Path) -> None:
    assert_selftest_passes("host", double_build / "host" / "double_selftest", fakelib_dir / "models")


def test_selftest_under_address_and_undefined_sanitizers(double_build: Path, fakelib_dir: Path) -> None:
    # handle_segv=0 lets the segv_at_token child die of SIGSEGV as the real library would.
    env = {
        **os.environ,
        "ASAN_OPTIONS": "handle_segv=0:detect_leaks=1",
        "UBSAN_OPTIONS": "print_stacktrace=1",
    }
    assert_selftest_passes(
        "host", double_build / "host" / "double_selftest_asan", fakelib_dir / "models", env
    )


def test_selftest_against_aarch64_library_under_qemu(double_build: Path, fakelib_dir: Path) -> None:
    assert_selftest_passes("aarch64", double_build / "aarch64" / "double_selftest", fakelib_dir / "models")


@pytest.mark.parametrize("arch", ["host", "aarch64"])
def test_layout_probe_matches_reference_byte_for_byte(
    double_build: Path, fakelib_dir: Path, arch: str
) -> None:
    result = run_on(arch, double_build / arch / "layout_probe")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (fakelib_dir / "reference-layout-1.2.3.txt").read_text()


def exported_functions(library: Path) -> set[str]:
    listing = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return {fields[2] for fields in (line.split() for line in listing.splitlines()) if len(fields) == 3}


@pytest.mark.parametrize("arch", ["host", "aarch64"])
def test_double_exports_exactly_the_api(double_build: Path, arch: str) -> None:
    assert exported_functions(double_build / arch / "librkllmrt.so") == API_SYMBOLS
    assert exported_functions(double_build / arch / "librkllmrt_114.so") == API_SYMBOLS - ONLY_IN_1_2
