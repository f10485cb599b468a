"""One client's row of the matrix: each feature run through the client and judged the same way."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

PASS = "pass"
REFUSAL = "clear refusal"
LACKING = "n/a"  # the client itself has no way to use the feature with a self-hosted server
FEATURES = ("chat", "stream", "multi-turn", "tools", "embeddings", "sampling", "queue-full", "structured")

# What the server's refusals say; a cell is a clear refusal only if the user sees these words.
QUEUE_FULL_WORDS = (("is busy", "retry in"),)
STRUCTURED_WORDS = (
    ("cannot constrain decoding", "ask for JSON in the prompt"),
    ("cannot force a tool call", "describe the required call"),
)

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
PROMPT = "Hello there"
HISTORY = [
    ("user", "My name is Ada and I live in Paris."),
    ("assistant", "Nice to meet you, Ada."),
    ("user", "Where do I live?"),
]


@dataclass(frozen=True)
class Target:
    url: str  # http://127.0.0.1:PORT
    model: str
    busy_model: str  # its only place is taken and it has no queue: every request is refused at once
    embedding_model: str
    vocabulary: tuple[str, ...]  # the fake model's tokens: every answer uses each of them once, in some order


class Client(Protocol):
    def chat(self, prompt: str) -> str: ...
    def stream(self, prompt: str) -> list[str]: ...
    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]: ...  # text, prompt tokens
    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]: ...
    def embed(self, texts: list[str]) -> list[list[float]]: ...
    def sampled_chat(self, prompt: str) -> str: ...
    def busy_chat(self, prompt: str) -> str: ...
    def structured(self, prompt: str) -> object: ...


class Broken(Exception):
    pass


class ClientLacks(Exception):
    pass


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Broken(what)


def is_whole_answer(text: str, target: Target) -> bool:
    """The double answers with each vocabulary token once; nothing lost, doubled or mangled on the way."""
    return sorted(text) == sorted("".join(target.vocabulary))


def check_chat(client: Client, target: Target) -> str:
    text = client.chat(PROMPT)
    expect(is_whole_answer(text, target), f"answer {text!r}")
    return PASS


def check_stream(client: Client, target: Target) -> str:
    pieces = client.stream(PROMPT)
    expect(len(pieces) > 1 and is_whole_answer("".join(pieces), target), f"pieces {pieces!r}")
    return PASS


def check_multi_turn(client: Client, target: Target) -> str:
    single_text, single_tokens = client.conversation(HISTORY[-1:])
    text, tokens = client.conversation(HISTORY)
    answers_whole = is_whole_answer(single_text, target) and is_whole_answer(text, target)
    expect(answers_whole, f"answers {single_text!r}, {text!r}")
    expect(tokens > single_tokens > 0, f"prompt tokens {tokens} with history, {single_tokens} without")
    return PASS


def check_tools(client: Client, target: Target) -> str:
    call = client.tool_call("What is the weather in Paris?")
    expect(call == ("get_weather", {"location": "Paris"}), f"tool call {call!r}")
    return PASS


def check_embeddings(client: Client, target: Target) -> str:
    vectors = client.embed(["first text", "second text"])
    expect(len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0, "two vectors of one size")
    expect(vectors[0] != vectors[1], "different texts, different vectors")
    norms = [math.sqrt(sum(x * x for x in vector)) for vector in vectors]
    expect(all(abs(norm - 1) < 1e-3 for norm in norms), f"L2 norms {norms}")
    return PASS


def check_sampling(client: Client, target: Target) -> str:
    text = client.sampled_chat(PROMPT)
    expect(is_whole_answer(text, target), f"answer {text!r}")
    return PASS


def refused_with(wordings: tuple[tuple[str, ...], ...], call: Callable[[], object]) -> str:
    try:
        answer = call()
    except Broken:
        raise
    except Exception as error:
        message = str(error)
        said = any(all(word in message for word in words) for words in wordings)
        expect(said, f"{type(error).__name__}: {message[:300]}")
        return REFUSAL
    raise Broken(f"answered {answer!r} instead of refusing")


def check_queue_full(client: Client, target: Target) -> str:
    return refused_with(QUEUE_FULL_WORDS, lambda: client.busy_chat(PROMPT))


def check_structured(client: Client, target: Target) -> str:
    return refused_with(STRUCTURED_WORDS, lambda: client.structured("Which city is in France?"))


CHECKS: dict[str, Callable[[Client, Target], str]] = {
    "chat": check_chat,
    "stream": check_stream,
    "multi-turn": check_multi_turn,
    "tools": check_tools,
    "embeddings": check_embeddings,
    "sampling": check_sampling,
    "queue-full": check_queue_full,
    "structured": check_structured,
}


def run_row(client: Client, target: Target) -> dict[str, Any]:
    """Every feature's outcome: pass, clear refusal, n/a, or "broken: <what happened>"."""
    cells: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for feature in FEATURES:
        started = time.monotonic()
        try:
            cells[feature] = CHECKS[feature](client, target)
        except ClientLacks:
            cells[feature] = LACKING
        except Exception as error:
            cells[feature] = f"broken: {type(error).__name__}: {str(error)[:400]}"
        seconds[feature] = round(time.monotonic() - started, 2)
    return {"cells": cells, "seconds": seconds}
