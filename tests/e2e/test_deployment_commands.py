"""docs/DEPLOYMENT.md, run: every shell block the simulator can run, in document order, against one
amd64 fleet (4 boards and a balancer), as an operator would type them. Its hosts boot like fresh vendor
images (only the default user's password logs in, tests/fleet/vendor_image.py), so the guide's
bootstrap is what lets every later command in.

The doc's convention (parsed by tests/component/deployment_doc.py, stated in a comment at the doc's top):
a ```sh block runs on the controller from the repository root, one command per line, all blocks as one
shell session (variables and exports carry over); a first line `# on a board ...` runs it as root on
the first board, `# on a client ...` in the client network namespace (with the session's variables,
e.g. the API key the operator handed out); `# not on the simulator: <reason>` skips it. A trailing
`# prints: TEXT` asserts the output contains TEXT, `# fails: TEXT` that the command fails saying
TEXT; every other command must exit 0.

What maps the doc onto the simulator, all of it here:
- OperatorSession.substitutions(): the doc's placeholder hosts, networks and paths -> the fleet's
  (in commands and in the YAML snippets the test writes). The session's HOME is a temporary directory,
  so the vault password file and the Ansible caches of `~` are private; `$EDITOR` (for
  `ansible-vault edit`) only checks that it was given the decrypted file.
- The inventory is made the way section 4 says: the doc's `cp -r` of the example, then hosts.yml from
  the doc's snippet (the simulated balancer doubles as the monitor host, which section 13 allows), and
  in place of the checksums, artefact URLs and hardware paths an operator fills in, the values of the
  simulator's own inventory and SIMULATED_HARDWARE (group_vars/*/simulator.yml). Not its login: the
  hosts are reached as the doc's `ops` with the operator's key, checking host keys against the
  operator's known_hosts. ssh finds `~/.ssh` through the passwd entry, not $HOME, so the session's
  key and known_hosts (in its temporary HOME) are named explicitly (SESSION_SSH).
- YAML snippets applied when the test reaches them: hosts.yml and those setting APPLIED_SETTINGS
  (firewall networks, API keys). The others only show placeholders the simulator's values replace,
  or settings for hardware the simulator lacks (TLS stays off: clients use plain HTTP).
- Steps the prose asks of the operator between commands: OPERATOR_STEPS.
Sections 3 and 14 boot their own small fleets (prefixes in that table); teardown removes all three.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from component.deployment_doc import REPO_ROOT, Block, Command, Place, ShellBlock, blocks, shell_blocks
from e2e.fleets import fleet_prefix
from fleet.sim import Fleet, down
from fleet.vendor_image import PASSWORD_LOGIN, VENDOR_USER

# Each block is one test; the longest runs site.yml or a rolling update (~1 min on amd64 boards).
pytestmark = [pytest.mark.fleet, pytest.mark.timeout(600)]

SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APPLIED_SETTINGS = ("fleet_firewall_admin_networks", "nginx_lb_api_keys", "fleet_bootstrap_authorized_keys")
# How the simulator's own inventory logs in (the vendor image's password): the operator's inventory
# logs in its own way.
SIMULATOR_LOGIN = ("ansible_user", "ansible_password", "ansible_become_password",
                   "ansible_ssh_private_key_file", "ansible_ssh_common_args")
NEW_BOARD = "rock5b-04"
# Board settings of the example inventory that the simulated boards cannot honour: they have no clocks
# to pin, and their doubles decode flat out so the guide's benchmark (3 repeats of 64 tokens per
# board and model) takes seconds.
SIMULATED_HARDWARE = {"rknpu_driver_pin_frequencies": False,
                      "rkllm_server_environment": {"RKLLM_DOUBLE_TPS": "0"}}
OUTPUT_TAIL = 6000
# `ansible-vault edit` runs $EDITOR on the decrypted file: a non-interactive stand-in that fails
# unless it sees the plain text.
EDITOR = "grep -q vault_model_repository_token"


@dataclass(frozen=True)
class Timing:
    line: int
    place: Place
    seconds: float
    command: str


@dataclass
class OperatorSession:
    """The operator's controller shell, the fleet and the inventory they build, over the whole doc."""

    fleet: Fleet
    workdir: Path
    timings: list[Timing] = field(default_factory=list)
    done_blocks: set[int] = field(default_factory=set)

    @property
    def production(self) -> Path:
        return self.workdir / "production"

    @property
    def state_file(self) -> Path:
        return self.workdir / "session.sh"

    @property
    def controller_address(self) -> str:
        return self.fleet.client_address.rsplit(".", 1)[0] + ".1"

    def substitutions(self) -> dict[str, str]:
        """Placeholder of the doc -> the simulated fleet's value."""
        boards = self.fleet.boards
        sim_vars = self.simulator_inventory()["all"]["children"]["rkllm_boards"]["vars"]
        return {
            "inventory/production": str(self.production),
            "inventory/sim": str(self.workdir / "sim"),
            "rfdoc": fleet_prefix("dr"),  # section 3's rehearsal fleet
            "rfold": fleet_prefix("do"),  # section 14's old-driver fleet
            "192.168.50.11": boards[0].address,
            "192.168.50.12": boards[1].address,
            "192.168.50.13": boards[2].address,
            "192.168.50.2": self.fleet.balancer.address,
            "api.example.com": self.fleet.balancer.address,  # the client has no DNS
            "10.20.0.0/24": self.fleet.state.subnet,  # admin network, with the controller inside
            "10.30.0.0/16": self.fleet.state.subnet,  # client networks
            "10.20.0.10": self.controller_address,
            "files/tls/": str(self.workdir / "tls") + "/",
            "/tmp/bench": str(self.workdir / "bench"),
            "/sys/kernel/debug/rknpu": sim_vars["rknpu_driver_debugfs_dir"],
        }

    def substitute(self, text: str) -> str:
        for placeholder, value in self.substitutions().items():
            # Whole tokens only: inventory/production.example and api.example.com.key stay as they are.
            end = "" if placeholder.endswith("/") else r"(?![\w.])"
            text = re.sub(rf"(?<![\w.]){re.escape(placeholder)}{end}", value, text)
        return text

    def simulator_inventory(self) -> dict:
        return yaml.safe_load(self.fleet.inventory_path.read_text())

    # -- the inventory, as section 4 tells the operator to write it ---------------------------------

    def write_hosts(self, snippet: str) -> None:
        tree = yaml.safe_load(self.substitute(snippet))
        children = tree["all"]["children"]
        children["rkllm_monitor"]["hosts"] = {name: None for name in children["rkllm_balancers"]["hosts"]}
        (self.production / "hosts.yml").write_text(yaml.safe_dump(tree, sort_keys=False))
        self.write_simulator_settings()

    def write_simulator_settings(self) -> None:
        """The simulator's connection, artefact and hardware settings, where the operator puts theirs.
        Files in a group_vars directory load in name order, so simulator.yml overrides main.yml."""
        sim = self.simulator_inventory()["all"]
        all_vars = {name: value for name, value in sim["vars"].items() if name not in SIMULATOR_LOGIN}
        all_vars.update(self.session_ssh())
        board_vars = {**all_vars, **sim["children"]["rkllm_boards"]["vars"], **SIMULATED_HARDWARE}
        for group, values in (("all", all_vars), ("rkllm_boards", board_vars)):
            target = self.production / "group_vars" / group / "simulator.yml"
            target.write_text(yaml.safe_dump(values, sort_keys=False))

    def session_ssh(self) -> dict[str, str]:
        ssh = self.home / ".ssh"
        return {"ansible_ssh_private_key_file": str(ssh / "id_ed25519"),
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={ssh / 'known_hosts'}"}

    def apply_settings(self, block: Block) -> None:
        """Merge a group_vars snippet into the file its first line names."""
        relative = block.header.lstrip("# ").split()[0]
        target = self.production / relative
        current = yaml.safe_load(target.read_text()) if target.exists() else None
        merged = {**(current or {}), **yaml.safe_load(self.substitute(block.text))}
        target.write_text(yaml.safe_dump(merged, sort_keys=False))

    def add_new_board(self) -> None:
        hosts = self.production / "hosts.yml"
        tree = yaml.safe_load(hosts.read_text())
        board = self.fleet.boards[3]
        tree["all"]["children"]["rkllm_boards"]["hosts"][NEW_BOARD] = {"ansible_host": board.address}
        hosts.write_text(yaml.safe_dump(tree, sort_keys=False))

    def make_tls_files(self) -> None:
        """The operator brings a certificate and key; a self-signed pair stands in."""
        tls = self.workdir / "tls"
        tls.mkdir(exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=api.example.com", "-keyout", str(tls / "api.example.com.key"),
                        "-out", str(tls / "api.example.com.crt")], check=True, capture_output=True)

    def advance_to(self, target: Block) -> None:
        """Apply the YAML snippets between the blocks already run and target, in document order."""
        for block in blocks():
            if block.line >= target.line:
                return
            if block.line in self.done_blocks or block.language != "yaml":
                continue
            self.done_blocks.add(block.line)
            if block.top_level_keys == {"all"}:
                self.write_hosts(block.text)
            elif block.top_level_keys & set(APPLIED_SETTINGS):
                self.apply_settings(block)

    # -- running commands ---------------------------------------------------------------------------

    def session_script(self, command: str, *, keep_state: bool) -> str:
        """The command in a shell that starts from, and (on the controller) saves, the session's state."""
        save = ""
        if keep_state:
            # Exports, plus the shell variables the doc's commands set (names not in a fresh shell).
            save = (f'{{ export -p; for __name in $(compgen -v); do case " $__fresh " in '
                    f'*" $__name "*|__*|_|BASH*|PIPESTATUS|FUNCNAME) ;; '
                    f'*) declare -p "$__name" 2>/dev/null;; esac; done; }} > {self.state_file}.new; '
                    f'mv {self.state_file}.new {self.state_file}; ')
        return (f'__fresh=" $(compgen -v | tr "\\n" " ") "; '
                f'[ -f {self.state_file} ] && . {self.state_file}; set -o pipefail\n'
                f'{command}\n__status=$?; {save}exit $__status\n')

    def run(self, place: Place, command: str) -> subprocess.CompletedProcess[str]:
        if place is Place.BOARD:
            return self.fleet.boards[0].exec(command, check=False, timeout=600)
        script = self.session_script(command, keep_state=place is Place.CONTROLLER)
        wrapper = ["ip", "netns", "exec", self.fleet.client_netns] if place is Place.CLIENT else []
        return subprocess.run([*wrapper, "bash", "-c", script], cwd=REPO_ROOT, env=self.initial_env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
                              check=False)

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    def initial_env(self) -> dict[str, str]:
        self.home.mkdir(exist_ok=True)
        return {"PATH": SESSION_PATH, "HOME": str(self.home), "LANG": "C.UTF-8", "EDITOR": EDITOR}

    def run_command(self, place: Place, command: Command) -> None:
        for step_marker, step in OPERATOR_STEPS.items():
            if step_marker in command.text:
                step(self)
        text = self.substitute(command.text)
        started = time.monotonic()
        result = self.run(place, text)
        seconds = time.monotonic() - started
        self.timings.append(Timing(command.line, place, seconds, command.text))
        print(f"  {seconds:6.1f} s  line {command.line} ({place.value}): {command.text[:100]}")
        output = result.stdout + result.stderr
        where = f"docs/DEPLOYMENT.md line {command.line} on the {place.value}: {text}"
        tail = output[-OUTPUT_TAIL:]
        if command.fails is not None:
            assert result.returncode != 0, f"expected to fail: {where}\n{tail}"
            assert command.fails in output, f"expected {command.fails!r} in the output of {where}\n{tail}"
            return
        assert result.returncode == 0, f"exit {result.returncode}: {where}\n{tail}"
        if command.prints is not None:
            assert command.prints in output, f"expected {command.prints!r} in the output of {where}\n{tail}"


# Steps the doc's prose asks of the operator, run before the command containing the key.
OPERATOR_STEPS: dict[str, Callable[[OperatorSession], None]] = {
    # Section 10, step 2: "Add it to hosts.yml under rkllm_boards", before its bootstrap.
    f"bootstrap.yml --limit {NEW_BOARD}": OperatorSession.add_new_board,
    # Section 8: "Put the certificate chain and key on each balancer" starts from the operator's files.
    "ansible-vault encrypt files/tls/": OperatorSession.make_tls_files,
}

RUNNABLE = [block for block in shell_blocks() if block.runnable]


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorSession]:
    workdir = tmp_path_factory.mktemp("deployment")
    started = time.monotonic()
    fleet = Fleet.up(arch="amd64", boards=4, prefix=fleet_prefix("dd"), inventory_dir=workdir / "fleet",
                     login=PASSWORD_LOGIN)
    operator = OperatorSession(fleet, workdir)
    print(f"\nfleet up in {time.monotonic() - started:.1f} s")
    try:
        yield operator
    finally:
        for prefix in (fleet_prefix("dr"), fleet_prefix("do")):
            down(prefix)
        fleet.down()
        total = sum(t.seconds for t in operator.timings)
        slowest = sorted(operator.timings, key=lambda t: t.seconds, reverse=True)[:8]
        print(f"\n{len(operator.timings)} commands of docs/DEPLOYMENT.md in {total:.1f} s; slowest:")
        for timing in slowest:
            print(f"  {timing.seconds:6.1f} s  line {timing.line}: {timing.command[:100]}")


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"line{b.block.line}-{b.place.value}" for b in RUNNABLE])
def test_deployment_guide_block_runs(session: OperatorSession, block: ShellBlock) -> None:
    session.advance_to(block.block)
    for command in block.commands:
        session.run_command(block.place, command)


def test_bootstrap_again_logs_in_with_the_key_and_changes_nothing(session: OperatorSession) -> None:
    """After the guide: every host of the operator's inventory refuses the image's password, and a
    second bootstrap (which can then only log in as ops with the key) succeeds on each without a change."""
    inventory = session.run(Place.CONTROLLER, f"ansible-inventory -i {session.production} --list")
    assert inventory.returncode == 0, inventory.stderr
    hosts = json.loads(inventory.stdout)["_meta"]["hostvars"]
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
           *session.session_ssh()["ansible_ssh_common_args"].split()]
    for name, host_vars in hosts.items():
        # sshd lists the methods it still offers: no password, no keyboard-interactive.
        refused = subprocess.run([*ssh, "-o", "PreferredAuthentications=password,keyboard-interactive",
                                  f"{VENDOR_USER}@{host_vars['ansible_host']}", "true"],
                                 capture_output=True, text=True, timeout=30, check=False)
        assert refused.returncode != 0 and "Permission denied (publickey)." in refused.stderr, \
            (name, refused.stderr)
    rerun = session.run(Place.CONTROLLER, f"ansible-playbook -i {session.production} ansible/bootstrap.yml")
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-OUTPUT_TAIL:]
    recap = dict(re.findall(r"^(\S+)\s+:\s+ok=\d+\s+(changed=\d+)", output, re.MULTILINE))
    assert len(recap) == len(hosts) and set(recap.values()) == {"changed=0"}, output[-OUTPUT_TAIL:]
