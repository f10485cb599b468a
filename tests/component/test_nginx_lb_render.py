"""nginx_lb as rendered by Ansible, checked by `nginx -t`, run as a real nginx in front of real
rkllm-server boards (the C double standing in for the NPU) on loopback.

Fleet: b1 hosts alpha, beta, delta; b2 hosts alpha, delta; b3 hosts alpha, gamma. Every model has
queue_size 0, so a board running one generation of a model answers 503 "queue full" for it.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from balancer_harness import (
    Board,
    BoardModel,
    RenderedBalancer,
    access_log_size,
    balancer_inventory,
    logged_upstreams,
    nginx_check,
    reload_nginx,
    render_balancer,
    render_balancers,
    run_role_tasks,
    running_boards,
    running_nginx,
    self_signed_certificate,
)

from tests.support import REPO_ROOT, free_port

FLEET = {
    "b1": [BoardModel("alpha"), BoardModel("beta"), BoardModel("delta")],
    "b2": [BoardModel("alpha"), BoardModel("delta")],
    "b3": [BoardModel("alpha"), BoardModel("gamma")],
}


@pytest.fixture(scope="module")
def boards(tmp_path_factory: pytest.TempPathFactory, double_library_path: Path) -> Iterator[dict[str, Board]]:
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path, FLEET) as started:
        yield started


# As long as `openssl rand -hex 32` makes them: long keys need a larger map hash bucket.
API_KEY = "sk-" + "0123456789abcdef" * 4
HTTPS_PORT = free_port()


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory,
              boards: dict[str, Board]) -> dict[str, RenderedBalancer]:
    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    secured = {"nginx_lb_tls_certificate": str(cert), "nginx_lb_tls_certificate_key": str(key),
               "nginx_lb_https_port": HTTPS_PORT, "nginx_lb_api_keys": [API_KEY],
               "nginx_lb_rate_limit_enabled": True, "nginx_lb_rate_limit_rate": "1r/s",
               "nginx_lb_rate_limit_burst": 2}
    workdir = tmp_path_factory.mktemp("lb")
    # "reloaded" is "main" with b3 drained: same port, logs and pid, so it can replace main's config.
    main = workdir / "main"
    same_as_main = {"nginx_lb_http_port": free_port(), "nginx_lb_pid_path": str(main / "nginx.pid"),
                    "nginx_lb_log_dir": str(main / "log"), "nginx_lb_js_dir": str(main / "js"),
                    "nginx_lb_state_dir": str(main / "state")}
    return render_balancers(workdir, list(boards.values()), {
        "main": same_as_main, "reloaded": {**same_as_main, "nginx_lb_drained_boards": ["b3"]},
        "drained": {"nginx_lb_drained_boards": ["b2"]}, "secured": secured,
        "status_elsewhere": {"nginx_lb_status_allowed_sources": ["192.0.2.7"]},
        "no_status": {"nginx_lb_status_enabled": False}})


@pytest.fixture(scope="module")
def balancer(balancers: dict[str, RenderedBalancer]) -> RenderedBalancer:
    return balancers["main"]


@pytest.fixture(scope="module")
def drained_balancer(balancers: dict[str, RenderedBalancer]) -> RenderedBalancer:
    return balancers["drained"]


@pytest.fixture
def lb(balancer: RenderedBalancer) -> Iterator[str]:
    # A fresh nginx per test: passive-health state (max_fails) must not leak between tests.
    with running_nginx(balancer) as base:
        yield base


_requests = itertools.count()


def chat(model: str, *, max_tokens: int = 4, stream: bool = False) -> dict[str, object]:
    """A one-turn chat of its own: conversation affinity must not tie these requests to one board."""
    return {"model": model, "messages": [{"role": "user", "content": f"hello fleet {next(_requests)}"}],
            "max_tokens": max_tokens, "stream": stream}


def port_of(boards: dict[str, Board], address: str) -> str:
    return next(name for name, b in boards.items() if address == f"127.0.0.1:{b.port}")


@contextmanager
def busy(board: Board, model: str) -> Iterator[None]:
    """Occupy `model` on `board` directly (not through nginx) until the block ends."""
    url = f"http://127.0.0.1:{board.port}/v1/chat/completions"
    with httpx.Client(timeout=30) as client, client.stream(
        "POST", url, json=chat(model, max_tokens=2000, stream=True),
    ) as response:
        assert response.status_code == 200
        events = response.iter_lines()  # kept referenced: dropping the iterator closes the stream
        next(events)  # the request holds the model once its first event arrived
        yield
    # closing the stream aborts the generation; wait until the board takes requests again
    deadline = time.monotonic() + 10
    while httpx.post(url, json=chat(model, max_tokens=1), timeout=10).status_code == 503:
        assert time.monotonic() < deadline, f"{board.name} stayed busy"
        time.sleep(0.02)


def test_rendered_config_is_valid_and_complete(balancer: RenderedBalancer) -> None:
    checked = nginx_check(balancer.conf)
    assert checked.returncode == 0, checked.stderr
    conf = balancer.conf.read_text()
    for directive in ("least_conn;", "proxy_buffering off;", "gzip off;", 'proxy_set_header Connection "";',
                      "proxy_next_upstream error timeout http_503 non_idempotent;",
                      # 5 of the board's 9 in the least_conn upstreams, 4 in its home (conversation affinity).
                      " max_conns=5",
                      "error_page 502 504 = @rkllm_busy;"):
        assert directive in conf
    declared = re.search(r"const routes = (\{.*\});", balancer.js.read_text())
    assert declared is not None
    routes = json.loads(declared.group(1))
    # alpha is on every board and uses the shared upstream; the others get their own.
    assert set(routes) == {"beta", "delta", "gamma"}


def test_healthz_is_answered_by_nginx(lb: str) -> None:
    response = httpx.get(f"{lb}/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def stub_status(balancer: RenderedBalancer) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{balancer.status_port}/nginx_status", timeout=5)


def requests_served(status_page: str) -> int:
    """The `requests` counter of a stub_status page (third number under "server accepts handled requests")."""
    counters = re.search(r"server accepts handled requests\n\s*(\d+) (\d+) (\d+)", status_page)
    assert counters is not None, status_page
    return int(counters.group(3))


def test_stub_status_counts_requests_on_its_own_loopback_server(balancer: RenderedBalancer, lb: str) -> None:
    assert f"listen 127.0.0.1:{balancer.status_port};" in balancer.conf.read_text()
    before = requests_served(stub_status(balancer).text)
    assert httpx.get(f"{lb}/healthz").status_code == 200
    # The /healthz request and this second status read.
    assert requests_served(stub_status(balancer).text) == before + 2
    # The API listener does not serve it (the path goes to the boards, which do not know it).
    assert "Active connections" not in httpx.get(f"{lb}/nginx_status", timeout=10).text


def test_stub_status_refuses_sources_not_listed_and_can_be_turned_off(
        balancers: dict[str, RenderedBalancer]) -> None:
    with running_nginx(balancers["status_elsewhere"]):
        assert stub_status(balancers["status_elsewhere"]).status_code == 403
    disabled = balancers["no_status"].conf.read_text()
    assert "stub_status" not in disabled
    assert f":{balancers['no_status'].status_port};" not in disabled


def test_stream_passes_through_unbuffered(lb: str) -> None:
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{lb}/v1/chat/completions", json=chat("alpha", max_tokens=25, stream=True),
                      timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        arrivals = [time.monotonic() - start for line in response.iter_lines() if line.startswith("data:")]
    # 25 tokens at 50 tok/s take ~0.5 s: buffered, every event would arrive at the end together.
    assert len(arrivals) >= 25
    assert arrivals[-1] - arrivals[1] > 0.3
    assert arrivals[1] < arrivals[-1] / 2


def test_busy_board_503_is_retried_on_another_board(lb: str, boards: dict[str, Board],
                                                     balancer: RenderedBalancer) -> None:
    offset = access_log_size(balancer)
    with busy(boards["b1"], "alpha"):
        statuses = [httpx.post(f"{lb}/v1/chat/completions", json=chat("alpha"), timeout=30).status_code
                    for _ in range(6)]
    assert statuses == [200] * 6
    logged = logged_upstreams(balancer, offset, len(statuses))
    retried = [(ua, us) for ua, us in logged if us == "503, 200"]
    assert retried, logged
    assert all(port_of(boards, ua.split(", ")[0]) == "b1" for ua, _ in retried)


def test_every_board_full_gives_503_with_retry_after_not_502(lb: str, boards: dict[str, Board]) -> None:
    with ExitStack() as stack:
        for board in boards.values():
            stack.enter_context(busy(board, "alpha"))
        for _ in range(4):
            response = httpx.post(f"{lb}/v1/chat/completions", json=chat("alpha"), timeout=30)
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
            assert "error" in response.json()


def test_no_live_board_gives_503_json_with_retry_after(tmp_path: Path) -> None:
    nobody = [Board(name=f"gone{i}", port=free_port(), models=["alpha"]) for i in range(2)]
    with running_nginx(render_balancer(tmp_path, nobody)) as base:
        for path, shape in (("/v1/chat/completions", dict), ("/api/chat", str)):
            for _ in range(4):  # first refused connections, then "no live upstreams"
                response = httpx.post(f"{base}{path}", json=chat("alpha"), timeout=30)
                assert response.status_code == 503
                assert response.headers["retry-after"] == "2"
                assert isinstance(response.json()["error"], shape)


@pytest.mark.parametrize(("model", "allowed"), [
    ("beta", {"b1"}), ("delta", {"b1", "b2"}), ("gamma", {"b3"}), ("alpha", {"b1", "b2", "b3"}),
])
def test_model_goes_only_to_boards_hosting_it(lb: str, boards: dict[str, Board], balancer: RenderedBalancer,
                                              model: str, allowed: set[str]) -> None:
    offset = access_log_size(balancer)
    for _ in range(6):
        response = httpx.post(f"{lb}/v1/chat/completions", json=chat(model), timeout=30)
        assert response.status_code == 200
        assert response.json()["model"] == model
    used = {port_of(boards, ua) for ua, _ in logged_upstreams(balancer, offset, 6)}
    assert used == allowed


def test_auto_and_unknown_models_go_to_the_whole_fleet(lb: str, boards: dict[str, Board],
                                                       balancer: RenderedBalancer) -> None:
    offset = access_log_size(balancer)
    unknown = httpx.post(f"{lb}/v1/chat/completions", json=chat("no-such-model"), timeout=30)
    assert unknown.status_code == 404  # the boards' own answer, in the API's shape
    assert "error" in unknown.json()
    # A model no board has is asked of each board once (any of them might have just gained it).
    [(tried, statuses)] = logged_upstreams(balancer, offset, 1)
    assert sorted(port_of(boards, ua) for ua in tried.split(", ")) == ["b1", "b2", "b3"]
    assert statuses == "404, 404, 404"
    offset = access_log_size(balancer)
    # Round robin among equally idle boards; the 404 tries above moved its position, so six requests.
    for _ in range(6):
        assert httpx.get(f"{lb}/v1/models", timeout=30).status_code == 200
    used = [port_of(boards, ua) for ua, _ in logged_upstreams(balancer, offset, 6)]
    assert set(used) == {"b1", "b2", "b3"}, used


def test_drained_board_receives_nothing(drained_balancer: RenderedBalancer, boards: dict[str, Board]) -> None:
    with running_nginx(drained_balancer) as base:
        offset = access_log_size(drained_balancer)
        for model in ("alpha", "delta") * 4:
            assert httpx.post(f"{base}/v1/chat/completions", json=chat(model), timeout=30).status_code == 200
        used = {port_of(boards, ua) for ua, _ in logged_upstreams(drained_balancer, offset, 8)}
    assert used == {"b1", "b3"}


def test_tls_api_keys_and_rate_limit(balancers: dict[str, RenderedBalancer]) -> None:
    with running_nginx(balancers["secured"]) as plain:
        redirect = httpx.get(f"{plain}/v1/models")
        assert redirect.status_code == 308
        assert redirect.headers["location"] == f"https://127.0.0.1:{HTTPS_PORT}/v1/models"
        secure = f"https://127.0.0.1:{HTTPS_PORT}"
        with httpx.Client(verify=False, timeout=30) as client:
            assert client.get(f"{secure}/healthz").status_code == 200  # no key needed
            missing = client.get(f"{secure}/v1/models")
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert missing.json()["error"]["code"] == "invalid_api_key"
            wrong = client.get(f"{secure}/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"})
            assert wrong.status_code == 401
            authorized = {"Authorization": f"Bearer {API_KEY}"}
            answered = client.post(f"{secure}/v1/chat/completions", json=chat("beta"), headers=authorized)
            assert answered.status_code == 200
            # 1 r/s with a burst of 2: a quick series of requests is cut off with 429 + Retry-After.
            statuses = [client.get(f"{secure}/v1/models", headers=authorized) for _ in range(6)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    for response in limited:
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "rate_limited"


@contextmanager
def restored_file(path: Path) -> Iterator[None]:
    """Put the file's current content back when the block ends."""
    content = path.read_bytes()
    try:
        yield
    finally:
        path.write_bytes(content)


def test_draining_by_graceful_reload_keeps_the_running_stream(balancers: dict[str, RenderedBalancer]) -> None:
    main = balancers["main"]
    # The reload replaces main's configuration file: put it back, so later tests get main again.
    with restored_file(main.conf), running_nginx(main) as base, httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=chat("gamma", max_tokens=100, stream=True), timeout=30,
    ) as running:
        events = running.iter_lines()
        assert running.status_code == 200
        next(events)
        # gamma lives only on b3; once b3 is drained the fleet has no board for it.
        reload_nginx(main, balancers["reloaded"].conf)
        # Until the new workers run, b3 itself answers "busy"; then nginx answers for the empty fleet.
        deadline = time.monotonic() + 10
        while True:
            refused = httpx.post(f"{base}/v1/chat/completions", json=chat("gamma"), timeout=30)
            assert refused.status_code == 503
            if refused.json()["error"]["code"] == "fleet_busy":
                break
            assert time.monotonic() < deadline, "the reloaded configuration never took effect"
        assert refused.headers["retry-after"] == "2"
        rest = [line for line in events if line.startswith("data:")]
    # The stream that was running on b3 went on to its end through the old worker.
    assert rest[-1] == "data: [DONE]"
    assert len([line for line in rest if '"content":"' in line and '"content":""' not in line]) >= 90


def test_read_timeout_covers_a_whole_answer_or_follows_the_boards_watchdog_bound(tmp_path: Path) -> None:
    """By default nginx waits 600 s (a non-streamed answer arrives whole); set empty, it waits as long as
    the slowest board's watchdog lets a healthy run stay silent, plus the margin."""
    boards = [Board(name="b1", port=18201, models=["alpha"]), Board(name="b2", port=18202, models=["alpha"])]
    inventory, rendered = balancer_inventory(tmp_path, boards, {
        "derived": {"nginx_lb_proxy_read_timeout": ""}, "fixed": {}})
    board_hosts = inventory["all"]["children"]["rkllm_boards"]["hosts"]  # type: ignore[index]
    run_role_tasks(tmp_path, inventory, {}, role="nginx_lb", tasks_from="configure", hosts="rkllm_balancers")
    defaults_only = set(re.findall(r"proxy_read_timeout (\S+);", rendered["derived"].conf.read_text()))
    # A board with a longer context (a larger stall bound) sets the fleet's timeout.
    board_hosts["b2"]["rkllm_server_watchdog_read_timeout_seconds"] = 210
    run_role_tasks(tmp_path, inventory, {}, role="nginx_lb", tasks_from="configure", hosts="rkllm_balancers")
    from_board = set(re.findall(r"proxy_read_timeout (\S+);", rendered["derived"].conf.read_text()))
    fixed = set(re.findall(r"proxy_read_timeout (\S+);", rendered["fixed"].conf.read_text()))
    specs = yaml.safe_load((REPO_ROOT / "roles/rkllm_server/meta/argument_specs.yml").read_text())
    server_options = specs["argument_specs"]["main"]["options"]
    server_default = server_options["rkllm_server_watchdog_read_timeout_seconds"]["default"]
    assert server_default == 133
    assert defaults_only == {f"{server_default + 5}s"}
    assert from_board == {"215s"}
    assert fixed == {"600s"}


@pytest.fixture
def throwaway_netns() -> Iterator[str]:
    """A network namespace of its own: the role's sysctls apply there, never to this machine's."""
    name = f"rkllm-unit-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def test_tcp_keepalive_timing_applies_once_to_the_balancers_kernel(tmp_path: Path,
                                                                  throwaway_netns: str) -> None:
    sysctl_file = tmp_path / "sysctl.conf"
    board = Board(name="b1", port=18211, models=["alpha"])
    inventory, _ = balancer_inventory(tmp_path, [board], {"lb": {
        "nginx_lb_manage_sysctl": True, "nginx_lb_sysctl_path": str(sysctl_file),
        "nginx_lb_tcp_keepalive_time_seconds": 12}})
    in_netns = ("ip", "netns", "exec", throwaway_netns)

    def in_force() -> list[str]:
        shown = subprocess.run([*in_netns, "sysctl", "-n", "net.ipv4.tcp_keepalive_time",
                                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"],
                               capture_output=True, text=True, check=True)
        return shown.stdout.split()

    def run() -> str:
        return run_role_tasks(tmp_path, inventory, {}, role="nginx_lb", tasks_from="configure",
                              hosts="rkllm_balancers", launcher=in_netns)

    first = run()
    assert in_force() == ["12", "3", "3"], first
    assert "net.ipv4.tcp_keepalive_time = 12" in sysctl_file.read_text()
    assert re.search(r"changed=0\b", run())
    # The kernel's values are what the role converges, not the file: a boot that skipped systemd-sysctl.
    subprocess.run([*in_netns, "sysctl", "-q", "-w", "net.ipv4.tcp_keepalive_time=7200"], check=True)
    assert not re.search(r"changed=0\b", run())
    assert in_force()[0] == "12"
