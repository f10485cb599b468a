"""ansible-playbook against a simulated fleet, from the repository root, as an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fleet.sim import Fleet

from tests.support import REPO_ROOT


def playbook(fleet: Fleet, path: str, *extra: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run a playbook on the fleet's inventory; fail the test with the output's tail unless it succeeds."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(fleet.inventory_path.parent),
         path, *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-3000:]
    return result
