"""Hard faults of one simulated host, as the fleet meets them in a rack.

A cut link and a power cut leave peers without an answer (their packets go nowhere, so connections
time out or find no route), never with the instant refusal a halted host's kernel would send; a
power cut also skips the shutdown, so nothing on the host tidies up (its firewall unit, say).
"""

from __future__ import annotations

from .commands import run
from .host import Host


def set_link(host: Host, *, up: bool) -> None:
    """Take the host's only interface (eth0 in its network namespace) down or up again."""
    run(["ip", "-n", host.spec.netns, "link", "set", "eth0", "up" if up else "down"])


def power_off(host: Host) -> None:
    """Cut the power: the network goes dark first, then every process dies at once (SIGKILL).

    The host's network namespace outlives it (the rack's cable stays plugged in): Fleet.start boots it
    again once set_link(host, up=True) has restored the link.
    """
    set_link(host, up=False)
    host.kill_leftovers()
    forget_runtime_addresses(host)
    # Bookkeeping of the killed container only: its cgroups and the launcher's exit status.
    host.stop()


def forget_runtime_addresses(host: Host) -> None:
    """Drop the addresses the running host added to eth0 (a VRRP virtual address, say): a powered-off
    machine boots with none of them, while the simulator's namespace would otherwise keep them."""
    own = host.spec.address.split("/")[0]
    listed = run(["ip", "-n", host.spec.netns, "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    for line in listed.splitlines():
        address = line.split()[3]
        if address.split("/")[0] != own:
            run(["ip", "-n", host.spec.netns, "addr", "del", address, "dev", "eth0"])
