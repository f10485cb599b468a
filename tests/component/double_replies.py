"""What the C double (tests/fakelib) answers: its reply to a prompt is a function of the prompt alone."""

from __future__ import annotations

VOCAB = ["Hello", ",", " world", " é", " 世界", " 🙂", " NPU", " fleet", " token", " board", " rock", " chip"]


def fnv1a(data: bytes) -> int:
    value = 2166136261
    for byte in data:
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def expected_ids(prompt: str, tokens: int) -> list[int]:
    seed = fnv1a(prompt.encode())
    return [(seed + i * 7) % len(VOCAB) for i in range(tokens)]


def expected_reply(prompt: str, tokens: int) -> str:
    return "".join(VOCAB[token_id] for token_id in expected_ids(prompt, tokens))
