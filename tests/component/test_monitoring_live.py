"""A real Prometheus (Debian's binary) scrapes two real rkllm-server processes: stopping one makes
RkllmBoardDown fire, starting it again clears it, and the role's Alertmanager configuration (Debian's
Alertmanager) delivers both to a webhook. Intervals and `for:` are shortened by variables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from local_servers import LocalServer, local_servers
from monitoring_harness import (
    FAST_ALERTING,
    AlertWebhook,
    alert_webhook,
    board_down_alerts,
    board_health,
    render_monitoring,
    running_alertmanager,
    running_prometheus,
)

from tests.support import REPO_ROOT, free_port, wait_until

TINY = REPO_ROOT / "tests/fakelib/models/tiny-flat.rkllm"


@pytest.fixture
def two_boards(double_library_path: Path, tmp_path: Path) -> Iterator[list[LocalServer]]:
    servers = [LocalServer(double_library_path, {"tiny": TINY}, tmp_path) for _ in range(2)]
    with local_servers(servers):
        yield servers


@pytest.fixture
def webhook() -> Iterator[AlertWebhook]:
    with alert_webhook("127.0.0.1") as receiver:
        yield receiver


@pytest.fixture
def prometheus(two_boards: list[LocalServer], webhook: AlertWebhook, tmp_path: Path) -> Iterator[str]:
    listen, alertmanager_listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    inventory = {"all": {"children": {"rkllm_boards": {"hosts": {
        f"board{i + 1}": {"ansible_host": "127.0.0.1", "monitoring_rkllm_server_port": server.port}
        for i, server in enumerate(two_boards)
    }}}}}
    render = tmp_path / "prometheus"
    run = render_monitoring(render, {**FAST_ALERTING, "monitoring_prometheus_listen_address": listen,
                                     "monitoring_alertmanager_listen_address": alertmanager_listen,
                                     "monitoring_alertmanager_webhook_urls": [webhook.url]},
                            inventory=inventory)
    assert run.returncode == 0, run.stdout + run.stderr
    with (running_alertmanager(render / "alertmanager.yml", tmp_path / "alertmanager", alertmanager_listen),
          running_prometheus(render / "prometheus.yml", tmp_path / "tsdb", listen) as url):
        yield url


def test_board_down_alert_fires_clears_and_is_delivered(prometheus: str, two_boards: list[LocalServer],
                                                        webhook: AlertWebhook) -> None:
    wait_until(lambda: board_health(prometheus) == {"board1": "up", "board2": "up"},
               "both boards up in Prometheus", deadline_s=30, interval=0.2)
    assert board_down_alerts(prometheus) == {}

    two_boards[1].stop()
    wait_until(lambda: board_down_alerts(prometheus) == {"board2": "firing"},
               "RkllmBoardDown firing for board2", deadline_s=30, interval=0.2)
    assert board_health(prometheus)["board1"] == "up"
    wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "firing"),
               "the webhook notified of board2 firing", deadline_s=30, interval=0.2)

    two_boards[1].start()
    wait_until(lambda: board_down_alerts(prometheus) == {},
               "no RkllmBoardDown alert", deadline_s=30, interval=0.2)
    assert board_health(prometheus) == {"board1": "up", "board2": "up"}
    wait_until(lambda: webhook.notified("RkllmBoardDown", "board2", "resolved"),
               "the webhook notified of board2 resolved", deadline_s=30, interval=0.2)
    assert not webhook.notified("RkllmBoardDown", "board1", "firing")
