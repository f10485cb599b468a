"""rkllm_server's controller-side build with boards pinned to different server sources (a canary):
each distinct source is built once, and every board gets the build of its own source."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from balancer_harness import ANSIBLE_PLAYBOOK

from tests.support import REPO_ROOT

PLAY = """\
- name: Build the server for each board
  hosts: all
  gather_facts: false
  tasks:
    # What the role's preflight records: the board's platform, here one for all.
    - name: Remember the wheelhouse
      ansible.builtin.set_fact:
        _rkllm_server_build: {platform: test, python: "3.11", key: prebuilt}
    - name: Build
      ansible.builtin.include_role:
        name: rkllm_server
        tasks_from: build
    - name: Report
      ansible.builtin.debug:
        msg: "release={{ _rkllm_server_release }} wheel={{ _rkllm_server_wheel_dir }}"
"""


def server_source(directory: Path, version: str) -> Path:
    directory.mkdir()
    shutil.copytree(REPO_ROOT / "rkllm_runtime", directory / "rkllm_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (directory / "pyproject.toml").write_text(
        (REPO_ROOT / "pyproject.toml").read_text().replace('version = "0.1.0"', f'version = "{version}"'))
    return directory


def test_each_pinned_server_source_is_built_once_and_each_board_gets_its_own(tmp_path: Path) -> None:
    sources = {"0.1.0": server_source(tmp_path / "stable", "0.1.0"),
               "0.1.9": server_source(tmp_path / "canary", "0.1.9")}
    cache = tmp_path / "cache"
    # The dependencies' wheelhouse is not what this test is about: the cache holds it already.
    (cache / "wheelhouse/prebuilt").mkdir(parents=True)
    pinned = {"board1": "0.1.0", "board2": "0.1.9", "board3": "0.1.0"}
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    hosts = {board: {**local, "rkllm_server_source_dir": str(sources[version])}
             for board, version in pinned.items()}
    inventory = {"all": {"vars": {"rkllm_server_cache_dir": str(cache)}, "hosts": hosts}}
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    (tmp_path / "play.yml").write_text(PLAY)
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO_ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")}
    argv = [str(ANSIBLE_PLAYBOOK), "-i", str(tmp_path / "inventory.json"), str(tmp_path / "play.yml")]
    run = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    built = run.stdout.split("Build the rkllm_runtime wheel of each distinct source]", 1)[1]
    built = built.split("TASK [", 1)[0]
    assert sorted(re.findall(r"^changed: \[[^]]+\] => \(item=(\S+) from", built, re.M)) == [
        "0.1.0+unknown", "0.1.9+unknown"]
    reported = dict(re.findall(r'ok: \[(board\d)\] => \{\s+"msg": "release=(\S+) wheel=', run.stdout))
    assert {board: release.split("-")[0] for board, release in reported.items()} == pinned
    wheels = sorted(wheel.name for wheel in (cache / "wheels").glob("*/*.whl"))
    assert wheels == [f"rkllm_runtime-{version}+unknown-py3-none-any.whl" for version in ("0.1.0", "0.1.9")]
