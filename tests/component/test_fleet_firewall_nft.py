"""fleet_firewall's nftables table: rendered by the role, checked by nft, applied in a throwaway
network namespace wired to a "balancer", a "client" and a "monitor" namespace by veth pairs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from balancer_harness import local_host, run_role_tasks

BALANCER_V4, BALANCER_V6 = "10.77.1.1", "fd77:1::1"
BOARD_BAL_V4, BOARD_BAL_V6 = "10.77.1.2", "fd77:1::2"
CLIENT_V4, CLIENT_V6 = "10.77.2.1", "fd77:2::1"
BOARD_CLI_V4, BOARD_CLI_V6 = "10.77.2.2", "fd77:2::2"
MONITOR_V4, MONITOR_V6 = "10.77.3.1", "fd77:3::1"
BOARD_MON_V4, BOARD_MON_V6 = "10.77.3.2", "fd77:3::2"
# The exporter ports are the role's defaults (the monitoring role's ports).
SERVING_PORT, SSH_PORT, NODE_EXPORTER_PORT = 18080, 18022, 9100

def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _in(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _sh("ip", "netns", "exec", ns, *args, check=check)


def render_tables(out: Path) -> dict[str, Path]:
    """Run the role's render tasks (with its `nft -c -f` validate) for a board, a balancer and two
    monitor hosts (one per address family, so both reach the monitor sets from the inventory)."""
    inventory = {"all": {"children": {
        # lb2 is the board namespace's address toward lb: its table is applied there to try VRRP.
        "rkllm_balancers": {"hosts": {"lb": {**local_host(), "ansible_host": BALANCER_V4},
                                      "lb2": {**local_host(), "ansible_host": BOARD_BAL_V4}}},
        "rkllm_boards": {"hosts": {"board": {**local_host(), "ansible_host": BOARD_BAL_V4,
                                             "rkllm_server_port": SERVING_PORT}}},
        "rkllm_monitor": {"hosts": {"mon4": {**local_host(), "ansible_host": MONITOR_V4},
                                    "mon6": {**local_host(), "ansible_host": MONITOR_V6}}},
    }}}
    variables: dict[str, object] = {
        "fleet_firewall_nft_path": str(out / "{{ inventory_hostname }}.nft"),
        "fleet_firewall_balancer_addresses": [BALANCER_V4, BALANCER_V6],
        "fleet_firewall_controller_addresses": [CLIENT_V4, CLIENT_V6],
        # Overlapping elements, as operators write them: the controller inside an admin network, a
        # monitor host also listed as an extra source.
        "fleet_firewall_admin_networks": ["10.77.2.0/24"],
        "fleet_firewall_serving_extra_sources": ["10.77.3.0/24"],
        "fleet_firewall_ssh_port": SSH_PORT,
    }
    # The render notifies the role's handler, which applies the table with `nft -f` on the (local)
    # host: a throwaway network namespace takes it instead of this machine's own.
    run_role_tasks(out, inventory, variables, role="fleet_firewall", tasks_from="render", hosts="all",
                   launcher=("unshare", "--net"))
    return {name: out / f"{name}.nft" for name in ("board", "lb", "lb2", "mon4")}


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render_tables(tmp_path_factory.mktemp("fw"))


@pytest.fixture
def fleet_net() -> Iterator[dict[str, str]]:
    """board <-veth-> balancer, board <-veth-> client and board <-veth-> monitor, IPv4 and IPv6."""
    tag = f"fw{os.getpid() % 100000}"
    names = {"board": f"{tag}-board", "balancer": f"{tag}-lb", "client": f"{tag}-cli",
             "monitor": f"{tag}-mon"}
    for ns in names.values():
        _sh("ip", "netns", "add", ns)
    try:
        for peer, board_v4, board_v6, peer_v4, peer_v6 in (
            ("balancer", BOARD_BAL_V4, BOARD_BAL_V6, BALANCER_V4, BALANCER_V6),
            ("client", BOARD_CLI_V4, BOARD_CLI_V6, CLIENT_V4, CLIENT_V6),
            ("monitor", BOARD_MON_V4, BOARD_MON_V6, MONITOR_V4, MONITOR_V6),
        ):
            board_if, peer_if = f"{tag}b{peer[0]}", f"{tag}p{peer[0]}"
            _sh("ip", "link", "add", board_if, "netns", names["board"], "type", "veth",
                "peer", "name", peer_if, "netns", names[peer])
            for ns, ifname, v4, v6 in ((names["board"], board_if, board_v4, board_v6),
                                       (names[peer], peer_if, peer_v4, peer_v6)):
                _in(ns, "ip", "link", "set", "lo", "up")
                _in(ns, "ip", "addr", "add", f"{v4}/24", "dev", ifname)
                _in(ns, "ip", "-6", "addr", "add", f"{v6}/64", "dev", ifname, "nodad")
                _in(ns, "ip", "link", "set", ifname, "up")
        yield names
    finally:
        for ns in names.values():
            for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
                _sh("kill", "-9", pid, check=False)
            _sh("ip", "netns", "del", ns, check=False)


def _listeners(board_ns: str) -> subprocess.Popen[bytes]:
    """A TCP listener on the serving, SSH and node_exporter ports (both families) in the board namespace."""
    code = (
        "import socket, selectors\n"
        "sel = selectors.DefaultSelector()\n"
        f"for port in ({SERVING_PORT}, {SSH_PORT}, {NODE_EXPORTER_PORT}):\n"
        "    s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('::', port)); s.listen(64)\n"
        "    sel.register(s, selectors.EVENT_READ)\n"
        "while True:\n"
        "    for key, _ in sel.select():\n"
        "        conn, _ = key.fileobj.accept(); conn.sendall(b'ok'); conn.close()\n"
    )
    return subprocess.Popen(["ip", "netns", "exec", board_ns, sys.executable, "-c", code])


def _reaches(ns: str, address: str, port: int) -> bool:
    # The kernels complete (or the table drops) the handshake within the connect call, however busy
    # the machine, so a dropped SYN is told by a short connect timeout; the reply needs the listener
    # process scheduled, which on a loaded machine can take long, so it gets a generous one.
    code = (
        "import socket, sys\n"
        f"fam = socket.AF_INET6 if ':' in {address!r} else socket.AF_INET\n"
        "s = socket.socket(fam); s.settimeout(1.0)\n"
        f"try:\n    s.connect(({address!r}, {port})); s.settimeout(60)\n"
        "    sys.exit(0 if s.recv(2) == b'ok' else 1)\n"
        "except OSError:\n    sys.exit(1)\n"
    )
    return _in(ns, sys.executable, "-c", code, check=False).returncode == 0


@pytest.fixture
def board_listening(fleet_net: dict[str, str]) -> Iterator[dict[str, str]]:
    listener = _listeners(fleet_net["board"])
    try:
        deadline = time.monotonic() + 10
        while not _reaches(fleet_net["board"], "127.0.0.1", NODE_EXPORTER_PORT):
            assert time.monotonic() < deadline, "listener in the board namespace did not start"
            time.sleep(0.05)
        yield fleet_net
    finally:
        listener.kill()
        listener.wait()


def _apply(ns: str, table: Path) -> None:
    applied = _in(ns, "nft", "-f", str(table), check=False)
    assert applied.returncode == 0, applied.stderr


def test_rendered_tables_pass_nft_check_and_cover_both_families(tables: dict[str, Path]) -> None:
    board = tables["board"].read_text()
    rules = [line for line in board.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in rules if "flush" in line or "iif " in line]
    assert f"tcp dport {{ {SERVING_PORT} }} ip saddr @serving_v4 accept" in board
    assert f"tcp dport {{ {SERVING_PORT} }} ip6 saddr @serving_v6 accept" in board
    assert BALANCER_V6 in board and CLIENT_V6 in board and MONITOR_V6 in board
    assert f"tcp dport {{ {NODE_EXPORTER_PORT} }} ip saddr @monitor_v4 accept" in board
    assert f"tcp dport {{ {NODE_EXPORTER_PORT} }} ip6 saddr @monitor_v6 accept" in board
    balancer = tables["lb"].read_text()
    assert "dport { 80, 443 }" in balancer
    assert "serving_v4" not in balancer
    # The balancer also runs the nginx exporter.
    assert f"tcp dport {{ {NODE_EXPORTER_PORT}, 9113 }} ip saddr @monitor_v4 accept" in balancer
    assert f"tcp dport {{ {NODE_EXPORTER_PORT}, 9113 }} counter drop" in balancer
    # VRRP only from the other balancers: lb's peer is lb2 and the other way round.
    assert f"elements = {{ {BOARD_BAL_V4} }}" in balancer.split("set vrrp_v4")[1].split("}")[0] + "}"
    assert "meta l4proto 112 ip saddr @vrrp_v4 accept" in balancer
    assert "meta l4proto 112 counter drop" in balancer
    assert "vrrp" not in board
    # A monitor host that is neither board nor balancer: SSH and its own node_exporter only.
    monitor = tables["mon4"].read_text()
    assert "serving_v4" not in monitor and "dport { 80, 443 }" not in monitor
    assert f"tcp dport {{ {NODE_EXPORTER_PORT} }} counter drop" in monitor
    # Every host: policy drop, then loopback, invalid dropped, replies, ICMP, and the allow-lists
    # after them; the policy's own drops are counted last.
    for table in (board, balancer, monitor):
        rules = [line.strip() for line in table.splitlines() if line.strip()[:1] not in ("", "#")]
        start = rules.index("type filter hook input priority filter; policy drop;")
        assert rules[start + 1:start + 4] == [
            'iifname "lo" accept', "ct state invalid counter drop", "ct state established,related accept"]
        icmp = next(i for i, rule in enumerate(rules) if rule.startswith("icmpv6 type { destination-"))
        ssh = next(i for i, rule in enumerate(rules) if f"dport {{ {SSH_PORT} }}" in rule)
        assert start < icmp < ssh
        assert rules[-3] == 'counter comment "dropped by policy"'
    for path in tables.values():
        checked = _sh("nft", "-c", "-f", str(path), check=False)
        assert checked.returncode == 0, checked.stderr


def test_board_table_applies_twice_keeps_foreign_tables_and_filters(
    tables: dict[str, Path], board_listening: dict[str, str],
) -> None:
    board_ns = board_listening["board"]
    # A foreign table (as ufw/docker would own) must survive our loads.
    _in(board_ns, "nft", "add", "table", "ip", "foreign")
    _in(board_ns, "nft", "add", "chain", "ip", "foreign", "keep")
    # Before the firewall everything is reachable: the checks below can tell a difference.
    assert _reaches(board_listening["client"], BOARD_CLI_V4, SERVING_PORT)

    for _ in range(2):
        _apply(board_ns, tables["board"])
    listed = _in(board_ns, "nft", "list", "tables").stdout.split("\n")
    assert listed.count("table inet rkllm_fleet") == 1
    assert "table ip foreign" in listed

    balancer, client = board_listening["balancer"], board_listening["client"]
    assert _reaches(balancer, BOARD_BAL_V4, SERVING_PORT)
    assert _reaches(balancer, BOARD_BAL_V6, SERVING_PORT)
    assert not _reaches(client, BOARD_CLI_V4, SERVING_PORT)
    assert not _reaches(client, BOARD_CLI_V6, SERVING_PORT)
    # SSH: the controller (client namespace here) keeps access, others do not.
    assert _reaches(client, BOARD_CLI_V4, SSH_PORT)
    assert _reaches(client, BOARD_CLI_V6, SSH_PORT)
    assert not _reaches(balancer, BOARD_BAL_V4, SSH_PORT)
    # The board itself still reaches its server over loopback.
    assert _reaches(board_ns, "127.0.0.1", SERVING_PORT)


def test_monitor_hosts_from_the_inventory_reach_metrics_and_exporters_others_do_not(
    tables: dict[str, Path], board_listening: dict[str, str],
) -> None:
    monitor, client = board_listening["monitor"], board_listening["client"]
    balancer = board_listening["balancer"]
    # Open before the firewall, so the refusals below are the table's doing.
    assert _reaches(client, BOARD_CLI_V4, NODE_EXPORTER_PORT)
    assert _reaches(monitor, BOARD_MON_V4, SERVING_PORT)

    _apply(board_listening["board"], tables["board"])

    # Over IPv6 only the monitor group admits it to the serving port (the extra source is IPv4).
    for address in (BOARD_MON_V4, BOARD_MON_V6):
        assert _reaches(monitor, address, SERVING_PORT)
        assert _reaches(monitor, address, NODE_EXPORTER_PORT)
        assert not _reaches(monitor, address, SSH_PORT)
    for address in (BOARD_CLI_V4, BOARD_CLI_V6):
        assert not _reaches(client, address, NODE_EXPORTER_PORT)
    # The balancer may serve requests, not scrape the exporters.
    assert not _reaches(balancer, BOARD_BAL_V4, NODE_EXPORTER_PORT)
    assert _reaches(board_listening["board"], "127.0.0.1", NODE_EXPORTER_PORT)


def _send_vrrp(ns: str, destination: str) -> None:
    """One IPv4 packet of protocol 112 (a VRRP advertisement's envelope) from namespace ns."""
    code = ("import socket\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 112)\n"
            f"s.sendto(bytes(20), ({destination!r}, 0))\n")
    _in(ns, sys.executable, "-c", code)


def _vrrp_drops(ns: str) -> int:
    ruleset = _in(ns, "nft", "list", "chain", "inet", "rkllm_fleet", "input").stdout
    # nft names protocol 112 "vrrp" when /etc/protocols knows it.
    line = next(line for line in ruleset.splitlines()
                if "counter" in line and ("l4proto vrrp " in line or "l4proto 112 " in line))
    return int(line.split("packets")[1].split()[0])


def test_balancer_accepts_vrrp_only_from_the_other_balancers(
    tables: dict[str, Path], fleet_net: dict[str, str],
) -> None:
    # The board namespace plays balancer lb2: lb (the balancer namespace) is its only peer.
    lb2 = fleet_net["board"]
    _apply(lb2, tables["lb2"])
    _send_vrrp(fleet_net["balancer"], BOARD_BAL_V4)
    assert _vrrp_drops(lb2) == 0
    _send_vrrp(fleet_net["client"], BOARD_CLI_V4)
    assert _vrrp_drops(lb2) == 1


def _udp_answer(ns: str, address: str, port: int) -> str:
    """'answer', 'refused' (ICMP port unreachable) or 'silent' for one probe datagram from ns."""
    code = (
        "import socket\n"
        f"fam = socket.AF_INET6 if ':' in {address!r} else socket.AF_INET\n"
        "s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)\n"
        f"s.connect(({address!r}, {port})); s.send(b'probe')\n"
        "try:\n    s.recv(64); print('answer')\n"
        "except ConnectionRefusedError:\n    print('refused')\n"
        "except TimeoutError:\n    print('silent')\n"
    )
    return _in(ns, sys.executable, "-c", code).stdout.strip()


def _udp_echo(ns: str, port: int) -> subprocess.Popen[bytes]:
    code = ("import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
            f"s.bind(('::', {port}))\n"
            "while True:\n    data, peer = s.recvfrom(64); s.sendto(data, peer)\n")
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", code])


def test_input_policy_drops_unlisted_udp_and_tcp_and_keeps_icmp(
    tables: dict[str, Path], board_listening: dict[str, str],
) -> None:
    board_ns, client = board_listening["board"], board_listening["client"]
    unlisted_udp, closed_udp = 40404, 40405
    echo = _udp_echo(board_ns, unlisted_udp)
    try:
        # Without the table the listener answers and a closed port is refused by the kernel.
        deadline = time.monotonic() + 30
        while _udp_answer(client, BOARD_CLI_V4, unlisted_udp) != "answer":
            assert time.monotonic() < deadline, "UDP echo listener in the board namespace did not start"
        assert _udp_answer(client, BOARD_CLI_V4, closed_udp) == "refused"

        _apply(board_ns, tables["board"])
        for address in (BOARD_CLI_V4, BOARD_CLI_V6):
            assert _udp_answer(client, address, unlisted_udp) == "silent"
            assert _udp_answer(client, address, closed_udp) == "silent"
            # ping and (IPv6) neighbour discovery still work: the neighbour entry is flushed first.
            _in(client, "ip", "neigh", "flush", "all")
            ping = _in(client, "ping", "-c", "2", "-i", "0.2", "-W", "5", address, check=False)
            assert ping.returncode == 0, ping.stdout
        # The board's own loopback and its outgoing connections' replies are untouched.
        assert _udp_answer(board_ns, "127.0.0.1", unlisted_udp) == "answer"
        assert _udp_answer(board_ns, "::1", unlisted_udp) == "answer"
        chain = _in(board_ns, "nft", "list", "chain", "inet", "rkllm_fleet", "input").stdout
        assert "policy drop;" in chain and "ct state invalid counter" in chain
        dropped = int(chain.split('comment "dropped by policy"')[0].rsplit("packets", 1)[1].split()[0])
        assert dropped >= 4
    finally:
        echo.kill()
        echo.wait()
