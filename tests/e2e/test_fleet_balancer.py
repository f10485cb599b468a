"""The fleet endpoint on the simulated fleet: 3 amd64 boards provisioned by site.yml, the balancer and
firewalls by ansible/balancer.yml (applied twice), clients in the client network namespace.
board1 hosts Qwen2.5-1.5B-Instruct and DeepSeek-R1-Distill-Qwen-1.5B, board2 and board3 only Qwen.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.fleets import booted_fleet
from e2e.playbooks import playbook
from fleet.faults import power_off, set_link
from fleet.host import Host
from fleet.sim import Fleet

from tests.support import REPO_ROOT, wait_until

# Provisioning (site.yml) happens in the first test's setup and the rolling update re-runs the board
# roles: both exceed the suite's default per-test timeout.
pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

LOAD_SCRIPT = Path(__file__).with_name("fleet_load.py")
QWEN, DEEPSEEK = "Qwen2.5-1.5B-Instruct", "DeepSeek-R1-Distill-Qwen-1.5B"
BOARDS = ("board1", "board2", "board3")
QUEUE_SIZE = 8  # rkllm-server's default per-model queue
StopLoad = Callable[[], list[dict[str, object]]]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with booted_fleet(tmp_path_factory.mktemp("fleet"), "eb", arch="amd64", boards=len(BOARDS)) as started:
        inventory = started.inventory_path.parent
        (inventory / "host_vars").mkdir()
        # Two KV slots for Qwen: a board keeps a conversation's cache while it serves other requests.
        slots = f"rkllm_server_model_settings: {{{QWEN}: {{kv_slots: 2}}}}\n"
        (inventory / "host_vars" / "board1.yml").write_text(
            f"rkllm_models_enabled: [{QWEN}, {DEEPSEEK}]\n{slots}")
        for board in BOARDS[1:]:
            (inventory / "host_vars" / f"{board}.yml").write_text(slots)
        playbook(started, "site.yml")
        playbook(started, "ansible/balancer.yml")
        yield started


@pytest.fixture(scope="module")
def second_firewall_run(fleet: Fleet) -> str:
    """The balancer playbook (firewall + nginx) applied a second time over SSH."""
    return playbook(fleet, "ansible/balancer.yml").stdout


def base_url(fleet: Fleet) -> str:
    return f"http://{fleet.balancer.address}"


def client_load(fleet: Fleet, *args: str) -> dict[str, object]:
    done = fleet.client_exec([sys.executable, str(LOAD_SCRIPT), base_url(fleet), *args], timeout=600)
    return json.loads(done.stdout)


@pytest.fixture
def background_load(fleet: Fleet, tmp_path: Path) -> Iterator[Callable[..., StopLoad]]:
    """start(concurrency, max_tokens) -> stop() returning the per-request records."""
    procs: list[subprocess.Popen[str]] = []

    def start(concurrency: int = 3, max_tokens: int = 8, model: str = QWEN) -> StopLoad:
        stop_file = tmp_path / f"stop-{len(procs)}"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", fleet.client_netns, sys.executable, str(LOAD_SCRIPT), base_url(fleet),
             "continuous", "--concurrency", str(concurrency), "--max-tokens", str(max_tokens),
             "--seconds", "900", "--stop-file", str(stop_file), "--model", model],
            stdout=subprocess.PIPE, text=True)
        procs.append(proc)

        def stop() -> list[dict[str, object]]:
            stop_file.touch()
            out, _ = proc.communicate(timeout=180)
            return json.loads(out)["records"]

        return stop

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def board_metrics(fleet: Fleet, board: str) -> str:
    return fleet.board(board).exec(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/metrics"]).stdout


def metric_total(text: str, name: str, model: str = QWEN) -> float:
    pattern = rf'^{name}\{{[^}}]*model="{re.escape(model)}"[^}}]*\}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def generated(fleet: Fleet, model: str = QWEN, boards: tuple[str, ...] = BOARDS) -> dict[str, float]:
    return {b: metric_total(board_metrics(fleet, b), "rkllm_generation_tokens_total", model) for b in boards}


def is_ready(fleet: Fleet, board: str) -> bool:
    return fleet.board(board).exec(["curl", "-sf", "--max-time", "2", "http://127.0.0.1:8080/ready"],
                                   check=False).returncode == 0


def running(fleet: Fleet, board: str) -> float:
    return metric_total(board_metrics(fleet, board), "rkllm_requests_running")


def server_unit(fleet: Fleet, board: str, prop: str) -> str:
    """A property of the rkllm-server unit on a board (MainPID, NRestarts, ...)."""
    shown = fleet.board(board).exec(["systemctl", "show", "-p", prop, "--value", "rkllm-server"])
    return shown.stdout.strip()


def restarts(fleet: Fleet, board: str) -> int:
    return int(server_unit(fleet, board, "NRestarts"))


def failures(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [r for r in records if r.get("status") != 200 or not r.get("complete")]


def test_openai_client_streams_through_nginx(fleet: Fleet) -> None:
    deltas = client_load(fleet, "openai-stream")["deltas"]
    assert len([d for d in deltas if d]) >= 4


def test_a_batch_spreads_over_every_board(fleet: Fleet) -> None:
    before = generated(fleet)
    records = client_load(fleet, "batch", "--count", "12", "--max-tokens", "4")["records"]
    assert failures(records) == []
    after = generated(fleet)
    shares = {b: after[b] - before[b] for b in BOARDS}
    print(f"tokens per board for a batch of 12: {shares}")
    assert all(share > 0 for share in shares.values()), shares


SWEEP_SCRIPT = Path(__file__).with_name("port_sweep.py")
# A port no role opens, on which a board gets a UDP echo listener for the drop proof.
UNLISTED_UDP_PORT = 40404


def sweep(netns: str | None, protocol: str, addresses: list[str],
          ports: str = "1-65535") -> dict[str, dict[str, Any]]:
    """port_sweep.py from a network namespace (None: the controller's own): per address its "open" and
    "refused" ports and how many stayed "silent"."""
    command = [sys.executable, str(SWEEP_SCRIPT), protocol, "--ports", ports, *addresses]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)


def summary(result: dict[str, dict[str, Any]]) -> dict[str, tuple[list[int], int, int]]:
    """Per address: the open ports, how many were refused, how many stayed silent."""
    return {a: (r["open"], len(r["refused"]), r["silent"]) for a, r in result.items()}


def listening_tcp_ports(host: Host) -> set[int]:
    """TCP ports a host listens on beyond loopback (what a sweep could find if the firewall let it)."""
    lines = host.exec(["ss", "-Htln"]).stdout.splitlines()
    local = [line.split()[3] for line in lines]
    return {int(a.rsplit(":", 1)[1]) for a in local if not a.startswith(("127.", "[::1]"))}


def policy_drops(host: Host) -> int:
    chain = host.exec(["nft", "list", "chain", "inet", "rkllm_fleet", "input"]).stdout
    line = next(line for line in chain.splitlines() if 'comment "dropped by policy"' in line)
    return int(line.split("packets")[1].split()[0])


def test_firewall_second_apply_changes_nothing_and_keeps_the_controllers_ssh(fleet: Fleet,
                                                                           second_firewall_run: str) -> None:
    # Second application over SSH: nothing changes on any host (firewall and nginx are idempotent),
    # and the controller, whose SSH carried both runs, still gets in afterwards.
    recap = dict(re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", second_firewall_run, re.M))
    assert recap == {host: "0" for host in (*BOARDS, "balancer1")}, second_firewall_run[-3000:]
    for host in (*[fleet.board(b) for b in BOARDS], fleet.balancer):
        ssh = subprocess.run(host.ssh_args("nft list tables"), capture_output=True, text=True, timeout=60,
                             check=False)
        assert ssh.returncode == 0, (host.name, ssh.stderr)
        assert ssh.stdout.count("table inet rkllm_fleet") == 1
        assert "policy drop" in host.exec(["nft", "list", "chain", "inet", "rkllm_fleet", "input"]).stdout


def test_firewall_sweeps_find_only_the_allowed_ports(fleet: Fleet, second_firewall_run: str) -> None:
    boards = [fleet.board(b) for b in BOARDS]
    board2, balancer = fleet.board("board2"), fleet.balancer
    listening = {host.name: listening_tcp_ports(host) for host in (*boards, balancer)}
    # The boards serve and run sshd (node_exporter too once the monitoring role ran): silence below is
    # the firewall's, not an empty host.
    assert all({22, 8080} <= listening[b] for b in BOARDS), listening
    api_ports = listening["balancer1"] & {80, 443}
    assert 80 in api_ports, listening
    addresses = [host.address for host in (*boards, balancer)]

    # From the client: nothing on a board, only the API on the balancer; no other port answers with a
    # reset either (a drop policy, not closed ports), and board2's policy counts the dropped SYNs.
    drops_before = policy_drops(board2)
    from_client = sweep(fleet.client_netns, "tcp", addresses)
    print("TCP from the client (open, refused, silent):", summary(from_client))
    assert {a: r["open"] for a, r in from_client.items()} == {
        **{b.address: [] for b in boards}, balancer.address: sorted(api_ports)}
    # The allow-list's API port that nothing listens on (443 without TLS) is the only reset: the
    # sweep does tell a closed port from a dropped one.
    assert {a: r["refused"] for a, r in from_client.items()} == {
        **{b.address: [] for b in boards}, balancer.address: sorted({80, 443} - api_ports)}, from_client
    assert policy_drops(board2) - drops_before >= 65535 - len(listening["board2"])

    # The allow-lists per source, on the ports the hosts listen on: the controller gets SSH (and the
    # API); the balancer, also the monitor host, gets the serving port and node_exporter, not SSH.
    all_listening = ",".join(str(p) for p in sorted(set().union(*listening.values())))
    from_controller = sweep(None, "tcp", addresses, all_listening)
    from_balancer = sweep(balancer.spec.netns, "tcp", [b.address for b in boards], all_listening)
    print("TCP open from the controller:", {a: r["open"] for a, r in from_controller.items()},
          "from the balancer:", {a: r["open"] for a, r in from_balancer.items()})
    assert {a: r["open"] for a, r in from_controller.items()} == {
        **{b.address: [22] for b in boards}, balancer.address: sorted({22} | api_ports)}
    assert {a: r["open"] for a, r in from_balancer.items()} == {
        b.address: sorted(listening[b.name] & {8080, 9100}) for b in boards}

    # UDP: a listener on board2 that answers every datagram, on a port no rule names, stays silent
    # to the whole sweep; no host answers a UDP probe, not even with port-unreachable (without the
    # table the kernel answers closed ports with ICMP errors).
    echo = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            f"s.bind(('0.0.0.0', {UNLISTED_UDP_PORT}))\n"
            "while True:\n    data, peer = s.recvfrom(2048); s.sendto(data, peer)\n")
    board2.exec(["systemd-run", "--unit", "rkllm-sweep-udp-echo", "python3", "-c", echo])
    try:
        wait_until(lambda: f":{UNLISTED_UDP_PORT} " in board2.exec(["ss", "-Hlun"]).stdout,
                   "UDP echo listener on board2", deadline_s=120, interval=0.2)
        udp = sweep(fleet.client_netns, "udp", addresses)
        print("UDP from the client (open, refused, silent):", summary(udp))
        assert all(r["open"] == [] and r["refused"] == [] for r in udp.values()), udp
        # The same sweep finds the listener once a rule allows its port: silence above was the drop.
        board2.exec(["nft", "insert", "rule", "inet", "rkllm_fleet", "input", "udp", "dport",
                     str(UNLISTED_UDP_PORT), "accept"])
        nearby = f"{UNLISTED_UDP_PORT - 500}-{UNLISTED_UDP_PORT + 500}"
        allowed = sweep(fleet.client_netns, "udp", [board2.address], nearby)
        assert allowed[board2.address]["open"] == [UNLISTED_UDP_PORT], allowed
    finally:
        board2.exec(["systemctl", "stop", "rkllm-sweep-udp-echo"], check=False)
        # What the role's handler runs: the whole table again, without the test's rule.
        board2.exec(["nft", "-f", "/etc/nftables.d/rkllm_fleet.nft"])
    table = board2.exec(["nft", "list", "table", "inet", "rkllm_fleet"]).stdout
    assert f"dport {UNLISTED_UDP_PORT}" not in table

    # ICMP: ping answers (echo is rate-limited, not closed).
    for address in addresses:
        ping = fleet.client_exec(["ping", "-c", "3", "-i", "0.2", "-W", "10", address], check=False)
        assert ping.returncode == 0, (address, ping.stdout)


STATUS_OF = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "30"]


def test_ready_and_metrics_stay_off_the_balancer(fleet: Fleet) -> None:
    board = fleet.board("board2").address
    # The monitor (the balancer host) reaches them on the board: a 404 below is nginx's, not a missing path.
    for path in ("/ready", "/metrics"):
        direct = fleet.balancer.exec([*STATUS_OF, f"http://{board}:8080{path}"]).stdout
        assert direct == "200", (path, direct)
        through = fleet.client_exec([*STATUS_OF, f"{base_url(fleet)}{path}"]).stdout
        assert through == "404", (path, through)


def access_log_length(fleet: Fleet) -> int:
    return int(fleet.balancer.exec(["wc", "-l", "/var/log/nginx/access.log"]).stdout.split()[0])


def chat_requests_logged_since(fleet: Fleet, length: int) -> list[str]:
    """Chat completion lines of the balancer's access log written after it had `length` lines."""
    log = fleet.balancer.exec(["tail", "-n", f"+{length + 1}", "/var/log/nginx/access.log"]).stdout
    return [line for line in log.splitlines() if '"POST /v1/chat/completions ' in line]


def test_requests_for_a_model_land_only_on_boards_hosting_it(fleet: Fleet) -> None:
    def completed_on_board1() -> float:
        metrics = board_metrics(fleet, "board1")
        return metric_total(metrics, "rkllm_e2e_request_latency_seconds_count", DEEPSEEK)

    completed_before = completed_on_board1()
    log_length = access_log_length(fleet)
    records = client_load(fleet, "batch", "--model", DEEPSEEK, "--count", "4", "--max-tokens", "4")["records"]
    assert failures(records) == []
    assert completed_on_board1() - completed_before == 4
    # nginx writes a request's line just after its last byte: wait for all four.
    wait_until(lambda: len(chat_requests_logged_since(fleet, log_length)) >= 4,
               "4 requests logged by nginx", deadline_s=120, interval=0.2)
    logged = chat_requests_logged_since(fleet, log_length)
    # Every upstream nginx tried for each request (retries included) was board1: board2 and board3,
    # which do not host the model, never received one.
    board1 = f"{fleet.board('board1').address}:8080"
    assert [re.findall(r' ua="([^"]*)"', line) for line in logged] == [[board1]] * 4, logged


def test_kill_9_of_a_server_under_load_fails_no_later_request(fleet: Fleet, background_load) -> None:
    stop = background_load(concurrency=3)
    wait_until(lambda: running(fleet, "board2") > 0, "load reaches board2", deadline_s=120, interval=0.2)
    restarts_before = restarts(fleet, "board2")
    killed_at = time.time()
    fleet.board("board2").exec(["kill", "-9", server_unit(fleet, "board2", "MainPID")])
    wait_until(lambda: restarts(fleet, "board2") > restarts_before,
               "systemd restarts board2's server", deadline_s=120, interval=0.2)
    wait_until(lambda: is_ready(fleet, "board2"), "board2 ready again", deadline_s=120, interval=0.2)
    restarted_at = time.time()
    # The restarted server starts its metrics at zero: tokens there mean nginx routes to it again.
    wait_until(lambda: generated(fleet)["board2"] > 0, "board2 serves again", deadline_s=120, interval=0.2)
    records = stop()
    later = [r for r in records if float(r["start"]) > killed_at]
    print(f"kill -9: {len(records)} requests, {len(later)} after the kill, "
          f"{len(failures(later))} of them failed; board2 back in {restarted_at - killed_at:.1f}s")
    assert later and failures(later) == []


def test_stopped_board_under_load_then_rejoins(fleet: Fleet, background_load) -> None:
    stop = background_load(concurrency=3)
    wait_until(lambda: running(fleet, "board3") > 0, "load reaches board3", deadline_s=120, interval=0.2)
    stopped_at = time.time()
    fleet.stop("board3")
    try:
        others = ("board1", "board2")
        served_by_others = sum(generated(fleet, boards=others).values())
        # Service goes on: the other boards keep generating while board3 is down (~10 requests' worth).
        wait_until(lambda: sum(generated(fleet, boards=others).values()) > served_by_others + 80,
                   "the rest of the fleet serves while board3 is down", deadline_s=120, interval=0.2)
    finally:
        # Started again even when the check failed: the later tests need all three boards.
        fleet.start("board3")
    wait_until(lambda: is_ready(fleet, "board3"), "board3 ready after boot", deadline_s=120, interval=0.2)
    # The firewall unit reloaded the table at boot.
    assert "table inet rkllm_fleet" in fleet.board("board3").exec(["nft", "list", "tables"]).stdout
    # board3 rebooted (its metrics restarted at zero): it serves again once nginx retries it.
    wait_until(lambda: generated(fleet, boards=("board3",))["board3"] > 0,
               "board3 rejoins", deadline_s=120, interval=0.2)
    records = stop()
    later = [r for r in records if float(r["start"]) > stopped_at]
    print(f"board stop: {len(later)} requests after the stop, {len(failures(later))} failed")
    assert later and failures(later) == []


def test_conversations_keep_their_cache_while_another_client_loads_the_fleet(fleet: Fleet,
                                                                            background_load) -> None:
    def answered() -> dict[str, list[str]]:
        """Board of each turn by conversation: the bench names turns in the URI (?c=<n>&t=<turn>)."""
        log = fleet.balancer.exec(["cat", "/var/log/nginx/access.log"]).stdout
        boards: dict[str, list[str]] = {}
        for conversation, tried in re.findall(r'\?c=(\d+)&t=\d+ [^"]*" 200 .*? ua="([^"]*)"', log):
            boards.setdefault(conversation, []).append(re.split(r", | : ", tried)[-1])
        return boards

    def lost_conversations() -> float:
        return sum(metric_total(board_metrics(fleet, b), "rkllm_kv_slot_conversation_evictions_total")
                   for b in BOARDS)

    lost_before = lost_conversations()
    # One conversation per board, 6 turns each, streamed through nginx with their whole history.
    conversations = subprocess.Popen(
        ["ip", "netns", "exec", fleet.client_netns, "env", f"PYTHONPATH={REPO_ROOT}", sys.executable, "-m",
         "bench.bench_conversations", "--against", base_url(fleet), "--model", QWEN,
         "--boards", str(len(BOARDS)), "--conversations", "1", "--turns", "6"],
        stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(answered()) == len(BOARDS),
                   "every conversation has its first answer", deadline_s=120, interval=0.2)
        # Other users ask the same model one-turn questions meanwhile, one per board on average: each
        # takes a KV slot where it lands. The slot policy keeps a conversation's slot from its second
        # turn on and lets them recycle the other one.
        stop = background_load(concurrency=len(BOARDS), max_tokens=8, model=QWEN)
        out, _ = conversations.communicate(timeout=600)
    finally:
        if conversations.poll() is None:
            conversations.kill()
            conversations.wait()
    records = stop()
    chats = json.loads(out)
    boards = answered()
    lost = lost_conversations() - lost_before
    print(f"conversations under same-model load: {100 * chats['from_cache_later']:.0f} % of later turns' "
          f"prompt tokens from cache, {chats['missed']} later turns missed, {lost:.0f} conversation slots "
          f"evicted, boards per conversation {boards}, {len(records)} one-turn requests")
    assert chats["errors"] == 0 and chats["turns_completed"] == [6] * len(BOARDS)
    assert failures(records) == [] and records
    # Each conversation kept on the board that answered its first turn (least_conn places them; the
    # bench staggers their starts, so two may share a board).
    assert all(len(set(turns)) == 1 for turns in boards.values()), boards
    # A conversation on a board with a KV slot to spare besides it prefills only its new message on
    # every turn from its third on, although one-turn requests keep taking slots there (with
    # kv_slot_keep_seconds = 0, least recently used, they evicted it: 29 % from cache, 9 turns missed).
    # Its turn 2 may miss: until a conversation comes back, it looks like a one-turn request.
    # Where placement put more conversations on a board than its slots minus one, one-turn requests
    # must evict one of them: the slot count, not the policy, decides there.
    missed = chats["missed_by_conversation"]
    chats_on = Counter(turns[0] for turns in boards.values())
    roomy = [c for c, turns in boards.items() if chats_on[turns[0]] < kv_slots(fleet, turns[0])]
    print(f"later turns missed by conversation: {missed}; with a slot to spare: {roomy}")
    assert roomy, f"no conversation had a slot to spare on its board: {boards}"
    assert all(missed[c] <= 1 for c in roomy), missed


def kv_slots(fleet: Fleet, address: str, model: str = QWEN) -> int:
    """The KV slots the board at address (host:port) holds for model, from its slot-state series."""
    board = next(b for b in BOARDS if fleet.board(b).address == address.split(":")[0])
    series = re.findall(rf'rkllm_kv_slot_state\{{model="{re.escape(model)}",slot="(\d+)"',
                        board_metrics(fleet, board))
    assert series, f"{board} reports no KV slot of {model}"
    return len(set(series))


def nginx_workers(fleet: Fleet) -> set[str]:
    return set(fleet.balancer.exec(["pgrep", "-f", "nginx: worker"]).stdout.split())


def test_overload_gives_only_200_or_503_with_retry_after(fleet: Fleet) -> None:
    capacity = len(BOARDS) * (1 + QUEUE_SIZE)
    peaks = dict.fromkeys(BOARDS, 0.0)
    sampler_errors: list[BaseException] = []
    sampling = threading.Event()

    def sample_queues() -> None:
        try:
            while not sampling.is_set():
                for board in BOARDS:
                    waiting = metric_total(board_metrics(fleet, board), "rkllm_requests_waiting")
                    peaks[board] = max(peaks[board], waiting)
        except BaseException as error:  # reported by the test below, not lost with the thread
            sampler_errors.append(error)

    def refused_by(board: str) -> float:
        return metric_total(board_metrics(fleet, board), "rkllm_requests_rejected_total")

    refused_before = {board: refused_by(board) for board in BOARDS}
    sampler = threading.Thread(target=sample_queues)
    sampler.start()
    try:
        records = client_load(fleet, "batch", "--count", str(4 * capacity), "--max-tokens", "8", "--stream")[
            "records"]
    finally:
        sampling.set()
        sampler.join()
    statuses = sorted({r.get("status") for r in records}, key=str)
    print(f"overload {4 * capacity} requests: statuses {statuses}, queue peaks {peaks}")
    assert sampler_errors == []
    # The burst filled every board's queue (so the bound below was tested) and no further.
    assert all(peak > 0 for peak in peaks.values()), peaks
    # nginx refused the overflow itself: no board refused a request (each refusal counts there).
    assert {board: refused_by(board) - refused_before[board] for board in BOARDS} == dict.fromkeys(BOARDS, 0)
    assert all("error" not in r for r in records), [r for r in records if "error" in r][:3]
    assert {r["status"] for r in records} <= {200, 503}
    assert all(int(r["retry_after"]) >= 1 for r in records if r["status"] == 503)
    assert any(r["status"] == 200 for r in records) and any(r["status"] == 503 for r in records)
    assert all(r["complete"] for r in records)
    assert max(peaks.values()) <= QUEUE_SIZE
    # Right after the burst the fleet is idle and must serve at once: nginx's passive health must
    # not have written the boards off for the burst's refusals.
    after_burst = client_load(fleet, "batch", "--count", str(len(BOARDS)), "--max-tokens", "4")["records"]
    assert failures(after_burst) == [], after_burst


def test_rolling_update_under_continuous_load_fails_nothing(fleet: Fleet, background_load) -> None:
    pids_before = {b: server_unit(fleet, b, "MainPID") for b in BOARDS}
    nginx_before = nginx_workers(fleet)
    stop = background_load(concurrency=2)
    started = time.monotonic()
    playbook(fleet, "ansible/rolling_update.yml")
    took = time.monotonic() - started
    records = stop()
    failed = failures(records)
    print(f"rolling update of {len(BOARDS)} boards in {took:.0f}s: {len(records)} requests during the "
          f"update, {len(failed)} failed")
    pids_after = {b: server_unit(fleet, b, "MainPID") for b in BOARDS}
    assert all(pids_after[b] != pids_before[b] for b in BOARDS), "every server was restarted"
    assert nginx_workers(fleet) == nginx_before, "the balancer was not reloaded"
    assert len(records) > 10
    error_log = fleet.balancer.exec(["tail", "-n", "20", "/var/log/nginx/error.log"]).stdout
    assert failed == [], (failed[:3], error_log)
    before = generated(fleet)
    records = client_load(fleet, "batch", "--count", "12", "--max-tokens", "4")["records"]
    assert failures(records) == []
    after = generated(fleet)
    assert all(after[b] > before[b] for b in BOARDS), (before, after)


# Hard faults. Each test counts three groups of the load's requests: in flight at the fault (sent
# before it, not finished), sent within the bound nginx (or the board's watchdog) needs to notice it,
# and sent after that bound, of which none may fail. Each restores the fleet for the tests below.

def duration_seconds(value: str) -> float:
    """An nginx or systemd duration ("2s", "500ms", "1min 30s") in seconds."""
    units = {"ms": 0.001, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|min|s|m|h)", value)
    assert parts, f"not a duration: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def connect_detection_bound(fleet: Fleet) -> float:
    """How long nginx may take to write off a board that no longer answers: max_fails connection
    attempts, each abandoned after proxy_connect_timeout (read from the balancer's running config)."""
    config = fleet.balancer.exec(["nginx", "-T"]).stdout
    connect = re.search(r"proxy_connect_timeout\s+(\S+);", config)
    max_fails = re.search(r" max_fails=(\d+)", config)
    assert connect and max_fails, config[-2000:]
    return int(max_fails[1]) * duration_seconds(connect[1])


def watchdog_bound(fleet: Fleet, board: str) -> float:
    """How long systemd may take to end a server that stopped its watchdog pings: WatchdogSec, then
    TimeoutAbortSec for the SIGABRT to take effect before SIGKILL (the unit's own settings)."""
    return (duration_seconds(server_unit(fleet, board, "WatchdogUSec"))
            + duration_seconds(server_unit(fleet, board, "TimeoutAbortUSec")))


def error_log_length(fleet: Fleet) -> int:
    return int(fleet.balancer.exec(["wc", "-l", "/var/log/nginx/error.log"]).stdout.split()[0])


def error_log_since(fleet: Fleet, length: int) -> list[str]:
    log = fleet.balancer.exec(["tail", "-n", f"+{length + 1}", "/var/log/nginx/error.log"]).stdout
    return log.splitlines()


def balancer_logs_tail(fleet: Fleet, lines: int = 40) -> str:
    """What nginx saw last (its access log: each attempt's board and status; its error log) and what
    each board refused, by reason: for a failure message."""
    logs = [fleet.balancer.exec(["tail", "-n", str(lines), f"/var/log/nginx/{log}.log"]).stdout
            for log in ("access", "error")]
    refused = re.compile(r"^rkllm_requests_rejected_total.*$", re.M)
    refusals = [f"{board}: {refused.findall(board_metrics(fleet, board))}" for board in BOARDS]
    return "\n".join([*logs, *refusals])


def upstream(fleet: Fleet, board: str) -> str:
    return f"http://{fleet.board(board).address}:8080/"


def written_off(fleet: Fleet, board: str, log_length: int) -> bool:
    """nginx logged that it stopped sending requests to the board (max_fails reached)."""
    return any("upstream server temporarily disabled" in line and upstream(fleet, board) in line
               for line in error_log_since(fleet, log_length))


def wait_connect_error(fleet: Fleet, board: str, log_length: int, fault_at: float) -> float:
    """Seconds from the fault until nginx logged that it could not reach the board (the error log in the
    failure if it never did): a new connection's connect timeout, or the TCP keepalive probes of a
    request in flight there, whichever comes first. nginx need not write the board off (max_fails)
    afterwards: a conversation's home upstream (one server) counts no failures."""
    try:
        wait_until(lambda: bool(connect_errors(fleet, board, log_length)),
                   f"nginx fails to reach {board}", deadline_s=60, interval=0.2)
    except AssertionError as missing:
        raise AssertionError("\n".join([str(missing), *error_log_since(fleet, log_length)[-30:]])) from None
    return time.time() - fault_at


def connect_errors(fleet: Fleet, board: str, log_length: int) -> list[str]:
    """nginx's errors reaching the board since the log had `log_length` lines, by cause: failed
    connections, and connections the kernel ended (keepalive probes unanswered, no route)."""
    return [re.sub(r"^.*?\] \d+#\d+: \*\d+ ", "", line).split(" while ")[0]
            for line in error_log_since(fleet, log_length)
            if upstream(fleet, board) in line
            and ("while connecting to upstream" in line or "(110: Connection timed out)" in line
                 or "(113: No route to host)" in line)]


def others_generate(fleet: Fleet, board: str, tokens: float) -> Callable[[], bool]:
    """A condition: the boards other than `board` generated `tokens` more than they have now."""
    others = tuple(b for b in BOARDS if b != board)
    served = sum(generated(fleet, boards=others).values())
    return lambda: sum(generated(fleet, boards=others).values()) > served + tokens


def report_fault(fault: str, records: list[dict[str, object]], fault_at: float, bound: float,
                 detected: float) -> list[dict[str, object]]:
    """Print the three groups' counts; return the requests sent after the detection bound."""
    in_flight = [r for r in records if float(r["start"]) <= fault_at < float(r["end"])]
    within = [r for r in records if fault_at < float(r["start"]) <= fault_at + bound]
    after = [r for r in records if float(r["start"]) > fault_at + bound]
    print(f"{fault}: {len(in_flight)} requests in flight at the fault, {len(failures(in_flight))} of them "
          f"failed; {len(within)} sent within the {bound:g}s detection bound, {len(failures(within))} "
          f"failed; "
          f"{len(after)} sent after it, {len(failures(after))} failed; detected after {detected:.1f}s")
    return after


def test_board_cut_off_under_load_fails_no_request_sent_after_nginx_notices(fleet: Fleet,
                                                                              background_load) -> None:
    board = fleet.board("board3")
    bound = connect_detection_bound(fleet)
    stop = background_load(concurrency=8)
    wait_until(lambda: running(fleet, "board3") > 0, "load reaches board3", deadline_s=120, interval=0.2)
    log_length = error_log_length(fleet)
    cut_at = time.time()
    set_link(board, up=False)
    try:
        detected = wait_connect_error(fleet, "board3", log_length, cut_at)
        # The cut lasts past the bound, while the rest of the fleet serves ~10 requests more.
        served_more = others_generate(fleet, "board3", 80)
        wait_until(lambda: time.time() > cut_at + bound + 5 and served_more(),
                   "the fleet serves without board3", deadline_s=120, interval=0.2)
        causes = connect_errors(fleet, "board3", log_length)
    finally:
        set_link(board, up=True)
    print(f"nginx's connection errors to the cut-off board3: {sorted(set(causes))}, written off (max_fails): "
          f"{written_off(fleet, 'board3', log_length)}")
    # Connections timed out (or found no route): a cut-off board never refuses them.
    assert causes and not any("refused" in cause for cause in causes), causes
    served_before = generated(fleet, boards=("board3",))["board3"]
    wait_until(lambda: generated(fleet, boards=("board3",))["board3"] > served_before,
               "board3 serves again", deadline_s=120, interval=0.2)
    after = report_fault("board cut off", stop(), cut_at, bound, detected)
    assert after and failures(after) == [], failures(after)[:3]


def test_frozen_server_is_restarted_by_the_watchdog_and_no_later_request_fails(fleet: Fleet,
                                                                              background_load) -> None:
    board = fleet.board("board2")
    bound = watchdog_bound(fleet, "board2")
    stop = background_load(concurrency=4)
    wait_until(lambda: running(fleet, "board2") > 0, "load reaches board2", deadline_s=120, interval=0.2)
    frozen = server_unit(fleet, "board2", "MainPID")
    frozen_at = time.time()
    board.exec(["kill", "-STOP", frozen])
    try:
        wait_until(lambda: server_unit(fleet, "board2", "MainPID") != frozen,
                   "systemd ends the frozen server", deadline_s=bound + 30, interval=0.2)
        detected = time.time() - frozen_at
    finally:
        # Only matters when the watchdog failed to end it: the later tests need a running server.
        board.exec(["kill", "-CONT", frozen], check=False)
    journal = board.exec(["journalctl", "--no-pager", "-u", "rkllm-server",
                          "--since", f"@{int(frozen_at)}"]).stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    wait_until(lambda: is_ready(fleet, "board2"),
               "board2's restarted server is ready", deadline_s=120, interval=0.2)
    # The restarted server starts its metrics at zero; the load goes on past the bound.
    wait_until(lambda: generated(fleet)["board2"] > 0, "board2 serves again", deadline_s=120, interval=0.2)
    served_more = others_generate(fleet, "board2", 80)
    wait_until(lambda: time.time() > frozen_at + bound + 5 and served_more(),
               "load past the bound", deadline_s=120, interval=0.2)
    after = report_fault("server frozen (SIGSTOP)", stop(), frozen_at, bound, detected)
    assert after and failures(after) == [], failures(after)[:3]


def test_board_powered_off_under_load_boots_and_serves_again(fleet: Fleet, background_load) -> None:
    board = fleet.board("board3")
    bound = connect_detection_bound(fleet)
    stop = background_load(concurrency=8)
    wait_until(lambda: running(fleet, "board3") > 0, "load reaches board3", deadline_s=120, interval=0.2)
    log_length = error_log_length(fleet)
    off_at = time.time()
    power_off(board)
    try:
        detected = wait_connect_error(fleet, "board3", log_length, off_at)
        served_more = others_generate(fleet, "board3", 80)
        wait_until(lambda: time.time() > off_at + bound + 5 and served_more(),
                   "the fleet serves without board3", deadline_s=120, interval=0.2)
        # While the board is gone: once it boots again, a refusal is its normal answer until it listens.
        causes = connect_errors(fleet, "board3", log_length)
    finally:
        set_link(board, up=True)
        fleet.start("board3")
    print(f"nginx's errors reaching the powered-off board3: {sorted(set(causes))}, written off "
          f"(max_fails): {written_off(fleet, 'board3', log_length)}")
    assert causes and not any("refused" in cause for cause in causes), causes
    wait_until(lambda: is_ready(fleet, "board3"), "board3 ready after boot", deadline_s=120, interval=0.2)
    assert "table inet rkllm_fleet" in board.exec(["nft", "list", "tables"]).stdout
    wait_until(lambda: generated(fleet, boards=("board3",))["board3"] > 0,
               "board3 rejoins", deadline_s=120, interval=0.2)
    after = report_fault("board powered off", stop(), off_at, bound, detected)
    assert after and failures(after) == [], failures(after)[:3]


def server_role_tasks(fleet: Fleet, board: str, tasks: str) -> None:
    """The rkllm_server role's drain or resume tasks on one board, as an operator runs them."""
    command = [str(Path(sys.executable).parent / "ansible"), "-i", str(fleet.inventory_path.parent), board,
               "-b", "-m", "ansible.builtin.include_role", "-a", f"name=rkllm_server tasks_from={tasks}"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def ready_state(fleet: Fleet, board: str) -> str:
    """The server's own view from /ready: "ready", "draining", ... ("" while it does not answer)."""
    shown = fleet.board(board).exec(["curl", "-s", "--max-time", "5", "http://127.0.0.1:8080/ready"],
                                    check=False).stdout
    try:
        return str(json.loads(shown).get("status", ""))
    except ValueError:
        return ""


def assert_drained(fleet: Fleet, board: str, after: str) -> None:
    """/ready says draining, and a batch through nginx runs nothing on the board: nginx's attempts
    there are refused with a 503 "draining" and retried on the other boards."""
    wait_until(lambda: ready_state(fleet, board) not in ("", "not ready"),
               f"{board}'s server answers /ready", deadline_s=120, interval=0.2)
    assert ready_state(fleet, board) == "draining", after

    def counts() -> tuple[float, float]:
        metrics = board_metrics(fleet, board)
        refused = sum(float(v) for v in re.findall(
            r'^rkllm_requests_rejected_total\{[^}]*reason="draining"[^}]*\} (\S+)$', metrics, re.M))
        return metric_total(metrics, "rkllm_e2e_request_latency_seconds_count"), refused

    served_before, refused_before = counts()
    records: list[dict[str, object]] = []

    def board_refused_one() -> bool:
        # nginx tries a board that refused max_fails requests again only after fail_timeout: batches
        # until one reached it, so the check below is not vacuous.
        records.extend(client_load(fleet, "batch", "--count", "9", "--max-tokens", "4")["records"])
        return counts()[1] > refused_before

    wait_until(board_refused_one, f"nginx tries {board} ({after})", deadline_s=60, interval=1)
    served, refused = counts()
    print(f"drained {board} {after}: /ready draining, {len(failures(records))} of {len(records)} requests "
          f"failed, {served - served_before:g} ran on {board}, {refused - refused_before:g} refused there")
    assert failures(records) == [], (failures(records)[:3], balancer_logs_tail(fleet))
    assert served == served_before, after


def wait_every_board_serves(fleet: Fleet) -> None:
    """Batches through nginx until each board ran one: the fleet is whole before the proof, whatever
    the faults of earlier tests left (nginx writes a board off for fail_timeout after max_fails errors;
    the drain proof's batch fits the two other boards' shared slots only if both take requests)."""
    before = generated(fleet)

    def each_board_ran_one() -> bool:
        records = client_load(fleet, "batch", "--count", "6", "--max-tokens", "4")["records"]
        assert failures(records) == [], (failures(records)[:3], balancer_logs_tail(fleet))
        now = generated(fleet)
        return all(now[b] > before[b] for b in BOARDS)

    wait_until(each_board_ran_one, "every board serves through nginx", deadline_s=60, interval=1)


def test_a_drain_outlives_a_server_restart_and_a_reboot(fleet: Fleet) -> None:
    board = fleet.board("board2")
    wait_every_board_serves(fleet)
    server_role_tasks(fleet, "board2", "drain")
    try:
        assert_drained(fleet, "board2", "after the drain")
        pid = server_unit(fleet, "board2", "MainPID")
        board.exec(["systemctl", "restart", "rkllm-server"])
        assert server_unit(fleet, "board2", "MainPID") != pid
        assert_drained(fleet, "board2", "after a server restart")
        init = board.pid1()
        fleet.restart("board2")
        assert board.pid1() != init, "board2 rebooted"
        assert_drained(fleet, "board2", "after a reboot")
    finally:
        server_role_tasks(fleet, "board2", "resume")
    def served() -> float:
        return metric_total(board_metrics(fleet, "board2"), "rkllm_e2e_request_latency_seconds_count")

    served_before = served()

    def batch_reaches_board2() -> bool:
        # New conversations: they fit the other two boards' shared slots (5 each) while nginx still
        # holds board2 out.
        records = client_load(fleet, "batch", "--count", "6", "--max-tokens", "4")["records"]
        assert failures(records) == []
        return served() > served_before

    # nginx counts the drained board's refusals as failures and takes it back fail_timeout (5 s) after
    # the last one, as the plays wait rolling_update_rejoin_seconds for.
    wait_until(batch_reaches_board2, "board2 serves again", deadline_s=60, interval=1)
