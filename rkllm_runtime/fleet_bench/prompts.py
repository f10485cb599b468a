"""The fixed prompt set. The first prompt is about 128 tokens (~512 bytes of English), like the
published RK3588 figures (128-token prompt, 64 new tokens); the others cover a short chat turn and
a longer context."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchPrompt:
    name: str
    text: str


_CONTEXT = (
    "An RK3588 board runs a language model on its three-core NPU. The runtime loads a model converted "
    "with the RKLLM toolkit, prefills the prompt, then decodes one token at a time. Prefill speed "
    "depends on the NPU clock; decode speed depends mostly on memory bandwidth, so DDR frequency and "
    "the width of the memory bus matter. "
)

PROMPTS: tuple[BenchPrompt, ...] = (
    BenchPrompt("published-128", _CONTEXT + "Requests reach the boards through an nginx balancer that picks "
                "the least busy board, and every board keeps its model loaded in NPU memory. "
                "Summarise this in two sentences."),
    BenchPrompt("short-chat", "Name three uses of a small on-device language model."),
    BenchPrompt("long-context", _CONTEXT * 6 + "List every factor above that affects decode speed."),
)
