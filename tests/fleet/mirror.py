"""Artefact mirror: the release download layout, served over HTTP on the fleet bridge."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO_ROOT, free_port, wait_until

from . import kernels
from .commands import SimError

RELEASE_API = "rknn-llm/release-v1.2.3/rkllm-runtime/Linux/librkllm_api"
LIB_PATH = f"{RELEASE_API}/aarch64/librkllmrt.so"
HEADER_PATH = f"{RELEASE_API}/include/rkllm.h"
# Board arch -> the test double build that runs there.
DOUBLE_BUILD_DIRS = {"arm64": "aarch64", "amd64": "host"}


@dataclass(frozen=True)
class MirrorSources:
    """Files the mirror publishes: the runtime library, its header and model files."""

    library: Path
    header: Path
    models: tuple[Path, ...]

    @classmethod
    def from_repo(cls, arch: str, repo: Path = REPO_ROOT) -> MirrorSources:
        library = repo / "build" / DOUBLE_BUILD_DIRS[arch] / "librkllmrt.so"
        header = repo / "tests/fakelib/rkllm.h"
        models = tuple(sorted((repo / "tests/fakelib/models").glob("*.rkllm")))
        missing = [str(p) for p in (library, header) if not p.is_file()]
        if missing or not models:
            raise SimError(f"mirror sources missing ({', '.join(missing) or 'no models'}): run `make double`")
        return cls(library, header, models)


@dataclass(frozen=True)
class PublishedFile:
    path: str
    sha256: str


def model_name(model: Path) -> str:
    """The `name = ...` line of a fake model file (the catalog key); the file stem otherwise."""
    for line in model.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "name":
            return value.split("#", 1)[0].strip()
    return model.stem


def _publish(source: Path, root: Path, relative: str) -> PublishedFile:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    (target.parent / f"{target.name}.sha256").write_text(f"{digest}  {target.name}\n")
    return PublishedFile(relative, digest)


def publish(sources: MirrorSources, root: Path, board_arch: str) -> dict[str, PublishedFile]:
    """Copy sources into the release layout under root and build the kernel packages for board_arch.

    Keys: 'library', 'header', 'model:<name>', 'kernel:<rknpu version>'.
    """
    published = {
        "library": _publish(sources.library, root, LIB_PATH),
        "header": _publish(sources.header, root, HEADER_PATH),
    }
    for model in sources.models:
        published[f"model:{model_name(model)}"] = _publish(model, root, f"models/{model.name}")
    with tempfile.TemporaryDirectory() as built:
        for driver, release in kernels.PACKAGED_KERNELS.items():
            deb = kernels.build_kernel_deb(release, driver, board_arch, Path(built))
            published[f"kernel:{driver}"] = _publish(deb, root, f"kernels/{deb.name}")
    return published


def _answers(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_server(root: Path, address: str, log_path: Path) -> tuple[int, int]:
    """Serve root on address; return (pid, port) once it accepts connections."""
    port = free_port(address)
    with log_path.open("ab") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", address, "--directory", str(root), str(port)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, start_new_session=True)
    wait_until(lambda: _answers(address, port) or server.poll() is not None,
               f"artefact mirror on {address}:{port}", deadline_s=15, interval=0.2)
    if server.poll() is not None:
        raise SimError(f"artefact mirror exited {server.returncode}; see {log_path}")
    return server.pid, port


def stop_server(pid: int, root: Path) -> None:
    """Stop the mirror if pid is still that server (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if str(root).encode() in cmdline:
        os.kill(pid, signal.SIGTERM)
