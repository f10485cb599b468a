"""Native `nft` inside emulated arm64 boards.

qemu-user translates only a few netlink protocols, not NETLINK_NETFILTER, so an emulated arm64 `nft`
fails with "Unable to initialize Netlink socket: Protocol not supported". The kernel runs x86_64
binaries natively, so each arm64 board gets the controller's own `nft` with its shared libraries and
loader, behind a `/usr/sbin/nft` wrapper. The roles and the board's nftables.service call `nft` as on
a real board; only the binary underneath differs, and the rules still load into the board's own
network namespace.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .commands import SimError, run

HOST_NFT = Path("/usr/sbin/nft")
INSTALL_DIR = "/usr/lib/rkllm-fleet-sim/native-nft"
_LDD_PATH = re.compile(r"(/\S+)\s+\(0x")


def _host_files() -> list[Path]:
    if not HOST_NFT.exists():
        raise SimError(f"{HOST_NFT} missing on the controller: run ansible/controller-setup.sh")
    listing = run(["ldd", str(HOST_NFT)]).stdout
    return [HOST_NFT, *(Path(p) for p in _LDD_PATH.findall(listing))]


def install(root: Path) -> None:
    """Copy the controller's nft into the board root at `root` and point /usr/sbin/nft at it."""
    target = root / INSTALL_DIR.lstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    loader = ""
    for source in _host_files():
        shutil.copy2(source.resolve(), target / source.name)
        if source.name.startswith("ld-linux"):
            loader = source.name
    if not loader:
        raise SimError(f"no ELF loader in `ldd {HOST_NFT}`")
    wrapper = root / "usr/sbin/nft"
    wrapper.unlink(missing_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n# Fleet simulator: native nft (see tests/fleet/native_nft.py).\n"
        f'exec {INSTALL_DIR}/{loader} --library-path {INSTALL_DIR} {INSTALL_DIR}/nft "$@"\n')
    wrapper.chmod(0o755)
