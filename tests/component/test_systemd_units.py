"""The systemd units the roles install, rendered by Ansible from the roles' templates and defaults,
rated by `systemd-analyze security --offline=yes` (exposure 0 = locked down, 10 = unprotected)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from balancer_harness import ANSIBLE_PLAYBOOK, local_host

from tests.support import REPO_ROOT

MAX_EXPOSURE = 2.5
# What the rknpu driver (0.9.x, a DRM driver: "Initialized rknpu ... on minor 1") exposes to user space.
NPU_DEVICE = "/dev/dri/renderD129"

_PLAY = """\
- name: Render one unit template with its role's defaults
  hosts: board1
  gather_facts: false
  vars_files:
    - {repo}/roles/{role}/defaults/main.yml
{extra_vars_files}
  tasks:
    - name: Render the unit
      ansible.builtin.template:
        src: {repo}/roles/{role}/templates/{template}
        dest: {dest}
        mode: "0644"
"""


def render_unit(workdir: Path, role: str, template: str, variables: dict[str, Any]) -> Path:
    """The unit as the role installs it (the file name is the unit's name: systemd-analyze needs it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    unit = workdir / template.removesuffix(".j2")
    role_vars = REPO_ROOT / "roles" / role / "vars" / "main.yml"
    extra = f"    - {role_vars}\n" if role_vars.exists() else ""
    play = workdir / "play.yml"
    play.write_text(_PLAY.format(repo=REPO_ROOT, role=role, template=template, dest=unit,
                                 extra_vars_files=extra))
    (workdir / "inventory.json").write_text(json.dumps({"all": {"hosts": {"board1": local_host()}}}))
    (workdir / "vars.json").write_text(json.dumps(variables))
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"),
           "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(workdir / "inventory.json"), "-e", f"@{workdir / 'vars.json'}",
         str(play)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return unit


def exposure(unit: Path) -> tuple[float, str]:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), done.stdout


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def server_unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_unit(
        tmp_path_factory.mktemp("server-unit"),
        "rkllm_server",
        "rkllm-server.service.j2",
        {"_rkllm_server_devices": {"files": [{"path": NPU_DEVICE}]}, "rkllm_server_models": []},
    )


@pytest.fixture(scope="module")
def collector_unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("collector-unit")
    return render_unit(workdir, "monitoring", "rknpu-textfile-collector.service.j2", {})


@pytest.mark.parametrize("unit_fixture", ["server_unit", "collector_unit"])
def test_each_unit_is_rated_at_most_2_5(unit_fixture: str, request: pytest.FixtureRequest) -> None:
    unit: Path = request.getfixturevalue(unit_fixture)
    score, report = exposure(unit)
    print(f"systemd-analyze security {unit.name}: exposure {score}")
    assert score <= MAX_EXPOSURE, report


def test_the_server_unit_allows_the_npu_and_nothing_else_of_dev(server_unit: Path) -> None:
    found = directives(server_unit)
    assert found["DevicePolicy"] == ["closed"]
    assert found["DeviceAllow"] == ["char-drm rw"], "the DRM nodes (rknpu is a DRM driver), no other"
    assert found["CapabilityBoundingSet"] == [""]
    assert found["MemoryDenyWriteExecute"] == ["yes"]
    assert found["ProtectProc"] == ["invisible"]
    assert "ProcSubset" not in found, "it hides /proc/stat: the process_* metrics would vanish"


def test_the_server_unit_has_systemd_watch_the_server(server_unit: Path) -> None:
    found = directives(server_unit)
    assert found["WatchdogSec"] == ["30"] and found["NotifyAccess"] == ["main"]
    assert found["Restart"] == ["on-failure"], "a watchdog kill counts as a failure"


def test_a_misc_rknpu_node_is_allowed_by_path(tmp_path: Path) -> None:
    devices = {"files": [{"path": "/dev/rknpu"}, {"path": NPU_DEVICE}]}
    variables = {"_rkllm_server_devices": devices}
    unit = render_unit(tmp_path, "rkllm_server", "rkllm-server.service.j2", variables)
    assert directives(unit)["DeviceAllow"] == ["char-drm rw", "/dev/rknpu rw"]


@pytest.mark.parametrize(
    ("debugfs", "proc_subset"), [("/sys/kernel/debug/rknpu", True), ("/proc/rknpu", False)]
)
def test_the_collector_keeps_its_rknpu_files_visible(tmp_path: Path, debugfs: str, proc_subset: bool) -> None:
    """ProcSubset=pid would hide /proc/rknpu (the driver's CONFIG_ROCKCHIP_RKNPU_PROC_FS variant)."""
    variables = {"monitoring_rknpu_debugfs_dir": debugfs}
    unit = render_unit(tmp_path, "monitoring", "rknpu-textfile-collector.service.j2", variables)
    found = directives(unit)
    assert ("ProcSubset" in found) is proc_subset
    assert exposure(unit)[0] <= MAX_EXPOSURE
