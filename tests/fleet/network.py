"""Bridge, network namespaces and veth pairs; names all start with the fleet prefix."""

from __future__ import annotations

import hashlib
import ipaddress
import json
from pathlib import Path

from .commands import SimError, run

NETNS_DIR = Path("/run/netns")
IFNAME_MAX = 15


def bridge_name(prefix: str) -> str:
    return f"{prefix}-br"


def choose_subnet(prefix: str) -> ipaddress.IPv4Network:
    """A /24 in 10.64.0.0/10 derived from the prefix, skipping any network already on this host."""
    digest = hashlib.sha256(prefix.encode()).digest()
    start = int.from_bytes(digest[:2], "big") % (64 * 256)
    used = _host_networks()
    for step in range(64 * 256):
        index = (start + step) % (64 * 256)
        candidate = ipaddress.IPv4Network(f"10.{64 + index // 256}.{index % 256}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise SimError("no free /24 in 10.64.0.0/10 on this host")


def _host_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for entry in json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]"):
        dst = entry.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("127.", "broadcast", "local")):
            networks.append(ipaddress.IPv4Network(dst, strict=False))
    for link in json.loads(run(["ip", "-j", "-4", "addr"]).stdout or "[]"):
        for addr in link.get("addr_info", []):
            networks.append(ipaddress.IPv4Network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return networks


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def create_bridge(name: str, host_address: ipaddress.IPv4Interface) -> None:
    if link_exists(name):
        raise SimError(f"bridge {name} already exists: run `down` for this prefix first")
    run(["ip", "link", "add", "name", name, "type", "bridge"])
    run(["ip", "addr", "add", str(host_address), "dev", name])
    run(["ip", "link", "set", name, "up"])


def attach_namespace(netns: str, host_if: str, bridge: str, address: ipaddress.IPv4Interface) -> None:
    """Create netns with eth0 = address, wired through veth host_if into the bridge."""
    if len(host_if) + 1 > IFNAME_MAX:
        raise SimError(f"interface name {host_if!r} too long; use a shorter --prefix")
    peer = f"{host_if}p"
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer])
    run(["ip", "link", "set", peer, "netns", netns])
    run(["ip", "-n", netns, "link", "set", peer, "name", "eth0"])
    run(["ip", "-n", netns, "addr", "add", str(address), "dev", "eth0"])
    run(["ip", "-n", netns, "link", "set", "eth0", "up"])
    run(["ip", "-n", netns, "link", "set", "lo", "up"])
    run(["ip", "link", "set", host_if, "master", bridge, "up"])


def namespaces_with_prefix(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"{prefix}-"))


def links_with_prefix(prefix: str) -> list[str]:
    links = json.loads(run(["ip", "-j", "link", "show"]).stdout or "[]")
    return sorted(link["ifname"] for link in links if link["ifname"].startswith(f"{prefix}-"))


def namespace_pids(netns: str) -> list[int]:
    proc = run(["ip", "netns", "pids", netns], check=False)
    return [int(pid) for pid in proc.stdout.split()]


def delete_namespace(netns: str) -> None:
    run(["ip", "netns", "del", netns], check=False)


def delete_link(name: str) -> None:
    run(["ip", "link", "del", name], check=False)
