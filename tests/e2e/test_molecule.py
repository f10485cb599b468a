"""Every role's Molecule scenario (create on the simulator, check on pristine hosts, converge,
idempotence, verify, destroy): the four board roles, nginx_lb and fleet_firewall, all in parallel as
tests/molecule/test-all.sh runs them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(1800)]



def test_every_role_scenario_passes(double_build: Path, capsys: pytest.CaptureFixture[str]) -> None:
    done = subprocess.run([str(REPO_ROOT / "tests/molecule/test-all.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1700, check=False,
                          env={**os.environ, "PATH": f"{REPO_ROOT}/.venv/bin:{os.environ['PATH']}"})
    with capsys.disabled():
        print("\n" + "\n".join(line for line in done.stdout.splitlines() if line.startswith("molecule ")))
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert done.stdout.count(": rc=0 in ") == 6, done.stdout
