"""Fleet simulator API and CLI: `python3 -m tests.fleet.sim up|down|status|...`.

Boards and the balancer are Debian 12 systemd-nspawn containers on overlayfs roots, each in its own
network namespace on one bridge; the host side of the bridge serves the artefact mirror.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import fixtures, kernels, mirror, native_nft, network, rootfs, vendor_image
from .commands import SimError, log, run
from .host import Host, HostSpec, raise_inotify_limits
from .inventory import Tree, write_inventory
from .teardown import teardown

REPO_ROOT = mirror.REPO_ROOT
DEFAULT_RUN_ROOT = Path("/var/tmp/rkllm-fleet")
BALANCER_ARCH = "amd64"
BALANCER_NAME = "balancer1"
PREFIX_MAX = 9
# balancer1 .5, balancer2 .6, ... up to .9; the boards start at .11.
BALANCER_HOST_NUMBER = 5
MAX_BALANCERS = 5
# The address keepalived moves between the balancers (only with two or more).
VIRTUAL_HOST_NUMBER = 3
CLIENT_HOST_NUMBER = 4
FIRST_BOARD_HOST_NUMBER = 10
# keepalived priorities: balancer1 is the preferred master, each next one a step below.
TOP_VRRP_PRIORITY = 150
VRRP_PRIORITY_STEP = 10


def default_prefix() -> str:
    """Derived from the checkout path, so two clones on one machine never share names."""
    override = os.environ.get("RKLLM_FLEET_PREFIX")
    if override:
        return override
    return "rf" + hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:4]


def run_dir_for(prefix: str) -> Path:
    return Path(os.environ.get("RKLLM_FLEET_RUN", str(DEFAULT_RUN_ROOT))) / prefix


def _check_prefix(prefix: str) -> None:
    if not (prefix.isascii() and prefix.isalnum() and prefix.islower() and 0 < len(prefix) <= PREFIX_MAX):
        raise SimError(f"prefix {prefix!r}: use 1-{PREFIX_MAX} lowercase letters/digits (interface names)")


@dataclass
class FleetState:
    """Everything needed to inspect or tear down a fleet from a fresh process."""

    prefix: str
    arch: str
    subnet: str
    balancers: int = 1
    login: str = vendor_image.KEY_LOGIN
    mirror_url: str = ""
    mirror_pid: int | None = None
    inventory: str = ""
    hosts: list[HostSpec] = field(default_factory=list)
    boot_seconds: dict[str, float] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        data = {**self.__dict__, "hosts": [h.to_dict() for h in self.hosts]}
        tmp = run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(run_dir / "state.json")

    @classmethod
    def load(cls, run_dir: Path) -> FleetState | None:
        path = run_dir / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["hosts"] = [HostSpec(**h) for h in data["hosts"]]
        return cls(**data)


class Fleet:
    """A running (or partly created) simulated fleet identified by its prefix."""

    def __init__(self, state: FleetState, run_dir: Path) -> None:
        self.state = state
        self.run_dir = run_dir
        self.ssh_key = run_dir / "id_ed25519"
        self.hosts = {spec.name: Host(spec, self.ssh_key) for spec in state.hosts}
        self.published: dict[str, mirror.PublishedFile] = {}

    @property
    def prefix(self) -> str:
        return self.state.prefix

    @property
    def client_netns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def client_address(self) -> str:
        return _host_address(self.state.subnet, CLIENT_HOST_NUMBER)

    @property
    def inventory_path(self) -> Path:
        return Path(self.state.inventory)

    @property
    def boards(self) -> list[Host]:
        return [h for name, h in self.hosts.items() if name.startswith("board")]

    @property
    def balancer(self) -> Host:
        """balancer1: the preferred VRRP master and the monitor host."""
        return self.hosts[BALANCER_NAME]

    @property
    def balancers(self) -> list[Host]:
        return [h for name, h in self.hosts.items() if name.startswith("balancer")]

    @property
    def virtual_address(self) -> str | None:
        """The address keepalived floats between the balancers; None with a single balancer."""
        return _host_address(self.state.subnet, VIRTUAL_HOST_NUMBER) if self.state.balancers > 1 else None

    def virtual_address_holders(self) -> list[str]:
        """Balancers whose eth0 carries the virtual address right now (one, unless VRRP is split)."""
        return [h.name for h in self.balancers if h.is_running() and f" {self.virtual_address}/" in
                h.exec(["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=False).stdout]

    @property
    def endpoint_address(self) -> str:
        """Where clients send requests: the virtual address, or the only balancer's own."""
        return self.virtual_address or self.balancer.address

    def board(self, name: str) -> Host:
        if name not in self.hosts:
            raise SimError(f"no host {name!r} in fleet {self.prefix}; have {', '.join(self.hosts)}")
        return self.hosts[name]

    @classmethod
    def attach(cls, prefix: str | None = None) -> Fleet:
        """The fleet that `up` started (possibly from another process)."""
        prefix = prefix or default_prefix()
        run_dir = run_dir_for(prefix)
        state = FleetState.load(run_dir)
        if state is None:
            raise SimError(f"no fleet {prefix} is up (no {run_dir / 'state.json'})")
        return cls(state, run_dir)

    @classmethod
    def up(cls, *, arch: str = "arm64", boards: int = 3, balancers: int = 1, prefix: str | None = None,
           inventory_dir: Path | None = None, board_driver: Sequence[str] = (),
           board_ram: Sequence[str] = (), mirror_sources: mirror.MirrorSources | None = None,
           login: str = vendor_image.KEY_LOGIN) -> Fleet:
        """Build/reuse images, create the network, boot all hosts in parallel, write the inventory.

        login: KEY_LOGIN (root with the fleet's key) or PASSWORD_LOGIN (every host boots like a fresh
        vendor image, vendor_image.py). On any failure everything created so far is torn down before the
        error propagates.
        """
        prefix = prefix or default_prefix()
        _check_prefix(prefix)
        if not 1 <= boards <= 99:
            raise SimError("--boards must be between 1 and 99")
        if not 1 <= balancers <= MAX_BALANCERS:
            raise SimError(f"--balancers must be between 1 and {MAX_BALANCERS}")
        if login not in vendor_image.LOGINS:
            raise SimError(f"--login must be one of {', '.join(vendor_image.LOGINS)}")
        hardware = fixtures.board_hardware(boards, fixtures.parse_overrides(list(board_driver), boards),
                                           fixtures.parse_overrides(list(board_ram), boards))
        sources = mirror_sources or mirror.MirrorSources.from_repo(arch)
        run_dir = run_dir_for(prefix)
        if run_dir.exists() or network.namespaces_with_prefix(prefix) or network.links_with_prefix(prefix):
            raise SimError(f"fleet {prefix} already exists: run `python3 -m tests.fleet.sim down` first")
        run_dir.mkdir(parents=True)
        subnet = network.choose_subnet(prefix)
        state = FleetState(prefix=prefix, arch=arch, subnet=str(subnet), balancers=balancers, login=login)
        fleet = cls(state, run_dir)
        fleet.state.save(run_dir)
        try:
            fleet._create(boards, hardware, sources, inventory_dir or REPO_ROOT / "inventory/sim")
        except BaseException:
            log(f"up failed; tearing down {prefix}")
            fleet.down()
            raise
        return fleet

    def _create(self, boards: int, hardware: dict[int, fixtures.BoardHardware],
                sources: mirror.MirrorSources, inventory_dir: Path) -> None:
        start = time.monotonic()
        board_image = rootfs.layered_image(self.state.arch, "board")
        balancer_image = rootfs.layered_image(BALANCER_ARCH, "balancer")
        log(f"images ready in {time.monotonic() - start:.1f}s")
        bridge = network.bridge_name(self.prefix)
        network.create_bridge(bridge, _host_interface(self.state.subnet, 1))
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fleet-sim-{self.prefix}",
             "-f", str(self.ssh_key)])
        self._start_mirror(sources)
        specs = [self._spec(f"board{i}", f"b{i}", FIRST_BOARD_HOST_NUMBER + i, board_image)
                 for i in range(1, boards + 1)]
        specs += [self._spec(f"balancer{i}", "lb" if i == 1 else f"lb{i}", BALANCER_HOST_NUMBER + i - 1,
                             balancer_image) for i in range(1, self.state.balancers + 1)]
        self.state.hosts = specs
        self.state.save(self.run_dir)
        self.hosts = {spec.name: Host(spec, self.ssh_key) for spec in specs}
        network.attach_namespace(self.client_netns, f"{self.prefix}-cl", bridge,
                                 _host_interface(self.state.subnet, CLIENT_HOST_NUMBER))
        for index, host in enumerate(self.boards, start=1):
            self._prepare(host, hardware[index].files(), hardware[index].symlinks())
        for balancer in self.balancers:
            self._prepare(balancer, {}, {})
        self.state.boot_seconds = self._boot(list(self.hosts.values()))
        self.state.inventory = str(self._write_inventory(inventory_dir))
        self.state.save(self.run_dir)

    def _spec(self, name: str, short: str, host_number: int, image: rootfs.Image) -> HostSpec:
        netns = f"{self.prefix}-{short}"
        network.attach_namespace(netns, netns, network.bridge_name(self.prefix),
                                 _host_interface(self.state.subnet, host_number))
        return HostSpec(name=name, machine=f"{self.prefix}-{name}", netns=netns,
                        address=_host_address(self.state.subnet, host_number), arch=image.arch,
                        lowerdirs=[str(p) for p in image.lowerdirs], directory=str(self.run_dir / name),
                        login=self.state.login)

    def _start_mirror(self, sources: mirror.MirrorSources) -> None:
        root = self.run_dir / "mirror"
        self.published = mirror.publish(sources, root, self.state.arch)
        address = _host_address(self.state.subnet, 1)
        pid, port = mirror.start_server(root, address, self.run_dir / "mirror.log")
        self.state.mirror_pid = pid
        self.state.mirror_url = f"http://{address}:{port}/"
        self.state.save(self.run_dir)

    def _prepare(self, host: Host, fixture_files: dict[str, str], fixture_links: dict[str, str]) -> None:
        host.mount()
        if host.spec.login == vendor_image.PASSWORD_LOGIN:
            vendor_image.install_vendor_login(host.spec.root)
        else:
            public_key = self.ssh_key.with_suffix(".pub").read_text()
            host.write_file("/root/.ssh/authorized_keys", public_key, 0o600)
            (host.spec.root / "root/.ssh").chmod(0o700)
        host.write_file("/etc/hostname", f"{host.name}\n")
        names = "".join(f"{spec.address}\t{spec.name}\n" for spec in self.state.hosts)
        host.write_file("/etc/hosts", f"127.0.0.1\tlocalhost\n::1\tlocalhost\n{names}")
        for path, content in fixture_files.items():
            host.write_file(path, content)
        for path, target in fixture_links.items():
            host.symlink(path, target)
        if host.spec.arch == "arm64":
            native_nft.install(host.spec.root)

    def _boot(self, hosts: list[Host]) -> dict[str, float]:
        """Start all containers at once and wait for each; return per-host boot seconds."""
        raise_inotify_limits()
        for host in hosts:
            host.start()
        with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
            seconds = dict(zip([h.name for h in hosts], pool.map(Host.wait_ready, hosts), strict=True))
        for name, value in seconds.items():
            log(f"{name} ready in {value:.1f}s")
        return seconds

    def _write_inventory(self, directory: Path) -> Path:
        url = self.state.mirror_url
        lib, header = self.published["library"], self.published["header"]
        models: dict[str, Tree] = {
            key.removeprefix("model:"): {"url": url + item.path, "sha256": item.sha256}
            for key, item in self.published.items() if key.startswith("model:")}
        kernel_packages: dict[str, Tree] = {
            key.removeprefix("kernel:"): {"url": url + item.path, "sha256": item.sha256}
            for key, item in self.published.items() if key.startswith("kernel:")}
        board_vars: dict[str, Tree] = {
            "rknpu_driver_debugfs_dir": fixtures.DEBUGFS_DIR,
            "rknpu_driver_devicetree_compatible_path": fixtures.COMPATIBLE_PATH,
            "rknpu_driver_require_aarch64": self.state.arch == "arm64",
            "rknpu_driver_kernel_release_path": kernels.KERNEL_RELEASE_PATH,
            "rknpu_driver_rocket_module_path": kernels.ROCKET_MODULE_PATH,
            "rkllm_models_meminfo_path": fixtures.MEMINFO_PATH,
        }
        tree: dict[str, Tree] = {"all": {
            "vars": {
                **self._login_vars(),
                "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
                # Every boot makes new host keys. Mitogen checks them itself unless told not to.
                "ansible_host_key_checking": False,
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_pipelining": True,
                "fleet_sim_prefix": self.prefix,
                "fleet_sim_board_arch": self.state.arch,
                "fleet_sim_mirror_url": url,
                "rkllm_lib_url": url + lib.path,
                "rkllm_lib_sha256": lib.sha256,
                "rkllm_lib_header_url": url + header.path,
                "rkllm_lib_header_sha256": header.sha256,
                "rkllm_models_catalog_overrides": models,
                "fleet_sim_kernel_packages": kernel_packages,
                # The simulated balancers have no certificate: clients use plain HTTP, keys included.
                "nginx_lb_allow_plaintext_api_keys": True,
            },
            "children": {
                "rkllm_boards": {"hosts": {h.name: {"ansible_host": h.address} for h in self.boards},
                                 "vars": board_vars},
                "rkllm_balancers": self._balancer_group(),
                # The balancer doubles as the monitor host: its image holds Prometheus.
                "rkllm_monitor": {"hosts": {BALANCER_NAME: {}}},
            },
        }}
        return write_inventory(directory, tree)

    def _login_vars(self) -> dict[str, Tree]:
        if self.state.login == vendor_image.PASSWORD_LOGIN:
            password = vendor_image.VENDOR_PASSWORD
            return {"ansible_user": vendor_image.VENDOR_USER, "ansible_password": password,
                    "ansible_become_password": password}
        return {"ansible_user": "root", "ansible_ssh_private_key_file": str(self.ssh_key)}

    def _balancer_group(self) -> dict[str, Tree]:
        if not self.virtual_address:
            return {"hosts": {h.name: {"ansible_host": h.address} for h in self.balancers}}
        hosts: dict[str, Tree] = {
            h.name: {"ansible_host": h.address,
                     "balancer_vip_priority": TOP_VRRP_PRIORITY - i * VRRP_PRIORITY_STEP}
            for i, h in enumerate(self.balancers)}
        return {"hosts": hosts,
                "vars": {"balancer_vip_address": self.virtual_address, "balancer_vip_interface": "eth0"}}

    def down(self) -> None:
        """Stop and delete everything of this prefix; safe on partial fleets and to repeat."""
        mirror_pid = self.state.mirror_pid
        teardown(self.prefix, self.run_dir, list(self.hosts.values()), mirror_pid)
        if self.state.inventory:
            Path(self.state.inventory).unlink(missing_ok=True)

    def restart(self, name: str) -> float:
        """Reboot one host on the same overlay (installed files persist); return boot seconds."""
        host = self.board(name)
        host.stop()
        return self.start(name)

    def start(self, name: str) -> float:
        host = self.board(name)
        raise_inotify_limits()
        host.start()
        return host.wait_ready()

    def stop(self, name: str) -> None:
        self.board(name).stop()

    def client_exec(self, command: Sequence[str], *, check: bool = True,
                    timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a host command inside the client network namespace (e.g. curl to the balancer)."""
        return run(["ip", "netns", "exec", self.client_netns, *command], check=check, timeout=timeout)

    def status_lines(self) -> list[str]:
        lines = [f"fleet {self.prefix}: subnet {self.state.subnet}, board arch {self.state.arch}, "
                 f"mirror {self.state.mirror_url or '-'}, inventory {self.state.inventory or '-'}"]
        lines += [host.describe() for host in self.hosts.values()]
        if self.virtual_address:
            names = ", ".join(h.name for h in self.balancers)
            lines.append(f"vip        {self.virtual_address:<15} keepalived on {names}")
        lines.append(f"client     {self.client_address:<15} netns: ip netns exec {self.client_netns} <cmd>")
        return lines


def _host_address(subnet: str, number: int) -> str:
    return str(ipaddress.IPv4Network(subnet)[number])


def _host_interface(subnet: str, number: int) -> ipaddress.IPv4Interface:
    network_ = ipaddress.IPv4Network(subnet)
    return ipaddress.IPv4Interface(f"{network_[number]}/{network_.prefixlen}")


def down(prefix: str | None = None) -> None:
    """Tear down prefix's fleet, using the state file when present and discovery otherwise."""
    prefix = prefix or default_prefix()
    run_dir = run_dir_for(prefix)
    state = FleetState.load(run_dir) or FleetState(prefix=prefix, arch="", subnet="")
    Fleet(state, run_dir).down()


def _parser() -> argparse.ArgumentParser:
    # --prefix is accepted before or after the subcommand (`--prefix X up` and `up --prefix X`).
    prefix_option = argparse.ArgumentParser(add_help=False)
    prefix_option.add_argument("--prefix", default=argparse.SUPPRESS,
                               help="name prefix (default derived from the checkout path)")
    parser = argparse.ArgumentParser(prog="python3 -m tests.fleet.sim", description=__doc__,
                                     parents=[prefix_option])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, parents=[prefix_option])

    up_cmd = command("up", "build/reuse rootfs, boot the fleet, write the inventory")
    up_cmd.add_argument("--arch", choices=rootfs.ARCHES, default="arm64")
    up_cmd.add_argument("--boards", type=int, default=3)
    up_cmd.add_argument("--balancers", type=int, default=2,
                        help="balancers behind one virtual address (1: a single balancer, no keepalived)")
    up_cmd.add_argument("--inventory", type=Path, help="inventory dir (default inventory/sim)")
    up_cmd.add_argument("--board-driver", action="append", default=[], metavar="bN=VERSION")
    up_cmd.add_argument("--board-ram", action="append", default=[], metavar="bN=MIB")
    up_cmd.add_argument("--login", choices=vendor_image.LOGINS, default=vendor_image.KEY_LOGIN,
                        help="password: every host boots like a fresh vendor image (its default user by "
                             "password only, no root login), for ansible/bootstrap.yml")
    command("down", "remove everything of this prefix")
    command("status", "list hosts, addresses, state")
    for verb in ("restart-board", "stop-board", "start-board"):
        command(verb, f"{verb.split('-')[0]} one host (board1.., balancer1..)").add_argument("name")
    build = command("build", "only build (or reuse) the rootfs images")
    build.add_argument("--arch", choices=rootfs.ARCHES, default="arm64")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prefix: str | None = getattr(args, "prefix", None)
    try:
        if args.command == "up":
            start = time.monotonic()
            fleet = Fleet.up(arch=args.arch, boards=args.boards, balancers=args.balancers, prefix=prefix,
                             inventory_dir=args.inventory, board_driver=args.board_driver,
                             board_ram=args.board_ram, login=args.login)
            print("\n".join(fleet.status_lines()))
            print(f"fleet up in {time.monotonic() - start:.1f}s")
        elif args.command == "down":
            down(prefix)
        elif args.command == "build":
            rootfs.layered_image(args.arch, "board")
            rootfs.layered_image(BALANCER_ARCH, "balancer")
        else:
            fleet = Fleet.attach(prefix)
            if args.command == "status":
                print("\n".join(fleet.status_lines()))
            elif args.command == "restart-board":
                print(f"{args.name} rebooted in {fleet.restart(args.name):.1f}s")
            elif args.command == "stop-board":
                fleet.stop(args.name)
            else:
                print(f"{args.name} booted in {fleet.start(args.name):.1f}s")
    except (SimError, AssertionError) as error:  # AssertionError: a wait_until deadline passed
        print(f"fleet: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
