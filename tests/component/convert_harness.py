"""Builds a wheel of the stand-in RKLLM-Toolkit and runs ansible/convert_models.yml locally."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

from tests.support import REPO_ROOT

FAKE_TOOLKIT = REPO_ROOT / "tests/component/ops_fixtures/fake_rkllm_toolkit"
WHEEL_NAME = "rkllm_toolkit-1.2.3-py3-none-any.whl"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_fake_wheel(directory: Path) -> tuple[Path, str]:
    """A pure-Python wheel holding the stand-in `rkllm` package; returns (path, sha256)."""
    dist_info = "rkllm_toolkit-1.2.3.dist-info"
    files = {f"rkllm/{p.name}": p.read_bytes() for p in sorted((FAKE_TOOLKIT / "rkllm").glob("*.py"))}
    files[f"{dist_info}/METADATA"] = b"Metadata-Version: 2.1\nName: rkllm-toolkit\nVersion: 1.2.3\n"
    files[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: rkllm-fleet-tests\n"
                                   b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = [_record_line(name, data) for name, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


def run_playbook(playbook: Path, variables: dict[str, Any], env: dict[str, str] | None = None,
                 timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO_ROOT / ".venv/bin/ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
         "-e", json.dumps(variables)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout, check=False, env=env,
    )
