"""The playbooks and roles pass ansible-lint's production profile and Ansible's syntax check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import REPO_ROOT

BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )


def test_ansible_lint_production_profile_passes() -> None:
    result = _run("ansible-lint", "--profile", "production", "--offline", "--nocolor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_site_playbook_syntax_is_valid() -> None:
    result = _run("ansible-playbook", "--syntax-check", "-i", "inventory/production.example", "site.yml")
    assert result.returncode == 0, result.stdout + result.stderr
