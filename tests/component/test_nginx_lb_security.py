"""nginx_lb's exposure as rendered by Ansible: only the API is proxied, TLS takes modern clients only,
per-client limits, keys never shown by `--diff` nor readable by others, no keys over plain HTTP.

One board (model alpha, 10 tokens/s so a stream stays open) behind real nginx on loopback.
"""

from __future__ import annotations

import json
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from balancer_harness import (
    Board,
    BoardModel,
    RenderedBalancer,
    balancer_inventory,
    local_host,
    render_balancers,
    run_role_tasks,
    running_boards,
    running_nginx,
    self_signed_certificate,
)

from tests.support import free_port

API_KEY = "sk-" + "fedcba9876543210" * 4
HTTPS_PORT = free_port()


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory, double_library_path: Path) -> Iterator[Board]:
    with running_boards(tmp_path_factory.mktemp("boards"), double_library_path,
                        {"b1": [BoardModel("alpha", tokens_per_second=10.0, reply_tokens=200, queue_size=4)]}
                        ) as started:
        yield started["b1"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def balancers(tmp_path_factory: pytest.TempPathFactory, board: Board,
              certificate: tuple[Path, Path]) -> dict[str, RenderedBalancer]:
    cert, key = certificate
    return render_balancers(tmp_path_factory.mktemp("lb"), [board], {
        "plain": {},
        "tls": {"nginx_lb_tls_certificate": str(cert), "nginx_lb_tls_certificate_key": str(key),
                "nginx_lb_https_port": HTTPS_PORT, "nginx_lb_api_keys": [API_KEY]},
        "one_connection": {"nginx_lb_conn_limit": 1},
    })


@pytest.fixture(scope="module")
def plain(balancers: dict[str, RenderedBalancer]) -> Iterator[str]:
    with running_nginx(balancers["plain"]) as base:
        yield base


@pytest.fixture(scope="module")
def tls(balancers: dict[str, RenderedBalancer]) -> Iterator[str]:
    with running_nginx(balancers["tls"]):
        yield f"https://127.0.0.1:{HTTPS_PORT}"


@pytest.mark.parametrize("path", ["/ready", "/metrics", "/openapi.json", "/docs", "/v2/models", "/api",
                                  "/api/unknown", "/nginx_status", "/v1"])
def test_only_the_api_is_proxied(plain: str, path: str) -> None:
    response = httpx.get(f"{plain}{path}")
    assert response.status_code == 404, path
    body = response.json()
    if path.startswith("/api/"):
        assert body == {"error": "not found"}
    else:
        assert body["error"]["code"] == "not_found"


def test_board_endpoints_behind_the_api_paths_are_not_reached(plain: str, board: Board) -> None:
    # The board itself answers /ready: the 404 above is the balancer's, not a missing route.
    assert httpx.get(f"http://127.0.0.1:{board.port}/ready").status_code == 200
    assert httpx.post(f"{plain}/ready").status_code == 404


def test_api_paths_reach_the_boards(plain: str) -> None:
    assert httpx.get(f"{plain}/").text == "Ollama is running"
    assert httpx.head(f"{plain}/").status_code == 200
    assert httpx.get(f"{plain}/api/version").json()["version"]
    assert "alpha" in [m["name"] for m in httpx.get(f"{plain}/api/tags").json()["models"]]
    assert httpx.get(f"{plain}/api/ps").status_code == 200
    assert "alpha" in [m["id"] for m in httpx.get(f"{plain}/v1/models").json()["data"]]
    chat = httpx.post(f"{plain}/v1/chat/completions", timeout=30,
                      json={"model": "alpha", "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hello"}]})
    assert chat.status_code == 200
    assert httpx.get(f"{plain}/healthz").json() == {"status": "ok"}


def test_plain_http_sends_no_hsts(plain: str) -> None:
    assert "strict-transport-security" not in httpx.get(f"{plain}/healthz").headers


def handshake(port: int, *, version: ssl.TLSVersion, ciphers: str | None = None) -> str:
    """Complete a TLS handshake of exactly `version` (and `ciphers` under TLS 1.2); the cipher agreed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = version
    # Level 0: the client offers what is asked; any refusal below is the balancer's.
    context.set_ciphers(f"{ciphers or 'ALL'}:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as wrapped:
        cipher = wrapped.cipher()
        assert cipher is not None
        return cipher[0]


def test_tls_refuses_old_protocols(tls: str) -> None:
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol.version|unsupported.protocol"):
        handshake(HTTPS_PORT, version=ssl.TLSVersion.TLSv1_1)


@pytest.mark.parametrize("suite", ["ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384"])
def test_tls12_refuses_cbc_suites(tls: str, suite: str) -> None:
    # nginx's default list (HIGH:!aNULL:!MD5) would accept both with this ECDSA certificate.
    with pytest.raises(ssl.SSLError, match=r"(?i)handshake.failure|no.shared.cipher"):
        handshake(HTTPS_PORT, version=ssl.TLSVersion.TLSv1_2, ciphers=suite)


def test_tls12_accepts_forward_secret_aead_and_tls13_works(tls: str) -> None:
    assert handshake(HTTPS_PORT, version=ssl.TLSVersion.TLSv1_2,
                     ciphers="ECDHE-ECDSA-AES128-GCM-SHA256") == "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert handshake(HTTPS_PORT, version=ssl.TLSVersion.TLSv1_2,
                     ciphers="ECDHE-ECDSA-CHACHA20-POLY1305") == "ECDHE-ECDSA-CHACHA20-POLY1305"
    assert handshake(HTTPS_PORT, version=ssl.TLSVersion.TLSv1_3).startswith("TLS_")


def test_hsts_on_every_https_answer(tls: str) -> None:
    authorized = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(verify=False, timeout=30) as client:
        answers = {"ok": client.get(f"{tls}/v1/models", headers=authorized),
                   "healthz": client.get(f"{tls}/healthz"),
                   "unauthorized": client.get(f"{tls}/v1/models"),
                   "not found": client.get(f"{tls}/metrics")}
    assert {name: r.status_code for name, r in answers.items()} == {
        "ok": 200, "healthz": 200, "unauthorized": 401, "not found": 404}
    for name, response in answers.items():
        assert response.headers.get("strict-transport-security") == "max-age=63072000", name


def test_second_request_over_the_connection_limit_gets_429(balancers: dict[str, RenderedBalancer]) -> None:
    with running_nginx(balancers["one_connection"]) as base, httpx.Client(timeout=30) as client:
        stream_body = {"model": "alpha", "stream": True, "max_tokens": 200,
                       "messages": [{"role": "user", "content": "a long answer"}]}
        with client.stream("POST", f"{base}/v1/chat/completions", json=stream_body) as stream:
            assert stream.status_code == 200
            events = stream.iter_lines()  # kept referenced: dropping the iterator closes the stream
            next(events)  # the stream is running
            refused = httpx.get(f"{base}/v1/models")
            ollama_refused = httpx.get(f"{base}/api/tags")
        after = httpx.get(f"{base}/v1/models")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert ollama_refused.status_code == 429
    assert ollama_refused.json() == {"error": "rate limit exceeded, retry later"}
    assert after.status_code == 200


def test_keys_stay_out_of_diff_and_of_other_users(tmp_path: Path, board: Board,
                                                  certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    secret = "sk-" + "0a1b2c3d4e5f6a7b" * 4
    inventory, rendered = balancer_inventory(tmp_path, [board], {"lb": {
        "nginx_lb_tls_certificate": str(cert), "nginx_lb_tls_certificate_key": str(key),
        "nginx_lb_https_port": free_port(), "nginx_lb_api_keys": [secret]}})
    printed = run_role_tasks(tmp_path, inventory, {}, role="nginx_lb", tasks_from="configure",
                             hosts="rkllm_balancers", playbook_args=["--diff"])
    # --diff did print the rest of the configuration: the key's absence means something.
    assert "least_conn" in printed
    assert secret not in printed
    balancer = rendered["lb"]
    assert secret not in balancer.conf.read_text()
    keys_file = balancer.prefix / "api-keys.conf"
    assert f'"Bearer {secret}" 1;' in keys_file.read_text()
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o640
    # Changing a key and rendering again with --diff does not show the old or the new one.
    changed = secret.replace("0a1b", "9f8e")
    changed_inventory: dict[str, object] = json.loads(json.dumps(inventory).replace(secret, changed))
    printed = run_role_tasks(tmp_path, changed_inventory, {}, role="nginx_lb", tasks_from="configure",
                             hosts="rkllm_balancers", playbook_args=["--diff"])
    assert "changed=1" in printed
    assert secret not in printed and changed not in printed


def preflight(workdir: Path, balancer_vars: dict[str, object]) -> str:
    inventory: dict[str, object] = {"all": {"children": {
        "rkllm_balancers": {"hosts": {"lb": {**local_host(), **balancer_vars}}},
        "rkllm_boards": {"hosts": {"b1": {"ansible_host": "127.0.0.1"}}}}}}
    return run_role_tasks(workdir, inventory, {}, role="nginx_lb", tasks_from="preflight",
                          hosts="rkllm_balancers")


def test_api_keys_without_tls_are_refused_unless_allowed(tmp_path: Path,
                                                          certificate: tuple[Path, Path]) -> None:
    with pytest.raises(RuntimeError, match=r"send\s+its key in clear text"):
        preflight(tmp_path, {"nginx_lb_api_keys": [API_KEY]})
    preflight(tmp_path, {"nginx_lb_api_keys": [API_KEY], "nginx_lb_allow_plaintext_api_keys": True})
    cert, key = certificate
    preflight(tmp_path, {"nginx_lb_api_keys": [API_KEY], "nginx_lb_tls_certificate": str(cert),
                         "nginx_lb_tls_certificate_key": str(key)})
    preflight(tmp_path, {})
