"""How an e2e module gets its simulated fleet: one naming rule, and a fleet that is always torn down.

A module-scoped fixture writes its inventory variables and runs its playbooks inside the `with`, so
a failure while provisioning still halts every host. Fleets of different modules (and of the two
pytest-xdist workers) never share a name: the tag names the module, the process id the worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet.sim import Fleet


def fleet_prefix(tag: str) -> str:
    """The simulator's name prefix for this process's fleet of one module ("eb" + a pid tag)."""
    return f"{tag}{os.getpid() % 0x10000:04x}"


@contextmanager
def booted_fleet(directory: Path, tag: str, **up: Any) -> Iterator[Fleet]:
    """Fleet.up(**up) with its inventory under directory; down when the block ends, however it ends."""
    fleet = Fleet.up(prefix=fleet_prefix(tag), inventory_dir=directory / "inventory", **up)
    try:
        yield fleet
    finally:
        fleet.down()
