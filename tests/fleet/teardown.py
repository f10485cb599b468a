"""Remove everything a fleet prefix may have created, whether `up` finished or not."""

from __future__ import annotations

import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import wait_until

from .commands import SimError, log, mounts_under, run
from .host import Host, is_alive, processes_matching, signal_quietly
from .mirror import stop_server
from .network import delete_link, delete_namespace, links_with_prefix, namespace_pids, namespaces_with_prefix


def stray_nspawn_pids(prefix: str) -> list[int]:
    """nspawn processes of this prefix not known to the state file (e.g. after a crashed `up`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        booting = args and (args[0].endswith(b"systemd-nspawn") or b"fleet-sim-reboot-loop" in args)
        if booting and any(
                a.startswith(f"--machine={prefix}-".encode()) for a in args):
            pids.append(int(entry.name))
    return pids


def leftovers(prefix: str, run_dir: Path) -> list[str]:
    """Human-readable list of what still exists for prefix; empty when teardown is complete."""
    found = [f"netns {ns}" for ns in namespaces_with_prefix(prefix)]
    found += [f"link {link}" for link in links_with_prefix(prefix)]
    found += [f"mount {m}" for m in mounts_under(run_dir)]
    pids = stray_nspawn_pids(prefix) + processes_matching(str(run_dir / "mirror"))
    found += [f"process {pid}" for pid in pids]
    return found


def teardown(prefix: str, run_dir: Path, hosts: list[Host], mirror_pid: int | None) -> None:
    """Halt hosts gracefully (in parallel), then kill, unmount and delete whatever is left."""
    running = [host for host in hosts if host.pid1() is not None or host.nspawn_pids()]
    if running:
        log(f"halting {', '.join(h.name for h in running)}")
        with ThreadPoolExecutor(max_workers=len(running)) as pool:
            list(pool.map(lambda host: host.stop(), running))
    if mirror_pid is not None:
        stop_server(mirror_pid, run_dir / "mirror")
    strays = stray_nspawn_pids(prefix) + processes_matching(str(run_dir / "mirror"))
    strays += [pid for netns in namespaces_with_prefix(prefix) for pid in namespace_pids(netns)]
    for pid in strays:
        signal_quietly(pid, signal.SIGKILL)
    wait_until(lambda: not any(is_alive(pid) for pid in strays),
               "leftover processes to die", deadline_s=15, interval=0.2)
    for mount in mounts_under(run_dir):
        run(["umount", mount], check=False)
    for mount in mounts_under(run_dir):
        run(["umount", "-l", mount], check=False)
    for link in links_with_prefix(prefix):
        delete_link(link)
    for netns in namespaces_with_prefix(prefix):
        delete_namespace(netns)
    remaining = leftovers(prefix, run_dir)
    if remaining:
        raise SimError(f"teardown of {prefix} incomplete: {', '.join(remaining)}")
    if run_dir.exists():
        shutil.rmtree(run_dir)
