"""The whole-fleet scenario on an emulated arm64 board, as an operator runs it: a cold `site.yml` on a
bare board and the balancer (board, balancer, firewalls, smoke), then a user's streamed chat through the
balancer. The cold run's time is printed; it is the README's site.yml number.

What only arm64 can prove is proven here: the aarch64 library, the server's wheel and service on an
aarch64 Python, the smoke chat on the board and through the balancer. One board is enough for that:
on two cores each emulated board's tasks run under qemu at seconds each, so a second board only
doubled the emulated work. What takes several boards (nginx spreading conversations, batches,
drains) does not depend on the boards' architecture and is proven on amd64 fleets, as is that a
second site.yml changes nothing (test_site_refusals.py on the boards, test_driver_install.py on boards
and balancer): no task branches on the architecture (preflight asserts read it; it picks the mirror's
library file and the wheelhouse's platform tag, both cached under a key and pushed by the same
checksum-compared copies), so a task that changed on a second run would change on either arch.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.fleets import booted_fleet
from e2e.playbooks import playbook
from fleet.sim import Fleet

# Emulated arm64 runs Ansible at seconds per task: the cold run alone takes minutes.
pytestmark = [pytest.mark.fleet, pytest.mark.timeout(3600)]

LOAD_SCRIPT = Path(__file__).with_name("fleet_load.py")
BOARDS = ("board1",)
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def site_yml(fleet: Fleet) -> tuple[float, dict[str, int]]:
    """Run site.yml; return its wall time and the changed count per host from the recap."""
    started = time.monotonic()
    output = playbook(fleet, "site.yml", timeout=2400).stdout
    seconds = time.monotonic() - started
    recap = {host: int(changed) for host, _ok, changed, _unreachable, _failed in RECAP.findall(output)}
    assert recap, output[-3000:]
    return seconds, recap


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with booted_fleet(tmp_path_factory.mktemp("arm64"), "ea", arch="arm64", boards=len(BOARDS)) as started:
        yield started


@pytest.fixture(scope="module")
def cold_run(fleet: Fleet) -> tuple[float, dict[str, int]]:
    return site_yml(fleet)


def test_cold_site_yml_provisions_every_board(fleet: Fleet, cold_run: tuple[float, dict[str, int]]) -> None:
    seconds, recap = cold_run
    hosts = ", ".join((*BOARDS, "balancer1"))
    print(f"[arm64 fleet] cold site.yml on {hosts}: {seconds:.0f} s, changed {recap}")
    assert {*BOARDS, "balancer1"} <= recap.keys()
    assert all(recap[b] > 0 for b in BOARDS)
    for board in fleet.boards:
        shown = board.exec(["systemctl", "show", "-p", "ActiveState,User", "rkllm-server"]).stdout
        assert "ActiveState=active" in shown and "User=rkllm" in shown, shown
        assert board.exec(["uname", "-m"]).stdout.strip() == "aarch64"


def test_a_user_streams_a_chat_answer_through_the_balancer(fleet: Fleet,
                                                           cold_run: tuple[float, dict[str, int]]) -> None:
    done = fleet.client_exec([sys.executable, str(LOAD_SCRIPT), f"http://{fleet.balancer.address}",
                              "openai-stream"], timeout=300)
    deltas = [d for d in json.loads(done.stdout)["deltas"] if d]
    assert len(deltas) >= 4, deltas
    board_port = ["curl", "-sS", "--max-time", "3", f"http://{fleet.boards[0].address}:8080/health"]
    assert fleet.client_exec(board_port, check=False).returncode != 0, "a board's port is open to clients"
