"""ansible/convert_models.yml with a stand-in RKLLM-Toolkit: the calls it receives, the files it
writes, and the catalog entry installed by the rkllm_models role."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from convert_harness import FAKE_TOOLKIT, build_fake_wheel, run_playbook

from tests.support import REPO_ROOT

PLAYBOOK = REPO_ROOT / "ansible/convert_models.yml"
CONSUME = REPO_ROOT / "tests/component/ops_fixtures/consume_converted.yml"
SCRIPT = REPO_ROOT / "roles/rkllm_convert/files/rkllm-convert-model.py"
MODELS_SPEC = REPO_ROOT / "roles/rkllm_models/meta/argument_specs.yml"
SPEC_TYPES: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}


@pytest.fixture(scope="module")
def conversion(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("convert")
    wheel, sha256 = build_fake_wheel(root)
    qwen_source = root / "hf/Qwen2.5-3B-Instruct"
    qwen_source.mkdir(parents=True)
    variables = {
        "rkllm_convert_hosts": "all",
        "rkllm_convert_base_dir": str(root / "convert"),
        "rkllm_convert_python": "/usr/bin/python3",
        "rkllm_convert_toolkit_wheel_url": f"file://{wheel}",
        "rkllm_convert_toolkit_wheel_sha256": sha256,
        "rkllm_convert_environment": {"FAKE_RKLLM_TOOLKIT_RECORD": str(root / "calls.jsonl")},
        "rkllm_convert_models": [
            {"name": "Qwen2.5-3B-Instruct", "source": str(qwen_source)},
            {"name": "Phi-3-mini-4k-instruct", "max_context": 2048, "num_npu_core": 2},
        ],
    }
    first = run_playbook(PLAYBOOK, variables)
    assert first.returncode == 0, first.stdout + first.stderr
    calls = (root / "calls.jsonl").read_text()
    second = run_playbook(PLAYBOOK, variables)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"root": root, "output": root / "convert/output", "qwen_source": str(qwen_source),
            "calls": [json.loads(line) for line in calls.splitlines()],
            "calls_after_rerun": (root / "calls.jsonl").read_text(), "rerun": second.stdout}


def test_toolkit_receives_the_documented_api_calls(conversion: dict[str, Any]) -> None:
    output = conversion["output"]
    build = {"do_quantization": True, "optimization_level": 1, "quantized_dtype": "w8a8",
             "quantized_algorithm": "normal", "target_platform": "rk3588", "extra_qparams": None,
             "dataset": None}
    assert conversion["calls"] == [
        {"method": "load_huggingface",
         "arguments": {"model": conversion["qwen_source"], "model_lora": None, "device": "cpu"}},
        {"method": "build", "arguments": {**build, "num_npu_core": 3, "max_context": 4096}},
        {"method": "export_rkllm",
         "arguments": {"export_path": f"{output}/Qwen2.5-3B-Instruct.rkllm.partial"}},
        {"method": "load_huggingface",
         "arguments": {"model": "microsoft/Phi-3-mini-4k-instruct", "model_lora": None, "device": "cpu"}},
        {"method": "build", "arguments": {**build, "num_npu_core": 2, "max_context": 2048}},
        {"method": "export_rkllm",
         "arguments": {"export_path": f"{output}/Phi-3-mini-4k-instruct.rkllm.partial"}},
    ]


def test_rerun_converts_nothing(conversion: dict[str, Any]) -> None:
    assert len(conversion["calls_after_rerun"].splitlines()) == len(conversion["calls"])
    assert "changed=0" in conversion["rerun"]


def test_outputs_model_checksum_and_catalog_entry(conversion: dict[str, Any]) -> None:
    output: Path = conversion["output"]
    model = output / "Qwen2.5-3B-Instruct.rkllm"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    sha_file = (output / "Qwen2.5-3B-Instruct.rkllm.sha256").read_text()
    assert sha_file == f"{digest}  Qwen2.5-3B-Instruct.rkllm\n"
    assert not list(output.glob("*.partial"))
    [entry] = yaml.safe_load((output / "Qwen2.5-3B-Instruct.catalog.yml").read_text())
    assert entry == {
        "name": "Qwen2.5-3B-Instruct", "url": f"file://{output}/Qwen2.5-3B-Instruct.rkllm", "sha256": digest,
        "size_mb": 1, "memory_mb": 3300, "toolkit_version": "1.2.3", "kind": "quick", "template": "chatml",
        "context_length": 4096, "expected_tokens_per_second": 8.7,
    }
    combined = yaml.safe_load((output / "catalog.yml").read_text())["rkllm_models_catalog"]
    assert [e["name"] for e in combined] == ["Qwen2.5-3B-Instruct", "Phi-3-mini-4k-instruct"]
    assert combined[1]["context_length"] == 2048 and combined[1]["memory_mb"] == 3748


def test_catalog_entries_match_the_models_role_argument_spec(conversion: dict[str, Any]) -> None:
    options = yaml.safe_load(MODELS_SPEC.read_text())["argument_specs"]["main"]["options"]
    fields = options["rkllm_models_catalog"]["options"]
    for entry in yaml.safe_load((conversion["output"] / "catalog.yml").read_text())["rkllm_models_catalog"]:
        assert set(entry) <= set(fields)
        assert {k for k, f in fields.items() if f.get("required")} <= set(entry)
        for key, value in entry.items():
            assert isinstance(value, SPEC_TYPES[fields[key]["type"]]), key
            assert value in fields[key].get("choices", [value])


def test_models_role_installs_the_converted_models(conversion: dict[str, Any], tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16303132 kB\n")
    run = run_playbook(CONSUME, {
        "converted_catalog": str(conversion["output"] / "catalog.yml"),
        "rkllm_models_enabled": ["Qwen2.5-3B-Instruct", "Phi-3-mini-4k-instruct"],
        "rkllm_models_dir": str(tmp_path / "board/models"),
        "rkllm_models_cache_dir": str(tmp_path / "controller-cache"),
        "rkllm_models_meminfo_path": str(meminfo),
    })
    assert run.returncode == 0, run.stdout + run.stderr
    for name in ("Qwen2.5-3B-Instruct", "Phi-3-mini-4k-instruct"):
        installed = (tmp_path / f"board/models/current/{name}.rkllm").read_bytes()
        assert installed == (conversion["output"] / f"{name}.rkllm").read_bytes()


def test_failed_toolkit_step_leaves_no_model(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(FAKE_TOOLKIT), "FAKE_RKLLM_TOOLKIT_FAIL": "build",
           "FAKE_RKLLM_TOOLKIT_RECORD": str(tmp_path / "calls")}
    argv = [sys.executable, str(SCRIPT), "--source", "x", "--output", str(tmp_path / "m.rkllm")]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode != 0
    assert "build failed with status -1" in run.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "calls"]


def test_python_newer_than_the_toolkit_supports_is_refused(tmp_path: Path) -> None:
    python = tmp_path / "python3.13"
    python.write_text("#!/bin/sh\necho 3.13\n")
    python.chmod(0o755)
    run = run_playbook(PLAYBOOK, {
        "rkllm_convert_hosts": "all", "rkllm_convert_python": str(python),
        "rkllm_convert_base_dir": str(tmp_path / "convert"),
        "rkllm_convert_toolkit_wheel_url": "file:///nonexistent.whl",
        "rkllm_convert_toolkit_wheel_sha256": "0" * 64,
    })
    assert run.returncode != 0
    assert "is Python 3.13, but rkllm-toolkit 1.2.3 needs 3.8 to 3.12" in run.stdout
    assert not (tmp_path / "convert").exists()
