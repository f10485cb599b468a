"""controller_fetch collects the named per-host fact over the play batch and fetches each file once."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from balancer_harness import local_host, run_role_tasks

# One line per loop item of a task run once on the controller for the play.
LOOP_ITEM = re.compile(r"^(?:ok|changed): \[board\d -> localhost\] => \(item=(.+?)\)$", re.MULTILINE)


def _artefact(directory: Path, name: str, content: bytes) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    return {"name": name, "url": (directory / name).as_uri(), "sha256": hashlib.sha256(content).hexdigest()}


def _fetch(workdir: Path, needed: dict[str, list[dict[str, str]]], fact: str = "_boards_needed") -> str:
    hosts = {host: {**local_host(), "_boards_needed": files} for host, files in needed.items()}
    hosts["board3"] = local_host()  # needs nothing: the fact is not set
    return run_role_tasks(
        workdir, {"all": {"hosts": hosts}},
        {"controller_fetch_files_fact": fact, "controller_fetch_dir": str(workdir / "cache"),
         "controller_fetch_requester": "boards"},
        role="controller_fetch", tasks_from="main", hosts="all",
    )


def test_each_distinct_file_of_the_batch_is_fetched_once(tmp_path: Path) -> None:
    runtime = _artefact(tmp_path / "1.2.3", "librkllmrt.so", b"runtime 1.2.3")
    header = _artefact(tmp_path / "1.2.3", "rkllm.h", b"header 1.2.3")
    canary = _artefact(tmp_path / "1.2.4", "librkllmrt.so", b"runtime 1.2.4")  # same name, another release

    printed = _fetch(tmp_path, {"board1": [runtime, header], "board2": [runtime, canary]})

    cached = sorted(str(path.relative_to(tmp_path / "cache")) for path in (tmp_path / "cache").rglob("*.*"))
    assert cached == sorted(f"{item['sha256']}/{item['name']}" for item in (runtime, header, canary))
    download_task = printed.split("TASK [controller_fetch : Download and verify", 1)[1].split("TASK [", 1)[0]
    downloads = LOOP_ITEM.findall(download_task)
    assert sorted(downloads) == ["librkllmrt.so", "librkllmrt.so", "rkllm.h"], printed


def test_a_call_without_the_fact_name_stops_naming_the_requester(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boards: set controller_fetch_files_fact"):
        _fetch(tmp_path, {"board1": []}, fact="")
