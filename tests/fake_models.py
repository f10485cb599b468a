"""Fake .rkllm model files for the C test double (their format: tests/fakelib)."""

from __future__ import annotations

from pathlib import Path


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
