"""Every role tags its entry tasks by phase, so `--tags <phase>` runs that phase of every role.

Each top-level task of roles/<role>/tasks/main.yml carries [<role>, <role>_<phase>, <phase>] with exactly
one phase; the playbooks reach those tags (`--list-tags`), and `site.yml --tags preflight` lists the
preflight of every role it plays and nothing else but the tasks Ansible runs under any tag.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import REPO_ROOT

BIN = Path(sys.executable).parent
ROLES_DIR = REPO_ROOT / "roles"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks" / "main.yml").is_file())
PHASES = frozenset({"preflight", "install", "configure", "run", "verify", "smoke"})
EXAMPLE_INVENTORY = "inventory/production.example"
# The roles each playbook plays (controller_fetch through the board roles' preflight).
PLAYBOOK_ROLES = {
    "site.yml": ("rknpu_driver", "rkllm_lib", "rkllm_models", "rkllm_server", "controller_fetch",
                 "fleet_firewall", "nginx_lb", "balancer_vip"),
    "ansible/monitoring.yml": ("monitoring",),
    "ansible/convert_models.yml": ("rkllm_convert",),
    "ansible/bootstrap.yml": ("fleet_bootstrap",),
}
INCLUDES = {"ansible.builtin.import_tasks", "ansible.builtin.include_tasks", "ansible.builtin.import_role"}
# A task line of --list-tasks: "      <role> : <name>\tTAGS: [a, b]" (no role for a play's own tasks).
LISTED_TASK = re.compile(r"^ {6}(?:(?P<role>\w+) : )?(?P<name>.*?)\tTAGS: \[(?P<tags>[^\]]*)\]$")


def _entry_tasks(role: str) -> list[dict[str, Any]]:
    tasks = yaml.safe_load((ROLES_DIR / role / "tasks" / "main.yml").read_text())
    assert isinstance(tasks, list) and tasks, f"{role}: tasks/main.yml has no tasks"
    return tasks


def _phase_of(role: str, task: dict[str, Any]) -> str:
    tags = {str(tag) for tag in task.get("tags", [])}
    phases = tags & PHASES
    assert role in tags and len(phases) == 1, (
        f"{role}: task {task['name']!r} needs the tag {role} and one phase of {sorted(PHASES)}, "
        f"has {sorted(tags)}"
    )
    (phase,) = phases
    role_phases = {tag for tag in tags if tag in {f"{role}_{p}" for p in PHASES}}
    assert role_phases == {f"{role}_{phase}"}, (
        f"{role}: task {task['name']!r} is {phase} but tagged {sorted(tags)}"
    )
    return phase


def _ansible_playbook(*argv: str) -> str:
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", EXAMPLE_INVENTORY, *argv],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@cache
def _listed_tags(playbook: str) -> frozenset[str]:
    listed: set[str] = set()
    for line in _ansible_playbook(playbook, "--list-tags").splitlines():
        if "TASK TAGS: [" in line:
            tags = line.split("TASK TAGS: [", 1)[1].rstrip("]").split(",")
            listed.update(tag.strip() for tag in tags if tag.strip())
    return frozenset(listed)


@pytest.mark.parametrize("role", ROLES)
def test_every_entry_task_carries_its_role_and_one_phase(role: str) -> None:
    for task in _entry_tasks(role):
        _phase_of(role, task)
        include = task.get("ansible.builtin.include_tasks")
        if include is not None:
            # An include's own tags only select the include: its tasks get them through apply.
            applied = include.get("apply", {}).get("tags", []) if isinstance(include, dict) else []
            assert set(applied) == set(task["tags"]), f"{role}: {task['name']!r} does not apply its tags"


def test_every_role_is_played_by_a_playbook_with_its_phase_tags() -> None:
    played = sorted(role for roles in PLAYBOOK_ROLES.values() for role in roles)
    assert played == ROLES
    for playbook, roles in PLAYBOOK_ROLES.items():
        for role in roles:
            expected = {role} | {f"{role}_{_phase_of(role, task)}" for task in _entry_tasks(role)}
            missing = expected - _listed_tags(playbook)
            assert not missing, f"{playbook} --list-tags lacks {sorted(missing)}"


def test_site_lists_every_phase_it_runs() -> None:
    assert {"preflight", "install", "configure", "run", "smoke"} <= _listed_tags("site.yml")


def _listed_tasks(*argv: str) -> list[tuple[str, str, str, frozenset[str]]]:
    """(play, role, task name, tags) of every task `--list-tasks` prints."""
    listed: list[tuple[str, str, str, frozenset[str]]] = []
    play = ""
    for line in _ansible_playbook("site.yml", "--list-tasks", *argv).splitlines():
        if line.startswith("  play #"):
            play = line.split("\t", 1)[0].strip()
        elif match := LISTED_TASK.match(line):
            tags = frozenset(tag.strip() for tag in match["tags"].split(",") if tag.strip())
            listed.append((play, match["role"] or "", match["name"], tags))
    return listed


def _preflight_task_names(role: str) -> set[str]:
    """The names of the tasks a role's preflight.yml runs itself (not through other files)."""
    path = ROLES_DIR / role / "tasks" / "preflight.yml"
    tasks = yaml.safe_load(path.read_text()) if path.is_file() else []
    return {task["name"] for task in tasks if not INCLUDES & set(task) and "{{" not in task["name"]}


def test_site_preflight_tag_runs_every_preflight_and_nothing_else() -> None:
    every_task = _listed_tasks()
    preflight_only = _listed_tasks("--tags", "preflight")
    for play, role, name, tags in preflight_only:
        # Ansible runs `always` tasks under any tag: argument validation and read-only restart bookkeeping.
        assert "preflight" in tags or "always" in tags, f"{play}: {role} : {name} has tags {sorted(tags)}"
    # Wherever site.yml plays a role's preflight checks, --tags preflight plays them there too.
    preflight_checks = [(play, role, name) for play, role, name, _ in every_task
                        if role and name in _preflight_task_names(role)]
    assert preflight_checks == [(play, role, name) for play, role, name, _ in preflight_only
                                if role and name in _preflight_task_names(role)]
    checked_roles = {role for _, role, _ in preflight_checks}
    assert checked_roles >= {"balancer_vip", "fleet_firewall", "nginx_lb", "rknpu_driver"}
    played = {role for _, role, _, tags in preflight_only if role and "preflight" in tags}
    assert played == set(PLAYBOOK_ROLES["site.yml"])
