"""The balancer tier survives a dead host: 2 amd64 boards and 2 balancers provisioned by site.yml,
keepalived (balancer_vip) floating the virtual address, clients in the client network namespace.

The failover test runs an OpenAI-SDK client (its default retries), an ollama-client load and a /healthz
prober through the virtual address while the master balancer is powered off, brought back, and the
new master's nginx is stopped, and prints each measured gap.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e.fleets import booted_fleet
from e2e.playbooks import REPO_ROOT, playbook
from fleet.faults import power_off, set_link
from fleet.sim import Fleet

from tests.support import wait_until

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

LOAD_SCRIPT = Path(__file__).with_name("fleet_load.py")
BOARDS = ("board1", "board2")
BALANCERS = ("balancer1", "balancer2")
QUEUE_SIZE = 8  # rkllm-server's default per-model queue
CAPACITY = len(BOARDS) * (1 + QUEUE_SIZE)
OLLAMA_WAIT_SECONDS = 30  # nginx_lb_ollama_wait_seconds' default
MAX_GAP_SECONDS = 3.0
Records = list[dict[str, object]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with booted_fleet(tmp_path_factory.mktemp("fleet"), "ha", arch="amd64", boards=len(BOARDS),
                      balancers=len(BALANCERS)) as started:
        playbook(started, "site.yml")
        yield started


def url(address: str) -> str:
    return f"http://{address}"


def client_load(fleet: Fleet, address: str, *args: str) -> dict[str, object]:
    done = fleet.client_exec([sys.executable, str(LOAD_SCRIPT), url(address), *args], timeout=600)
    return json.loads(done.stdout)


class Background:
    """A fleet_load.py mode running in the client namespace until stop()."""

    def __init__(self, fleet: Fleet, stop_file: Path, mode: str, *args: str) -> None:
        self.stop_file = stop_file
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", fleet.client_netns, sys.executable, str(LOAD_SCRIPT),
             url(fleet.endpoint_address), mode, "--seconds", "900", "--stop-file", str(stop_file), *args],
            stdout=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, object]:
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=120)
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def background(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(mode: str, *args: str) -> Background:
        started.append(Background(fleet, tmp_path / f"stop-{len(started)}", mode, *args))
        return started[-1]

    yield start
    for load in started:
        load.kill()


def board_metric(fleet: Fleet, board: str, name: str, labels: str = "") -> float:
    text = fleet.board(board).exec(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/metrics"]).stdout
    pattern = rf"^{name}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def queue_full_refusals(fleet: Fleet) -> float:
    return sum(board_metric(fleet, b, "rkllm_requests_rejected_total", 'reason="queue_full"') for b in BOARDS)


def holder(fleet: Fleet) -> str | None:
    holders = fleet.virtual_address_holders()
    assert len(holders) <= 1, f"split brain: {holders}"
    return holders[0] if holders else None


def longest_silence(answered: list[float], since: float, until: float) -> float:
    """The longest stretch without a /healthz answer through the virtual address in [since, until]."""
    times = [since, *[t for t in answered if since < t < until], until]
    return max(b - a for a, b in itertools.pairwise(times))


def vrrp_state(fleet: Fleet, balancer: str) -> str:
    """The VRRP state keepalived last entered in this boot (BACKUP, MASTER, FAULT; "" before any)."""
    journal = fleet.board(balancer).exec(["journalctl", "-u", "keepalived", "-b", "--no-pager", "-o", "cat"],
                                         check=False).stdout
    states = re.findall(r"Entering (\w+) STATE", journal)
    return states[-1] if states else ""


def generated(fleet: Fleet) -> float:
    return sum(board_metric(fleet, b, "rkllm_generation_tokens_total") for b in BOARDS)


def in_flight_at(records: Records, faults: list[tuple[float, float]]) -> Records:
    """The records in flight during a fault: sent before it was complete, ended after it began (a
    request sent while the link goes dark reaches the dying balancer and is never answered)."""
    return [r for r in records
            if any(float(r["start"]) < done and float(r["end"]) > began for began, done in faults)]


def test_failover_keeps_the_address_answering(fleet: Fleet, background: Callable[..., Background]) -> None:
    # Which balancer is master depends on which keepalived came up first (nopreempt keeps it there).
    wait_until(lambda: holder(fleet) is not None,
               "a balancer holds the virtual address", deadline_s=120, interval=0.2)
    first = holder(fleet)
    assert first is not None
    second = next(b for b in BALANCERS if b != first)
    refusals_before = queue_full_refusals(fleet)
    prober = background("probe")
    openai_load = background("openai-continuous", "--concurrency", "2")
    ollama_load = background("ollama-continuous", "--concurrency", "2")
    gaps: dict[str, float] = {}
    events: dict[str, float] = {}

    def settle(label: str) -> None:
        """The boards generate again after an event (about 10 requests' worth) before the next one."""
        before = generated(fleet)
        wait_until(lambda: generated(fleet) > before + 80,
                   f"the fleet serves the loads after {label}", deadline_s=120, interval=0.2)

    # (a) The master loses power: keepalived on the other balancer takes the address.
    events[f"power off {first}"] = time.time()
    power_off(fleet.board(first))
    powered_off = time.time()
    wait_until(lambda: holder(fleet) == second,
               f"{second} takes the virtual address", deadline_s=120, interval=0.2)
    settle("power off")

    # (b) The old master comes back: nopreempt leaves the address where it is, on a healthy master.
    events[f"{first} back"] = time.time()
    set_link(fleet.board(first), up=True)
    fleet.start(first)
    wait_until(lambda: vrrp_state(fleet, first) == "BACKUP",
               f"{first} back as a healthy VRRP backup", deadline_s=120, interval=0.2)
    assert holder(fleet) == second
    settle("restart")

    # (c) nginx dies on the master: the check fails and the address moves back.
    events[f"nginx stopped on {second}"] = time.time()
    fleet.board(second).exec(["systemctl", "stop", "nginx"])
    nginx_stopped = time.time()
    wait_until(lambda: holder(fleet) == first,
               f"{first} takes over from {second}'s dead nginx", deadline_s=120, interval=0.2)
    settle("nginx stop")
    ended = time.time()

    answered = prober.stop()["answered"]
    openai_records = openai_load.stop()["records"]
    ollama_records = ollama_load.stop()["records"]
    fleet.board(second).exec(["systemctl", "start", "nginx"])
    moments = list(events.values())
    for (label, moment), until in zip(events.items(), [*moments[1:], ended], strict=True):
        gaps[label] = longest_silence(answered, moment, until)
    openai_failed = [r for r in openai_records if r["status"] != 200]
    ollama_failed = [r for r in ollama_records if r["status"] != 200]
    failures = [(events[f"power off {first}"], powered_off),
                (events[f"nginx stopped on {second}"], nginx_stopped)]
    in_flight = in_flight_at(ollama_records, failures)
    refusals = queue_full_refusals(fleet) - refusals_before
    print(f"virtual address gaps: {', '.join(f'{k}: {v:.2f}s' for k, v in gaps.items())}")
    print(f"openai client: {len(openai_records)} requests, {len(openai_failed)} failed; ollama client: "
          f"{len(ollama_records)} requests, {len(ollama_failed)} failed, {len(in_flight)} in flight at the "
          f"two failures; board queue_full refusals: {refusals:.0f}")
    assert all(gap < MAX_GAP_SECONDS for gap in gaps.values()), gaps
    assert len(openai_records) > 20 and len(ollama_records) > 20
    assert openai_failed == [], openai_failed[:3]
    # Only requests the dead balancer was carrying may fail, none started afterwards.
    assert all(r in in_flight for r in ollama_failed), [r for r in ollama_failed if r not in in_flight][:3]
    assert refusals == 0


def test_burst_through_both_balancers_never_overflows_a_board(fleet: Fleet) -> None:
    refusals_before = queue_full_refusals(fleet)
    peaks = dict.fromkeys(BOARDS, 0.0)
    sampling = threading.Event()

    def sample_queues() -> None:
        while not sampling.is_set():
            for board in BOARDS:
                peaks[board] = max(peaks[board], board_metric(fleet, board, "rkllm_requests_waiting"))

    results: dict[str, Records] = {}

    def burst(balancer: str) -> None:
        address = fleet.board(balancer).address
        results[balancer] = client_load(fleet, address, "batch", "--count", str(2 * CAPACITY), "--max-tokens",
                                        "8", "--stream")["records"]

    threads = [threading.Thread(target=sample_queues)] + [threading.Thread(target=burst, args=(b,))
                                                          for b in BALANCERS]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    sampling.set()
    threads[0].join()
    records = [r for balancer in BALANCERS for r in results[balancer]]
    statuses = {b: sorted(str(r.get("status")) for r in results[b]) for b in BALANCERS}
    refusals = queue_full_refusals(fleet) - refusals_before
    print(f"burst of {4 * CAPACITY} requests (capacity {CAPACITY}) through both balancers: "
          f"{ {b: {s: v.count(s) for s in set(v)} for b, v in statuses.items()} }, queue peaks {peaks}, "
          f"board queue_full refusals {refusals:.0f}")
    assert all("error" not in r for r in records), [r for r in records if "error" in r][:3]
    assert {r["status"] for r in records} <= {200, 503}
    assert all(int(str(r["retry_after"])) >= 1 for r in records if r["status"] == 503)
    assert all(r["complete"] for r in records)
    assert any(r["status"] == 200 for r in records) and any(r["status"] == 503 for r in records)
    assert max(peaks.values()) <= QUEUE_SIZE
    assert refusals == 0


def test_ollama_burst_waits_and_is_answered(fleet: Fleet) -> None:
    records = client_load(fleet, fleet.endpoint_address, "ollama-batch", "--count", str(2 * CAPACITY),
                          "--max-tokens", "8")["records"]
    slowest = max(float(r["end"]) - float(r["start"]) for r in records)
    print(f"ollama burst of {2 * CAPACITY} requests (capacity {CAPACITY}): "
          f"{sum(r['status'] == 200 for r in records)} answered 200, slowest {slowest:.1f}s")
    assert [r for r in records if r["status"] != 200] == []
    # Each waited at most the bound before a board took it, then generated 8 tokens.
    assert slowest < OLLAMA_WAIT_SECONDS + 10


def test_second_run_changes_nothing_and_check_mode_works(fleet: Fleet) -> None:
    second = playbook(fleet, "ansible/balancer.yml").stdout
    recap = dict(re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", second, re.M))
    assert recap == {host: "0" for host in (*BOARDS, *BALANCERS)}, second[-3000:]
    checked = playbook(fleet, "ansible/balancer.yml", "--check").stdout
    recap = dict(re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", checked, re.M))
    assert recap == {host: "0" for host in (*BOARDS, *BALANCERS)}, checked[-3000:]


@pytest.mark.parametrize(("extra", "message"), [
    ("balancer_vip_address=192.0.2.3", "balancer_vip_address 192.0.2.3 is not a free IPv4 address inside"),
    ("balancer_vip_priority=100", "balancer_vip_priority must be 1-254 and differ between balancers"),
])
def test_refusals_before_any_change(fleet: Fleet, extra: str, message: str) -> None:
    def confs() -> dict[str, str]:
        return {b: fleet.board(b).exec(["md5sum", "/etc/keepalived/keepalived.conf"]).stdout
                for b in BALANCERS}

    conf_before = confs()
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(fleet.inventory_path.parent),
         "ansible/balancer.yml", "-e", extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    print(next((line for line in refused.stdout.splitlines() if message in line), "")[:400])
    assert refused.returncode != 0
    assert message in refused.stdout
    # The refusal comes from the first play: no board was even visited, no balancer changed.
    assert not re.search(r"^board\d", refused.stdout.split("PLAY RECAP")[-1], re.M)
    assert re.findall(r"changed=(\d+)", refused.stdout.split("PLAY RECAP")[-1]) == ["0", "0"]
    assert confs() == conf_before
