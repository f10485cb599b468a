"""One simulated machine: an overlayfs root booted by systemd-nspawn inside its own netns."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.support import wait_until

from .commands import SimError, log, mount_points, run
from .network import NETNS_DIR, namespace_pids
from .vendor_image import KEY_LOGIN, PASSWORD_LOGIN, VENDOR_PASSWORD, VENDOR_USER

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
READY_STATES = ("running", "degraded")
# systemd-nspawn exits with 133 when the container reboots (`systemctl reboot` inside); booting it
# again on the same root is what a real board does. The loop's own command line carries the nspawn
# arguments, so it is found (and stopped) like nspawn itself.
REBOOT_LOOP = 'while :; do "$@"; status=$?; [ "$status" -eq 133 ] || exit "$status"; done'
# nspawn puts the container in "<its own cgroup>/payload". Started from one cgroup, every container on
# the machine would share that payload and each container's systemd would create and remove the same
# unit cgroups (units then fail with 219/CGROUP), so each host's loop first moves into its own cgroup,
# in every hierarchy systemd tracks processes in.
OWN_CGROUP = ('for cg in "$@"; do shift; [ "$cg" = -- ] && break; mkdir -p "$cg" && '
              'echo $$ > "$cg/cgroup.procs" || echo "fleet-sim: no own cgroup $cg" >&2; done; ')
CGROUP_PARENT = "rkllm-fleet"


def _cgroup_hierarchies() -> list[Path]:
    """Where systemd (nspawn's and the container's) tracks processes.

    Pure cgroup v2: /sys/fs/cgroup. Hybrid: the v2 hierarchy at /sys/fs/cgroup/unified is the one
    nspawn takes the container's cgroup from, and name=systemd mirrors it, so both count. Legacy:
    name=systemd only.
    """
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        return [root]
    return [path for path in (root / "unified", root / "systemd") if (path / "cgroup.procs").exists()]


# Emulated arm64 boots and halts several times slower than native amd64.
BOOT_TIMEOUT = {"amd64": 90.0, "arm64": 300.0}
HALT_TIMEOUT = {"amd64": 30.0, "arm64": 90.0}


@dataclass
class HostSpec:
    """What `down`/`status` need to know about a host, from any process (kept in the state file)."""

    name: str
    machine: str
    netns: str
    address: str
    arch: str
    lowerdirs: list[str]
    directory: str
    # KEY_LOGIN: root logs in with the fleet's key; PASSWORD_LOGIN: only a vendor image's default user.
    login: str = KEY_LOGIN

    @property
    def root(self) -> Path:
        return Path(self.directory) / "root"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# Every booted systemd takes several inotify instances; the kernel default (128 per user, and all
# containers run as host root) stops the fourth or fifth container with "Too many open files".
INOTIFY_LIMITS = {"fs/inotify/max_user_instances": 8192, "fs/inotify/max_user_watches": 524288}


def raise_inotify_limits() -> None:
    """Raise (never lower) the host's inotify limits so many containers can boot."""
    for key, wanted in INOTIFY_LIMITS.items():
        setting = Path("/proc/sys") / key
        if int(setting.read_text()) < wanted:
            setting.write_text(str(wanted))


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_namespace_init(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    nspid = next((line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), [])
    return len(nspid) > 1 and nspid[-1] == "1"


def processes_matching(argument: str) -> list[int]:
    """Pids whose command line contains argument exactly (e.g. --machine=<name>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and argument in _proc_cmdline(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/cmdline").exists() and bool(_proc_cmdline(pid))


def signal_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


class Host:
    """Lifecycle of one container: mount, boot, wait ready, exec, stop."""

    def __init__(self, spec: HostSpec, ssh_key: Path) -> None:
        self.spec = spec
        self.ssh_key = ssh_key
        self._nspawn: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def address(self) -> str:
        return self.spec.address

    def mount(self) -> None:
        base = Path(self.spec.directory)
        upper, work = base / "upper", base / "work"
        for directory in (upper, work, self.spec.root):
            directory.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.spec.root):
            return
        lower = ":".join(self.spec.lowerdirs)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={lower},upperdir={upper},workdir={work}", str(self.spec.root)])

    def write_file(self, relative: str, content: str | bytes, mode: int = 0o644) -> None:
        target = self.spec.root / relative.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        target.write_bytes(data)
        target.chmod(mode)

    def symlink(self, relative: str, target: str) -> None:
        """Create (or replace) a symlink in the host's root; target is read inside the container."""
        link = self.spec.root / relative.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        link.symlink_to(target)

    def pid1(self) -> int | None:
        """The container's systemd (pid 1 inside its pid namespace), found via the netns."""
        return next((pid for pid in namespace_pids(self.spec.netns) if _is_namespace_init(pid)), None)

    def nspawn_pids(self) -> list[int]:
        return processes_matching(f"--machine={self.spec.machine}")

    def is_running(self) -> bool:
        return self.pid1() is not None

    @property
    def cgroup_dirs(self) -> list[Path]:
        return [hierarchy / CGROUP_PARENT / self.spec.machine for hierarchy in _cgroup_hierarchies()]

    def remove_cgroup(self) -> None:
        """Remove the host's cgroup trees in every hierarchy, deepest first, waiting until they are gone.

        A cgroup whose processes were just killed refuses rmdir (EBUSY) until the kernel has finished
        with them, and not at the same moment in each hierarchy. A tree left in the unified hierarchy
        but gone from name=systemd breaks the next boot: nspawn's mkdir of ".../payload" finds the
        unified directory, so systemd skips creating the compat one and cannot attach the container
        there ("Failed to attach ... to compat systemd cgroup ...: No such file or directory").
        """
        def removed() -> bool:
            for cgroup_dir in self.cgroup_dirs:
                tree = [Path(root) for root, _dirs, _files in os.walk(cgroup_dir)]
                for directory in sorted(tree, key=lambda path: len(path.parts), reverse=True):
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            return not any(cgroup_dir.exists() for cgroup_dir in self.cgroup_dirs)

        wait_until(removed, f"{self.name}: its cgroups removed ({', '.join(map(str, self.cgroup_dirs))})",
                   deadline_s=30, interval=0.05)

    def start(self) -> None:
        """Launch systemd-nspawn detached; wait_ready() completes the boot."""
        if self.nspawn_pids():
            raise SimError(f"{self.name} is already running")
        self.mount()
        log_path = Path(self.spec.directory) / "console.log"
        args = ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--console=passive",
                "--capability=CAP_NET_ADMIN,CAP_NET_RAW", "--link-journal=no", "--resolv-conf=off",
                "--timezone=off", f"--network-namespace-path={NETNS_DIR / self.spec.netns}",
                f"--hostname={self.spec.name}", f"--machine={self.spec.machine}",
                "-D", str(self.spec.root)]
        with log_path.open("ab") as console:
            loop = ["/bin/sh", "-c", OWN_CGROUP + REBOOT_LOOP, "fleet-sim-reboot-loop",
                    *map(str, self.cgroup_dirs), "--"]
            # /proc/sys/net writable, as on a real host: the network namespace is the host's own, and the
            # balancer role sets its TCP keepalive timing there (nspawn mounts all of /proc/sys read-only).
            environment = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network"}
            self._nspawn = subprocess.Popen([*loop, *args], env=environment,
                                            stdin=subprocess.DEVNULL, stdout=console,
                                            stderr=console, start_new_session=True)

    def _exited_early(self) -> bool:
        return self._nspawn is not None and self._nspawn.poll() is not None

    def _system_state(self) -> str:
        if self._exited_early():
            log_tail = (Path(self.spec.directory) / "console.log").read_text(errors="replace")[-2000:]
            raise SimError(f"{self.name}: systemd-nspawn exited {self._nspawn.returncode}:\n{log_tail}")
        if self.pid1() is None:
            return "offline"
        return self.exec(["systemctl", "is-system-running"], check=False).stdout.strip()

    def ssh_args(self, *command: str) -> list[str]:
        return ["ssh", "-i", str(self.ssh_key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", f"root@{self.address}", *command]

    def _ssh_answers(self) -> bool:
        if self.spec.login == PASSWORD_LOGIN:
            # No key logs in to a fresh vendor image: sshd handing out its host key is the sign of life.
            scan = run(["ssh-keyscan", "-T", "3", self.address], check=False, timeout=30)
            return scan.returncode == 0 and bool(scan.stdout.strip())
        return run(self.ssh_args("true"), check=False, timeout=30).returncode == 0

    def wait_ready(self) -> float:
        """Block until systemd finished booting and SSH answers (logs in, with a key login); return
        seconds waited."""
        start = time.monotonic()
        timeout = BOOT_TIMEOUT[self.spec.arch]
        wait_until(lambda: self._system_state() in READY_STATES,
                   f"{self.name}: systemctl is-system-running = running/degraded",
                   deadline_s=timeout, interval=0.2)
        remaining = max(5.0, timeout - (time.monotonic() - start))
        wait_until(self._ssh_answers,
                   f"{self.name}: ssh root@{self.address}", deadline_s=remaining, interval=0.2)
        return time.monotonic() - start

    def exec(self, command: str | Sequence[str], *, check: bool = True,
             timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the running container (all its namespaces and root)."""
        pid = self.pid1()
        if pid is None:
            raise SimError(f"{self.name} is not running")
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        return run(["nsenter", "-t", str(pid), "-m", "-u", "-i", "-n", "-p", "-r", "-w",
                    "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}", "LANG=C.UTF-8", *argv],
                   check=check, timeout=timeout)

    def stop(self) -> None:
        """Halt systemd inside (SIGRTMIN+3), then make sure nothing of the container survives."""
        pid = self.pid1()
        if pid is not None:
            self._request_halt(pid)
            try:
                wait_until(lambda: not self.nspawn_pids() and not namespace_pids(self.spec.netns),
                           f"{self.name} to halt", deadline_s=HALT_TIMEOUT[self.spec.arch], interval=0.2)
            except AssertionError as error:
                log(f"{error}; killing what is left")
        self.kill_leftovers()
        self.remove_cgroup()
        if self._nspawn is not None:
            self._nspawn.wait(timeout=10)
            self._nspawn = None

    def _request_halt(self, pid: int) -> None:
        """Ask systemd to halt via systemctl; SIGRTMIN+3 only when that fails.

        qemu-user renumbers real-time signals, so the host's SIGRTMIN+3 is not a halt request to an
        emulated (arm64) systemd; systemctl works the same on every arch.
        """
        try:
            halted = self.exec(["systemctl", "--no-block", "halt"], check=False, timeout=30).returncode == 0
        except (SimError, subprocess.TimeoutExpired):
            halted = False
        if not halted:
            signal_quietly(pid, signal.SIGRTMIN + 3)

    def kill_leftovers(self) -> None:
        """SIGKILL every process in the netns and the nspawn itself (a killed nspawn leaves them)."""
        for _ in range(50):
            pids = namespace_pids(self.spec.netns) + self.nspawn_pids()
            if not pids:
                return
            for pid in pids:
                signal_quietly(pid, signal.SIGKILL)
            wait_until(lambda pids=pids: not any(is_alive(p) for p in pids),
                       f"{self.name}: processes to die", interval=0.05)
        raise SimError(f"{self.name}: processes keep appearing in netns {self.spec.netns}")

    def unmount(self) -> None:
        if is_mounted(self.spec.root):
            run(["umount", str(self.spec.root)])

    def describe(self) -> str:
        state = "running" if self.is_running() else "stopped"
        ssh = shlex.join(self.ssh_args())
        if self.spec.login == PASSWORD_LOGIN:
            ssh = f"ssh {VENDOR_USER}@{self.address} (password {VENDOR_PASSWORD})"
        return f"{self.name:<10} {self.address:<15} {self.spec.arch:<6} {state}  ssh: {ssh}"
