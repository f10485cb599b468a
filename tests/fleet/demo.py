"""The README's first command: boot the simulated fleet, provision it with site.yml, and stream one
chat answer through the balancers' virtual address from the client network namespace, as a user of
the fleet would."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .sim import REPO_ROOT, Fleet, down

QUESTION = "Hello fleet! Which board answers me?"


def _timed(label: str, command: list[str]) -> None:
    started = time.monotonic()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    print(f"== {label}: {time.monotonic() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="arm64", choices=["arm64", "amd64"])
    parser.add_argument("--boards", type=int, default=3)
    parser.add_argument("--balancers", type=int, default=2)
    args = parser.parse_args(argv)

    venv_bin = Path(sys.executable).parent
    down()
    started = time.monotonic()
    fleet = Fleet.up(arch=args.arch, boards=args.boards, balancers=args.balancers)
    print(f"== fleet up ({args.boards} {args.arch} boards + {args.balancers} balancer(s)): "
          f"{time.monotonic() - started:.0f} s")
    playbook = [str(venv_bin / "ansible-playbook"), "-i", str(fleet.inventory_path), "site.yml"]
    _timed("site.yml, cold", playbook)
    balancer_url = f"http://{fleet.endpoint_address}"
    if fleet.virtual_address:
        holders = ", ".join(fleet.virtual_address_holders()) or "nobody"
        print(f"== virtual address {fleet.virtual_address} held by {holders}")
    print(f"== {QUESTION!r} -> {balancer_url} (from the client namespace {fleet.client_netns})", flush=True)
    subprocess.run(["ip", "netns", "exec", fleet.client_netns, str(venv_bin / "rkllm-chat"),
                    "--url", balancer_url], input=QUESTION + "\n", text=True, check=True)
    print("\nThe fleet stays up: `python3 -m tests.fleet.sim status`, `make sim-down` to remove it.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
