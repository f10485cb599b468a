"""`rkllm-chat`: a small terminal chat with an rkllm-runtime server (history kept, replies streamed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from rkllm_runtime.client import RkllmClient, RkllmClientError

COMMANDS = "/clear starts a new conversation, /quit (or end of input) leaves"


def chat_loop(client: RkllmClient, stdin: TextIO, stdout: TextIO, system: str | None = None) -> int:
    history: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    base = len(history)
    stdout.write(f"Connected. {COMMANDS}.\n")
    while True:
        stdout.write("> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/clear":
            del history[base:]
            continue
        history.append({"role": "user", "content": text})
        reply = []
        try:
            for piece in client.chat(history, stream=True):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except (RkllmClientError, OSError) as exc:
            history.pop()
            stdout.write(f"\n[error] {exc}\n")
            continue
        stdout.write("\n")
        # Sent back verbatim so the server can continue the conversation from its KV cache.
        history.append({"role": "assistant", "content": "".join(reply)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkllm-chat", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server or balancer base URL")
    parser.add_argument("--model", default="auto", help="model name, or auto (the server routes)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a reply")
    args = parser.parse_args(argv)
    with RkllmClient(args.url, model=args.model, timeout=args.timeout) as client:
        return chat_loop(client, sys.stdin, sys.stdout, args.system)
