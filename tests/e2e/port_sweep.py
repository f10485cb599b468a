"""TCP or UDP sweep of hosts' ports, run inside a network namespace (stdlib only).

    python3 port_sweep.py tcp|udp [--ports 1-65535] ADDRESS...

prints {address: {"open": [...], "refused": [...], "silent": N}} as JSON:
- tcp: open = the handshake completed; refused = an RST or ICMP error came back (a closed port
  without a drop policy); silent = no answer before the timeout (dropped).
- udp: open = a datagram came back (the listener answers every probe); refused = ICMP port
  unreachable; silent = no answer.
Many sockets are in flight at once, so a full sweep of a dropping host takes about
ports / window * timeout. An answer that arrived while this process was not scheduled is still
seen: a socket is looked at once more before it is called silent.
"""

from __future__ import annotations

import argparse
import errno
import json
import resource
import selectors
import socket
import time
from collections import deque

PROBE = b"rkllm-fleet port sweep"


def _ports(spec: str) -> list[int]:
    ports: list[int] = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        ports.extend(range(int(first), int(last or first) + 1))
    return ports


def _outcome(sock: socket.socket, protocol: str) -> str | None:
    """open / refused when the socket has its answer, None while it has none."""
    if protocol == "tcp":
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return "refused"
        try:
            sock.getpeername()
        except OSError:
            return None
        return "open"
    try:
        sock.recv(2048)
    except BlockingIOError:
        return None
    except OSError:
        return "refused"
    return "open"


def _start(address: str, port: int, protocol: str) -> tuple[socket.socket, str | None]:
    """A probe under way, with its outcome when the kernel already knows it."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(family, kind)
    sock.setblocking(False)
    if protocol == "tcp":
        code = sock.connect_ex((address, port))
        return sock, None if code == errno.EINPROGRESS else ("open" if code == 0 else "refused")
    sock.connect((address, port))
    sock.send(PROBE)
    return sock, None


def sweep(addresses: list[str], ports: list[int], protocol: str, window: int,
          timeout: float) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, list[int]]] = {a: {"open": [], "refused": []} for a in addresses}
    silent = dict.fromkeys(addresses, 0)
    targets = deque((a, p) for p in ports for a in addresses)
    selector = selectors.DefaultSelector()
    live: dict[socket.socket, tuple[str, int]] = {}
    deadlines: deque[tuple[float, socket.socket]] = deque()
    event = selectors.EVENT_WRITE if protocol == "tcp" else selectors.EVENT_READ

    def finish(sock: socket.socket, outcome: str | None) -> None:
        address, port = live.pop(sock)
        if outcome is None:
            silent[address] += 1
        else:
            found[address][outcome].append(port)
        selector.unregister(sock)
        sock.close()

    while targets or live:
        while targets and len(live) < window:
            address, port = targets.popleft()
            sock, outcome = _start(address, port, protocol)
            live[sock] = (address, port)
            selector.register(sock, event)
            if outcome is not None:
                finish(sock, outcome)
            else:
                deadlines.append((time.monotonic() + timeout, sock))
        for key, _ in selector.select(timeout=0.05):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            outcome = _outcome(ready, protocol)
            if outcome is not None:
                finish(ready, outcome)
        # Deadlines were appended in order: the expired ones are at the left.
        now = time.monotonic()
        while deadlines and deadlines[0][0] <= now:
            _, sock = deadlines.popleft()
            if sock in live:
                finish(sock, _outcome(sock, protocol))
    return {a: {"open": sorted(found[a]["open"]), "refused": sorted(found[a]["refused"]), "silent": silent[a]}
            for a in addresses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", choices=["tcp", "udp"])
    parser.add_argument("addresses", nargs="+")
    parser.add_argument("--ports", default="1-65535")
    parser.add_argument("--window", type=int, default=16384, help="probes in flight at once")
    # On the simulator's veth links an answer takes microseconds; the margin is for a loaded machine
    # (a SYN is resent after 1 s), and the last look before "silent" covers this process being late.
    parser.add_argument("--timeout", type=float, default=1.5,
                        help="seconds before an unanswered probe is silent")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.window + 64)), hard))
    window = min(args.window, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64)
    print(json.dumps(sweep(args.addresses, _ports(args.ports), args.protocol, window, args.timeout)))


if __name__ == "__main__":
    main()
