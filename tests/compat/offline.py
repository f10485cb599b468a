"""Refuse and record every network connection a client library tries beyond this machine.

Some libraries fetch data at import or on first use (litellm's model cost map, tiktoken's encodings,
NLTK corpora); the suite must pass without them. The audit hook sees every Python-level DNS lookup
and connect, so a fetch cannot slip through, and the refused attempts are reported to the test.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

# Set before any client is imported: each stops a fetch the library would otherwise do.
OFFLINE_ENVIRONMENT = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm: the bundled cost map, not the one on GitHub
    "LITELLM_TELEMETRY": "False",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def _is_local(host: object) -> bool:
    if not isinstance(host, str) or host in LOCAL_HOSTS:
        return True  # unix sockets and socketpairs
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OutboundGuard:
    def __init__(self, tiktoken_cache: Path) -> None:
        self.attempts: list[str] = []
        self.tiktoken_cache = tiktoken_cache

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.getaddrinfo":
            host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        elif event == "socket.connect":
            address = args[1]
            host = address[0] if isinstance(address, tuple) else address
        else:
            return
        if not _is_local(host):
            self.attempts.append(f"{event} {host}")
            raise ConnectionRefusedError(f"offline test run: no connection to {host}")


def go_offline() -> OutboundGuard:
    """Set the offline environment, point tiktoken at an empty cache, and refuse outbound connections."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    # An empty cache: any encoding a library asked tiktoken for would have to be downloaded (and refused).
    # (litellm points tiktoken at the encodings bundled in its wheel instead, which needs no network.)
    tiktoken_cache = Path(tempfile.mkdtemp(prefix="tiktoken-empty-"))
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_cache)
    guard = OutboundGuard(tiktoken_cache)
    sys.addaudithook(guard)
    return guard
