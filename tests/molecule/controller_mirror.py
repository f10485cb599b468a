"""An HTTP server on the controller's loopback for the scenarios of roles that run on the controller
(controller_fetch, rkllm_convert): `python3 -m tests.molecule.controller_mirror up|down WORK_DIR`.

`up` serves WORK_DIR/mirror (the simulator's artefact mirror, bound to 127.0.0.1) and records its pid
and URL in WORK_DIR/mirror.json; `down` stops it. Both are safe to repeat.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.fleet.mirror import start_server, stop_server

ADDRESS = "127.0.0.1"


def up(work_dir: Path) -> str:
    state = work_dir / "mirror.json"
    if state.exists():
        return str(json.loads(state.read_text())["url"])
    root = work_dir / "mirror"
    root.mkdir(parents=True, exist_ok=True)
    pid, port = start_server(root, ADDRESS, work_dir / "mirror.log")
    url = f"http://{ADDRESS}:{port}"
    state.write_text(json.dumps({"pid": pid, "root": str(root), "url": url}) + "\n")
    return url


def down(work_dir: Path) -> None:
    state = work_dir / "mirror.json"
    if state.exists():
        recorded = json.loads(state.read_text())
        stop_server(int(recorded["pid"]), Path(recorded["root"]))
        state.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.molecule.controller_mirror", description=__doc__)
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("work_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "up":
        print(up(args.work_dir))
    else:
        down(args.work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
