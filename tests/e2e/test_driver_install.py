"""The rknpu_driver install path on the simulated fleet (4 amd64 boards and the balancer).

board4 boots a kernel whose rknpu driver is 0.9.6 (board3 has 8 GB of RAM: the fleet is the one
test_site_refusals.py provisions first, tests/e2e/site_runs.py). It is first provisioned as it ran before the
install path existed (the minimum lowered to 0.9.6), then site.yml runs with
`rknpu_driver_install: true` and a kernel .deb from the simulator's mirror: check mode reports the
install, unknown images, a rocket board and a wrong sha256 are refused before anything changes, a
kernel that still carries 0.9.7 is refused after its reboot, the 0.9.8 kernel is installed while a
client streams through the balancer, and a second run changes nothing. The tests run in file order
on one fleet, which is torn down after them (its board4 runs another kernel then).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from e2e.site_runs import REPO_ROOT, SHARED_BOARDS, SharedSiteFleet, SiteRun, SiteRunner
from fleet.kernels import KERNEL_RELEASE_PATH

from tests.support import wait_until

pytestmark = [pytest.mark.fleet, pytest.mark.timeout(900)]

LOAD_SCRIPT = Path(__file__).with_name("fleet_load.py")
BOARDS = SHARED_BOARDS
OLD, OTHERS = "board4", ("board1", "board2", "board3")
EVERY_HOST = (*BOARDS, "balancer1")
IMAGE_KERNEL = "6.1.43-fleetsim"
INSTALL_PLAY = "PLAY [Install kernels with a newer rknpu driver, a batch at a time]"


@pytest.fixture(scope="module")
def site(shared_site_fleet: SharedSiteFleet) -> Iterator[SiteRunner]:
    try:
        yield dataclasses.replace(shared_site_fleet.provisioning(), limit=BOARDS)
    finally:
        shared_site_fleet.down()


def timed(label: str, run: SiteRun) -> SiteRun:
    print(f"\n[driver install] {label}: {run.seconds:.0f} s, changed {run.changed()}")
    return run


@pytest.fixture(scope="module")
def provisioned(site: SiteRunner) -> SiteRun:
    """The fleet as it served before the install path: board4 on 0.9.6 passes with a warning."""
    run = timed("provisioning with rknpu 0.9.6 accepted",
                site.run("-e", "rknpu_driver_min_version=0.9.6", limit=EVERY_HOST))
    assert run.returncode == 0, run.output[-6000:]
    return run


def install_vars(site: SiteRunner, rknpu: str, **extra: str) -> list[str]:
    inventory = yaml.safe_load(site.fleet.inventory_path.read_text())
    packages = inventory["all"]["vars"]["fleet_sim_kernel_packages"]
    settings = {"rknpu_driver_install": True, "rknpu_driver_kernel_package_url": packages[rknpu]["url"],
                "rknpu_driver_kernel_package_sha256": packages[rknpu]["sha256"], **extra}
    return ["-e", json.dumps(settings)]


def board_exec(site: SiteRunner, board: str, *command: str) -> str:
    return site.fleet.board(board).exec(list(command)).stdout


def boot_id(site: SiteRunner, board: str) -> str:
    return board_exec(site, board, "cat", "/proc/sys/kernel/random/boot_id").strip()


def server_pid(site: SiteRunner, board: str) -> str:
    return board_exec(site, board, "systemctl", "show", "-p", "MainPID", "--value", "rkllm-server").strip()


def driver(site: SiteRunner, board: str) -> str:
    return board_exec(site, board, "cat", "/srv/fixtures/rknpu/version").strip()


def booted_driver_and_kernel(site: SiteRunner, board: str) -> str:
    """What the role reports a board ran before an install: "0.9.6 on 6.1.43-fleetsim"."""
    version = driver(site, board).removeprefix("RKNPU driver: v")
    return f"{version} on {board_exec(site, board, 'cat', KERNEL_RELEASE_PATH).strip()}"


def snapshot(site: SiteRunner) -> dict[str, tuple[str, str]]:
    """Per board: (boot id, server MainPID) - both change when a board or its server is touched."""
    return {board: (boot_id(site, board), server_pid(site, board)) for board in BOARDS}


def ready_state(site: SiteRunner, board: str) -> str:
    """The server's own view from /ready: "ready", "draining", ... ("" while it does not answer)."""
    shown = site.fleet.board(board).exec(["curl", "-s", "--max-time", "5", "http://127.0.0.1:8080/ready"],
                                         check=False).stdout
    try:
        return str(json.loads(shown).get("status", ""))
    except ValueError:
        return ""


def generated_tokens(site: SiteRunner, board: str) -> float:
    metrics = board_exec(site, board, "curl", "-sS", "--max-time", "5", "http://127.0.0.1:8080/metrics")
    return sum(float(v) for v in re.findall(r"^rkllm_generation_tokens_total\{[^}]*\} (\S+)$", metrics, re.M))


def nginx_processes(site: SiteRunner) -> str:
    """The balancer's nginx master and worker PIDs: a reload replaces the workers."""
    return site.fleet.balancer.exec("ps -o pid= -C nginx | sort -n | tr -d ' ' | tr '\\n' ' '").stdout


def refused_before_install(run: SiteRun) -> str:
    assert run.returncode != 0, run.output[-4000:]
    assert INSTALL_PLAY not in run.output and "PLAY [Provision the boards]" not in run.output
    return run.output


def test_check_mode_reports_the_install_and_the_reboot(site: SiteRunner, provisioned: SiteRun) -> None:
    before = snapshot(site)
    run = timed("check mode", site.run("--check", *install_vars(site, "0.9.8"), limit=EVERY_HOST))
    assert run.returncode == 0, run.output[-6000:]
    deb = "linux-image-6.1.84-fleetsim_1.0_amd64.deb"
    assert re.search(rf"{OLD}: rknpu driver 0\.9\.6 \(kernel {IMAGE_KERNEL}\) is older than 0\.9\.8: "
                     rf"would install {deb} from http://\S+/kernels/{deb}, keeps kernel {IMAGE_KERNEL} "
                     r"installed, then would reboot", run.output), run.output[-6000:]
    for board in OTHERS:
        up_to_date = f"{board}: rknpu driver 0.9.8 (kernel {IMAGE_KERNEL}) is up to date: no kernel install"
        assert up_to_date in run.output
    assert snapshot(site) == before
    assert driver(site, OLD) == "RKNPU driver: v0.9.6"
    installed = site.fleet.board(OLD).exec(["dpkg-query", "-W", "linux-image-6.1.84-fleetsim"], check=False)
    assert installed.returncode != 0, installed.stdout


def test_unknown_image_is_refused_before_anything_changes(site: SiteRunner, provisioned: SiteRun) -> None:
    before = snapshot(site)
    output = refused_before_install(site.run("-e", json.dumps({"rknpu_driver_install": True})))
    assert re.search(rf"{OLD}: rknpu driver 0\.9\.6 needs a kernel with rknpu >= 0\.9\.8, but Debian "
                     rf"12[.\d]* \(kernel {IMAGE_KERNEL}\) is neither Armbian nor Ubuntu Rockchip: set "
                     "rknpu_driver_kernel_package_url and rknpu_driver_kernel_package_sha256", output), \
        output[-4000:]
    assert snapshot(site) == before


def test_rocket_board_is_refused_even_with_the_install_path(site: SiteRunner, provisioned: SiteRun) -> None:
    # board3 as if its kernel had loaded the mainline driver: the path the role stats exists.
    rocket = site.workdir / "rocket.yml"
    rocket.write_text(yaml.safe_dump(
        {"all": {"hosts": {"board3": {"rknpu_driver_rocket_module_path": "/srv/fixtures/device-tree"}}}}))
    before = snapshot(site)
    output = refused_before_install(site.run(*install_vars(site, "0.9.8"), inventories=(rocket,)))
    assert ("board3: the mainline 'rocket' NPU driver is loaded, but RKLLM 1.2.3 needs the vendor rknpu "
            "driver" in output), output[-4000:]
    assert "rknpu_driver_install does not replace a mainline kernel" in output
    assert snapshot(site) == before


def test_wrong_package_sha256_is_refused_and_nothing_is_cached(site: SiteRunner,
                                                               provisioned: SiteRun) -> None:
    wrong = "0" * 64
    before = snapshot(site)
    output = refused_before_install(site.run(*install_vars(site, "0.9.8",
                                                           rknpu_driver_kernel_package_sha256=wrong)))
    assert re.search(r"rknpu_driver: linux-image-6\.1\.84-fleetsim_1\.0_amd64\.deb from \S+ failed: "
                     rf"sha256 did not match {wrong}", output), output[-4000:]
    assert "nothing was installed on any board" in output
    assert list((site.workdir / "cache" / "kernel" / wrong).glob("*")) == []
    assert snapshot(site) == before


def test_kernel_still_too_old_after_reboot_is_refused_and_board_keeps_serving(
        site: SiteRunner, provisioned: SiteRun) -> None:
    before = snapshot(site)
    run = timed("0.9.7 kernel", site.run(*install_vars(site, "0.9.7")))
    assert run.returncode != 0, run.output[-4000:]
    assert (f"{OLD}: after installing linux-image-6.1.75-fleetsim_1.0_amd64.deb from" in run.output
            and "and rebooting, kernel 6.1.75-fleetsim reports rknpu driver 0.9.7 "
            f"(was 0.9.6 on {IMAGE_KERNEL}), still older than 0.9.8: the board stays on the kernel that "
            f"booted, 6.1.75-fleetsim (kernel {IMAGE_KERNEL} is still installed)" in run.output), \
        run.output[-4000:]
    after = snapshot(site)
    assert after[OLD][0] != before[OLD][0], f"{OLD} was not rebooted"
    assert all(after[board] == before[board] for board in OTHERS)
    assert driver(site, OLD) == "RKNPU driver: v0.9.7"
    board = site.fleet.board(OLD)
    assert board.exec(["test", "-f", f"/boot/vmlinuz-{IMAGE_KERNEL}"], check=False).returncode == 0
    # Not broken: the server runs on the kernel that booted (still drained: only a resume ends a drain).
    wait_until(lambda: ready_state(site, OLD) in ("ready", "draining"),
               f"{OLD}'s server answers /ready", deadline_s=120, interval=0.2)
    resume = [str(Path(sys.executable).parent / "ansible"), "-i", str(site.fleet.inventory_path.parent), OLD,
              "-b", "-m", "ansible.builtin.include_role", "-a", "name=rkllm_server tasks_from=resume"]
    resumed = subprocess.run(resume, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert ready_state(site, OLD) == "ready"


def balancer_evidence(site: SiteRunner, failed: list[dict[str, object]]) -> str:
    """What the balancer saw around failed requests: its non-200 log lines and errors."""
    logs = site.fleet.balancer.exec("grep -v '\" 200 ' /var/log/nginx/access.log | tail -n 20; "
                                    "tail -n 20 /var/log/nginx/error.log", check=False)
    times = [f"{r['start']:.3f}-{r['end']:.3f} {r.get('error') or r.get('status')}" for r in failed]
    return "failed requests (unix time start-end):\n" + "\n".join(times) + "\nbalancer:\n" + logs.stdout


def test_upgrade_under_load_drains_reboots_and_returns_only_the_old_board(
        site: SiteRunner, provisioned: SiteRun, tmp_path: Path) -> None:
    before = snapshot(site)
    # 0.9.7 after the test above, 0.9.6 when this test runs alone.
    was = booted_driver_and_kernel(site, OLD)
    balancer_before = nginx_processes(site)
    stop_file = tmp_path / "stop"
    load = subprocess.Popen(
        ["ip", "netns", "exec", site.fleet.client_netns, sys.executable, str(LOAD_SCRIPT),
         f"http://{site.fleet.balancer.address}", "continuous", "--concurrency", "3", "--max-tokens", "8",
         "--seconds", "600", "--stop-file", str(stop_file)], stdout=subprocess.PIPE, text=True)
    try:
        run = timed("0.9.8 kernel under load", site.run(*install_vars(site, "0.9.8"), limit=EVERY_HOST))
        if run.returncode == 0:
            # Its metrics restarted at zero with the reboot: tokens there mean nginx sends it requests again.
            wait_until(lambda: generated_tokens(site, OLD) > 0,
                       f"{OLD} serves through the balancer again", deadline_s=120, interval=0.2)
    finally:
        stop_file.touch()
        out, _ = load.communicate(timeout=180)
    records = json.loads(out)["records"]
    assert run.returncode == 0, run.output[-6000:]
    failed = [r for r in records if r.get("status") != 200 or not r.get("complete")]
    print(f"[driver install] continuous client: {len(records)} requests, {len(failed)} failed")
    drain = run.output.split("TASK [rkllm_server : Create the drain file]")[1].split("TASK [")[0]
    assert f"changed: [{OLD}]" in drain, drain
    assert f"{OLD}: kernel 6.1.84-fleetsim booted with rknpu driver 0.9.8 (was {was})" in run.output
    after = snapshot(site)
    assert after[OLD][0] != before[OLD][0], f"{OLD} was not rebooted"
    assert all(after[board] == before[board] for board in OTHERS), (before, after)
    assert driver(site, OLD) == "RKNPU driver: v0.9.8"
    assert ready_state(site, OLD) == "ready"
    assert nginx_processes(site) == balancer_before, "nginx was reloaded or restarted"
    assert records and failed == [], balancer_evidence(site, failed)


def test_second_run_changes_nothing_and_never_reboots(site: SiteRunner, provisioned: SiteRun) -> None:
    if driver(site, OLD) != "RKNPU driver: v0.9.8":
        # Run alone, the install above has not happened: this is the first run, the one below the second.
        first = timed("first install run", site.run(*install_vars(site, "0.9.8"), limit=EVERY_HOST))
        assert first.returncode == 0, first.output[-6000:]
    before = snapshot(site)
    run = timed("second run", site.run(*install_vars(site, "0.9.8"), limit=EVERY_HOST))
    assert run.returncode == 0, run.output[-6000:]
    assert run.changed() == dict.fromkeys(EVERY_HOST, 0), run.output[-6000:]
    assert "skipping: no hosts matched" in run.output.split(INSTALL_PLAY)[1][:300]
    assert snapshot(site) == before
