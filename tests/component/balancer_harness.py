"""Render the nginx_lb role with Ansible and run the result as a real nginx on loopback.

Shared by the balancer tests and bench/bench_balancer.py: the config under test is always the one
the role renders, never a hand-written copy.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import REPO_ROOT, free_port, wait_until

ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"

_ROLE_PLAY = """\
- name: Run {role} tasks from {tasks_from}
  hosts: {hosts}
  gather_facts: false
  tasks:
    - name: Include {role}
      ansible.builtin.include_role:
        name: {role}
        tasks_from: {tasks_from}
"""


@dataclass(frozen=True)
class Board:
    name: str
    port: int
    models: Sequence[str]
    address: str = "127.0.0.1"
    pid: int = 0  # of a board started by running_boards
    drain_file: Path | None = None  # touch it to drain the board (its server answers 503 "draining")


@dataclass(frozen=True)
class RenderedBalancer:
    prefix: Path
    conf: Path
    port: int
    js: Path
    status_port: int


def render_balancers(workdir: Path, boards: Sequence[Board], variants: dict[str, dict[str, object]]
                     ) -> dict[str, RenderedBalancer]:
    """Run the role's configure tasks (template + `nginx -t` validate) once for several balancer
    variants (host vars per variant, e.g. drained boards), each into workdir/<variant>."""
    inventory, rendered = balancer_inventory(workdir, boards, variants)
    run_role_tasks(workdir, inventory, {}, role="nginx_lb", tasks_from="configure", hosts="rkllm_balancers")
    return rendered


def balancer_inventory(workdir: Path, boards: Sequence[Board], variants: dict[str, dict[str, object]]
                       ) -> tuple[dict[str, object], dict[str, RenderedBalancer]]:
    """The inventory of render_balancers (balancers rendering into workdir/<variant>, local paths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rendered: dict[str, RenderedBalancer] = {}
    hosts: dict[str, object] = {}
    for variant, role_vars in variants.items():
        prefix = workdir / variant
        prefix.mkdir()  # the role writes into /etc/nginx, which the package creates
        port = int(str(role_vars.get("nginx_lb_http_port", free_port())))
        # Balancers of one test may run side by side: each gets its own stub_status port too.
        status_port = int(str(role_vars.get("nginx_lb_status_port", free_port())))
        hosts[variant] = {
            **local_host(),
            "nginx_lb_manage_service": False,
            "nginx_lb_manage_sysctl": False,
            "nginx_lb_conf_path": str(prefix / "nginx.conf"),
            "nginx_lb_js_dir": str(prefix / "js"),
            "nginx_lb_state_dir": str(prefix / "state"),
            "nginx_lb_log_dir": str(prefix / "log"),
            "nginx_lb_pid_path": str(prefix / "nginx.pid"),
            "nginx_lb_affinity_dir": str(prefix / "affinity"),
            "nginx_lb_api_keys_path": str(prefix / "api-keys.conf"),
            "nginx_lb_listen_addresses": ["127.0.0.1"],
            "nginx_lb_http_port": port,
            "nginx_lb_status_port": status_port,
            "nginx_lb_user": "root",
            "nginx_lb_worker_processes": 2,
            # Each variant is a balancer of its own, not one of several sharing the boards, and Ollama
            # requests get the 503 at once unless a test is about their wait.
            "nginx_lb_admission_shares": 1,
            "nginx_lb_ollama_wait_seconds": 0,
            **role_vars,
        }
        rendered[variant] = RenderedBalancer(prefix=prefix, conf=prefix / "nginx.conf", port=port,
                                             js=prefix / "js" / "rkllm_route.js", status_port=status_port)
    board_hosts = {b.name: {"ansible_host": b.address, "rkllm_server_port": b.port,
                            "rkllm_models_enabled": list(b.models)} for b in boards}
    inventory: dict[str, object] = {"all": {"children": {"rkllm_balancers": {"hosts": hosts},
                                                         "rkllm_boards": {"hosts": board_hosts}}}}
    return inventory, rendered


def render_balancer(prefix: Path, boards: Sequence[Board], **role_vars: object) -> RenderedBalancer:
    return render_balancers(prefix, boards, {"lb": role_vars})["lb"]


def local_host() -> dict[str, str]:
    """Host vars for an inventory host that Ansible runs on this machine."""
    return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}


def run_role_tasks(workdir: Path, inventory: dict[str, object], variables: dict[str, object], *,
                   role: str, tasks_from: str, hosts: str, playbook_args: Sequence[str] = (),
                   launcher: Sequence[str] = ()) -> str:
    """Run one tasks file of a repo role with ansible-playbook, as the roles run in production;
    returns what ansible-playbook printed. launcher prefixes the command (e.g. a throwaway network
    namespace for a role whose handlers change this machine's network)."""
    (workdir / "inventory.json").write_text(json.dumps(inventory))
    (workdir / "vars.json").write_text(json.dumps(variables))
    (workdir / "play.yml").write_text(_ROLE_PLAY.format(role=role, tasks_from=tasks_from, hosts=hosts))
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO_ROOT / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"), "ANSIBLE_RETRY_FILES_ENABLED": "0"}
    result = subprocess.run(
        [*launcher, str(ANSIBLE_PLAYBOOK), "-i", str(workdir / "inventory.json"),
         "-e", f"@{workdir / 'vars.json'}",
         *playbook_args, str(workdir / "play.yml")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{role}/{tasks_from} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def nginx_check(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nginx", "-t", "-c", str(conf)], capture_output=True, text=True, check=False)


def wait_until_http(url: str, deadline_s: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not answering after {deadline_s}s: {last}")


@contextmanager
def running_nginx(balancer: RenderedBalancer) -> Iterator[str]:
    """Start nginx in the foreground on the rendered config; yield its base URL."""
    proc = subprocess.Popen(
        ["nginx", "-c", str(balancer.conf), "-p", str(balancer.prefix), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{balancer.port}"
    try:
        wait_until_http(f"{base}/healthz", proc=proc)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def reload_nginx(balancer: RenderedBalancer, new_conf: Path) -> None:
    """Install `new_conf` as the running nginx's config and reload it (graceful: old workers finish)."""
    shutil.copyfile(new_conf, balancer.conf)
    subprocess.run(["nginx", "-c", str(balancer.conf), "-p", str(balancer.prefix), "-s", "reload"],
                   check=True, capture_output=True)


def access_log(balancer: RenderedBalancer) -> str:
    return (balancer.prefix / "log" / "access.log").read_text()


def access_log_size(balancer: RenderedBalancer) -> int:
    """Where the next request's line will start in access_log()."""
    path = balancer.prefix / "log" / "access.log"
    return len(path.read_text()) if path.exists() else 0


_UPSTREAMS = re.compile(r'ua="([^"]*)" us="([^"]*)"')


def logged_matches(balancer: RenderedBalancer, offset: int, count: int,
                   pattern: re.Pattern[str]) -> list[tuple[str, ...]]:
    """pattern's groups in the access log after `offset` (log characters), once it matched `count`
    times: nginx writes a request's line after its answer has gone out, so a client that has its
    answer may read the log before the line is there."""
    def logged() -> list[tuple[str, ...]]:
        found: list[tuple[str, ...]] = pattern.findall(access_log(balancer)[offset:])
        return found if len(found) >= count else []

    return wait_until(logged, f"nginx logged {count} requests")


def logged_upstreams(balancer: RenderedBalancer, offset: int, count: int) -> list[tuple[str, str]]:
    """(upstream addresses, upstream statuses) of the first `count` or more requests logged after
    `offset`."""
    return [(addresses, statuses)
            for addresses, statuses in logged_matches(balancer, offset, count, _UPSTREAMS)]


@dataclass(frozen=True)
class BoardModel:
    """A fake model served by a board: `reply_tokens` tokens at `tokens_per_second` (the double's pace)."""

    name: str
    tokens_per_second: float = 50.0
    reply_tokens: int = 100
    queue_size: int = 0
    prefill_ms_per_token: float = 0.0
    kv_slots: int | None = None  # the server's default when None
    kv_slot_keep_seconds: float | None = None  # the server's default when None


def _board_config(workdir: Path, library: Path, port: int, models: Sequence[BoardModel]) -> Path:
    lines = [f'library = "{library}"', 'host = "127.0.0.1"', f"port = {port}",
             f'drain_file = "{workdir / "drain"}"']
    for model in models:
        model_file = workdir / f"{model.name}.rkllm"
        model_file.write_text(
            "format = rkllm-double/1\n"
            f"name = {model.name}\ntoolkit_version = 1.2.3\ntarget_platform = rk3588\n"
            "max_context = 4096\nmemory_mb = 256\n"
            f"decode_tokens_per_second = {model.tokens_per_second}\n"
            f"prefill_ms_per_token = {model.prefill_ms_per_token}\n"
            f"reply_tokens = {model.reply_tokens}\n"
            "vocab = Hello|,| world| NPU| fleet| token| board| rock| chip\n"
        )
        lines += ["[[models]]", f'name = "{model.name}"', f'path = "{model_file}"',
                  f"queue_size = {model.queue_size}", "pinned = true"]
        if model.kv_slots is not None:
            lines.append(f"kv_slots = {model.kv_slots}")
        if model.kv_slot_keep_seconds is not None:
            lines.append(f"kv_slot_keep_seconds = {model.kv_slot_keep_seconds}")
    config = workdir / "server.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextmanager
def running_boards(workdir: Path, library: Path, boards: dict[str, Sequence[BoardModel]]
                   ) -> Iterator[dict[str, Board]]:
    """Start one real rkllm-server per board on loopback; yield the boards by name once all are ready."""
    server = Path(sys.executable).parent / "rkllm-server"
    procs: list[subprocess.Popen[bytes]] = []
    started: dict[str, Board] = {}
    try:
        for name, models in boards.items():
            board_dir = workdir / name
            board_dir.mkdir(parents=True, exist_ok=True)
            port = free_port()
            config = _board_config(board_dir, library, port, models)
            log = (board_dir / "server.log").open("wb")
            procs.append(subprocess.Popen([str(server), "--config", str(config), "--log-level", "warning"],
                                          stdout=log, stderr=subprocess.STDOUT))
            started[name] = Board(name=name, port=port, models=[m.name for m in models], pid=procs[-1].pid,
                                  drain_file=board_dir / "drain")
        for proc, board in zip(procs, started.values(), strict=True):
            wait_until_http(f"http://127.0.0.1:{board.port}/ready", deadline_s=30, proc=proc)
        yield started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A localhost certificate and its key (cert.pem, key.pem in directory), for the TLS variants."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
