"""End-to-end checks of the fleet simulator on amd64 boards (cached rootfs; ~15 s warm)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support import wait_until

from .commands import SimError
from .faults import power_off, set_link
from .mirror import MirrorSources
from .network import links_with_prefix, namespaces_with_prefix
from .sim import Fleet, run_dir_for

pytestmark = pytest.mark.fleet

LIBRARY_BYTES = b"\x7fELF stand-in library for the mirror test\n"


def _sources(directory: Path) -> MirrorSources:
    """Mirror inputs made here: these tests are about serving and hashing, not the double itself."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "librkllmrt.so").write_bytes(LIBRARY_BYTES)
    (directory / "rkllm.h").write_text("/* header */\n")
    (directory / "tiny.rkllm").write_text("format = rkllm-double/1\nname = Tiny-Test-Model  # comment\n")
    return MirrorSources(directory / "librkllmrt.so", directory / "rkllm.h", (directory / "tiny.rkllm",))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    prefix = f"rt{os.getpid() % 0x10000:04x}"
    base = tmp_path_factory.mktemp("fleet")
    started = Fleet.up(arch="amd64", boards=2, balancers=2, prefix=prefix, inventory_dir=base / "inventory",
                       board_driver=["b2=0.9.6"], board_ram=["board2=8192"],
                       mirror_sources=_sources(base / "artefacts"))
    try:
        yield started
    finally:
        started.down()


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def test_ansible_reaches_every_host_over_ssh(fleet: Fleet) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    result = subprocess.run([str(ansible), "-i", str(fleet.inventory_path.parent), "all",
                             "-m", "ansible.builtin.ping", "-o"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("board1", "board2", "balancer1", "balancer2"):
        assert f'{name} | SUCCESS => {{"changed": false,"ping": "pong"}}' in result.stdout.replace(
            ", ", ",").replace("  ", " ")


def test_every_host_boots_without_failed_units(fleet: Fleet) -> None:
    for host in fleet.hosts.values():
        failed = host.exec(["systemctl", "--failed", "--no-legend", "--plain"]).stdout
        assert failed == "", f"{host.name}: {failed}"
        assert host.exec(["systemctl", "is-system-running"]).stdout == "running\n"


def _systemd_cgroups(pid: int) -> dict[str, str]:
    """pid's cgroup in each hierarchy systemd tracks processes in: v2 ("0::") and name=systemd."""
    entries = (line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    return {controllers or "v2": path for _, controllers, path in entries
            if controllers in ("", "name=systemd")}


def test_every_host_boots_in_cgroups_of_its_own(fleet: Fleet) -> None:
    # Containers sharing a cgroup remove each other's unit cgroups while booting: a unit of one host
    # then fails with 219/CGROUP (seen as systemd-tmpfiles-setup.service failing on a fresh machine).
    for host in fleet.hosts.values():
        pid1 = host.pid1()
        assert pid1 is not None, host.name
        cgroups = _systemd_cgroups(pid1)
        assert cgroups, f"{host.name}: no systemd hierarchy in /proc/{pid1}/cgroup"
        for hierarchy, path in cgroups.items():
            assert f"/{host.spec.machine}/payload/" in path, f"{host.name} {hierarchy}: {path}"


def test_inventory_points_roles_at_fixtures_and_mirror(fleet: Fleet) -> None:
    inventory = yaml.safe_load(fleet.inventory_path.read_text())["all"]
    boards = inventory["children"]["rkllm_boards"]
    assert set(boards["hosts"]) == {"board1", "board2"}
    assert boards["vars"]["rknpu_driver_require_aarch64"] is False
    assert boards["vars"]["rknpu_driver_debugfs_dir"] == "/srv/fixtures/rknpu"
    balancers = inventory["children"]["rkllm_balancers"]
    assert balancers["hosts"] == {
        "balancer1": {"ansible_host": fleet.balancer.address, "balancer_vip_priority": 150},
        "balancer2": {"ansible_host": fleet.board("balancer2").address, "balancer_vip_priority": 140}}
    assert fleet.board("balancer2").address.endswith(".6")
    # The virtual address sits on the bridge subnet, outside every host's own address.
    assert balancers["vars"] == {"balancer_vip_address": fleet.virtual_address,
                                 "balancer_vip_interface": "eth0"}
    assert fleet.endpoint_address == fleet.virtual_address
    assert fleet.virtual_address and fleet.virtual_address.endswith(".3")
    assert set(inventory["children"]["rkllm_monitor"]["hosts"]) == {"balancer1"}
    variables = inventory["vars"]
    assert variables["rkllm_lib_sha256"] == hashlib.sha256(LIBRARY_BYTES).hexdigest()
    assert variables["rkllm_lib_url"].startswith(variables["fleet_sim_mirror_url"])
    assert variables["rkllm_lib_url"].endswith("/librkllm_api/aarch64/librkllmrt.so")
    assert set(variables["rkllm_models_catalog_overrides"]) == {"Tiny-Test-Model"}


def test_monitoring_packages_are_preinstalled_and_left_off(fleet: Fleet) -> None:
    installed = {"board1": ["prometheus-node-exporter"],
                 "balancer1": ["prometheus-node-exporter", "prometheus-nginx-exporter", "prometheus"],
                 "balancer2": ["prometheus-node-exporter", "prometheus-nginx-exporter", "prometheus"]}
    for name, packages in installed.items():
        host = fleet.board(name)
        status = host.exec(["dpkg-query", "-W", "-f=${Status}\n", *packages]).stdout
        assert status == "install ok installed\n" * len(packages), f"{name}: {status}"
        enabled = host.exec(["systemctl", "is-enabled", *packages], check=False).stdout
        assert enabled == "disabled\n" * len(packages), f"{name}: {enabled}"
    assert fleet.balancer.exec(["promtool", "--version"]).returncode == 0
    # keepalived is installed for the balancer_vip role; with no configuration yet it does not run.
    for balancer in fleet.balancers:
        assert balancer.exec(["keepalived", "--version"]).returncode == 0
        assert balancer.exec(["systemctl", "is-active", "keepalived"], check=False).stdout != "active\n"


def test_board_fixtures_follow_overrides(fleet: Fleet) -> None:
    board1, board2 = fleet.board("board1"), fleet.board("board2")
    assert board1.exec(["cat", "/srv/fixtures/rknpu/version"]).stdout == "RKNPU driver: v0.9.8\n"
    assert board2.exec(["cat", "/srv/fixtures/rknpu/version"]).stdout == "RKNPU driver: v0.9.6\n"
    assert "Core2:  0%" in board1.exec(["cat", "/srv/fixtures/rknpu/load"]).stdout
    compatible = board1.exec(["cat", "/srv/fixtures/device-tree/compatible"]).stdout
    assert compatible.split("\0") == ["radxa,rock-5b", "rockchip,rk3588", ""]
    assert "MemTotal:       16777216 kB" in board1.exec(["cat", "/srv/fixtures/meminfo"]).stdout
    assert "MemTotal:        8388608 kB" in board2.exec(["cat", "/srv/fixtures/meminfo"]).stdout
    assert board2.exec(["hostname"]).stdout.strip() == "board2"


def test_hosts_reach_each_other_and_the_mirror(fleet: Fleet) -> None:
    board1, board2 = fleet.board("board1"), fleet.board("board2")
    assert board1.exec(["ping", "-c1", "-W2", "board2"], check=False).returncode == 0
    url = yaml.safe_load(fleet.inventory_path.read_text())["all"]["vars"]["rkllm_lib_url"]
    fetched = board2.exec(["curl", "-fsS", "-m5", url + ".sha256"]).stdout
    assert fetched == f"{hashlib.sha256(LIBRARY_BYTES).hexdigest()}  librkllmrt.so\n"


def test_client_namespace_reaches_every_balancer_nginx(fleet: Fleet) -> None:
    for balancer in fleet.balancers:
        reply = fleet.client_exec(["curl", "-sS", "-m5", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"http://{balancer.address}/"])
        assert reply.stdout == "200", balancer.name


def test_restart_keeps_installed_files(fleet: Fleet) -> None:
    board = fleet.board("board2")
    board.exec("echo installed > /usr/local/lib/marker")
    old_boot_id = board.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
    fleet.restart("board2")
    assert board.exec(["cat", "/usr/local/lib/marker"]).stdout == "installed\n"
    state = board.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")
    # nspawn gives each container boot its own boot_id, so a new one proves a real reboot.
    assert board.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout != old_boot_id


def test_a_kernel_package_takes_effect_at_a_reboot_from_inside(fleet: Fleet) -> None:
    board = fleet.board("board2")
    packages = yaml.safe_load(fleet.inventory_path.read_text())["all"]["vars"]["fleet_sim_kernel_packages"]
    package = packages["0.9.8"]
    board.exec(["curl", "-fsS", "-m10", "-o", "/tmp/kernel.deb", package["url"]])
    assert board.exec(["sha256sum", "/tmp/kernel.deb"]).stdout.split()[0] == package["sha256"]
    board.exec(["dpkg", "-i", "/tmp/kernel.deb"])
    # Installed, not booted: the driver the board reports is still the one it booted with.
    assert board.exec(["cat", "/srv/fixtures/rknpu/version"]).stdout == "RKNPU driver: v0.9.6\n"
    old_boot_id = board.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
    board.exec(["systemctl", "--no-block", "reboot"])

    def rebooted() -> bool:
        if not board.is_running():
            return False
        boot_id = board.exec(["cat", "/proc/sys/kernel/random/boot_id"], check=False).stdout
        return boot_id not in ("", old_boot_id) and board.exec(
            ["systemctl", "is-system-running"], check=False).stdout.strip() in ("running", "degraded")

    wait_until(rebooted, "board2 back after systemctl reboot", deadline_s=90, interval=0.2)
    assert board.exec(["cat", "/srv/fixtures/rknpu/version"]).stdout == "RKNPU driver: v0.9.8\n"
    assert board.exec(["cat", "/run/fleet-sim-boot/osrelease"]).stdout == "6.1.84-fleetsim\n"
    # The kernel the image shipped with stays installed (bootable from the menu).
    assert board.exec(["test", "-f", "/boot/vmlinuz-6.1.43-fleetsim"], check=False).returncode == 0


def test_stopped_board_is_unreachable_until_started(fleet: Fleet) -> None:
    ssh_board1 = fleet.board("board1").ssh_args("hostname")
    fleet.stop("board1")
    try:
        assert not fleet.board("board1").is_running()
        with pytest.raises(SimError, match="not running"):
            fleet.board("board1").exec(["true"])
        assert fleet.client_exec(ssh_board1, check=False).returncode != 0
    finally:
        fleet.start("board1")
    assert fleet.client_exec(ssh_board1).stdout == "board1\n"


def test_a_powered_off_board_boots_again_every_time(fleet: Fleet) -> None:
    """A power cut leaves the kernel finishing the killed processes; the next boot must not race it."""
    board = fleet.board("board1")
    for cut in range(5):
        old_boot_id = board.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
        power_off(board)
        assert not board.is_running()
        assert [path for path in board.cgroup_dirs if path.exists()] == [], f"power cut {cut}"
        set_link(board, up=True)
        fleet.start("board1")
        new_boot_id = board.exec(["cat", "/proc/sys/kernel/random/boot_id"]).stdout
        assert new_boot_id != old_boot_id, f"power cut {cut}"


def test_down_leaves_nothing_even_after_nspawn_was_killed(fleet: Fleet) -> None:
    # SIGKILL of systemd-nspawn orphans the container's processes; down must still remove them.
    for pid in fleet.board("board1").nspawn_pids():
        os.kill(pid, signal.SIGKILL)
    fleet.down()
    prefix = fleet.prefix
    assert namespaces_with_prefix(prefix) == []
    assert links_with_prefix(prefix) == []
    assert f"{prefix}-" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                              text=True, check=True).stdout
    assert str(run_dir_for(prefix)) not in Path("/proc/mounts").read_text()
    assert _processes_mentioning(f"--machine={prefix}-") == []
    assert _processes_mentioning(str(run_dir_for(prefix))) == []
    assert not run_dir_for(prefix).exists()
    assert not fleet.inventory_path.exists()


def test_failed_up_cleans_up_after_itself(tmp_path: Path) -> None:
    prefix = f"rx{os.getpid() % 0x10000:04x}"
    sources = _sources(tmp_path)
    broken = MirrorSources(tmp_path / "missing.so", sources.header, sources.models)
    with pytest.raises(FileNotFoundError):
        Fleet.up(arch="amd64", boards=1, prefix=prefix, inventory_dir=tmp_path / "inventory",
                 mirror_sources=broken)
    assert namespaces_with_prefix(prefix) == []
    assert links_with_prefix(prefix) == []
    assert not run_dir_for(prefix).exists()
