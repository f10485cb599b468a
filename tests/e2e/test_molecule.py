"""Every role's Molecule scenario (create, check on pristine hosts, converge, idempotence, verify,
destroy), one per role, all in parallel as tests/molecule/test-all.sh runs them: the four board roles,
nginx_lb, fleet_firewall, monitoring, balancer_vip (two balancers) and fleet_bootstrap (hosts booted
like vendor images) on simulated fleets; controller_fetch and rkllm_convert on the controller."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(1800)]

ROLES = sorted(path.name for path in (REPO_ROOT / "roles").iterdir() if path.is_dir())


def test_every_role_scenario_passes(double_build: Path) -> None:
    done = subprocess.run([str(REPO_ROOT / "tests/molecule/test-all.sh")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1700, check=False,
                          env={**os.environ, "PATH": f"{REPO_ROOT}/.venv/bin:{os.environ['PATH']}"})
    print("\n".join(line for line in done.stdout.splitlines() if line.startswith("molecule ")))
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    passed = {line.split()[1].rstrip(":") for line in done.stdout.splitlines() if " rc=0 in " in line}
    assert passed == set(ROLES), done.stdout
