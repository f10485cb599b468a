"""The runtime's raw token text as API output: stop sequences, reasoning and tool calls split out."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from rkllm_runtime.chat import Channel, OutputParser, StopMatcher, ToolCall, parse_tool_call


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class Outcome:
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float
    generate_seconds: float


class OutputAssembler:
    """Stop sequences, then <think> and <tool_call> splitting, over the raw token text."""

    def __init__(self, separate_thinking: bool, parse_tool_calls: bool, stops: Sequence[str]) -> None:
        self._stop = StopMatcher(stops)
        self._parser = OutputParser(separate_thinking, parse_tool_calls)
        self._call_ids = (f"call_{uuid.uuid4().hex[:8]}_{i}" for i in itertools.count())
        self.tool_calls = 0

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def feed(self, text: str) -> Delta:
        return self._delta(self._parser.feed(self._stop.feed(text)))

    def close(self) -> Delta:
        return self._delta(self._parser.feed(self._stop.close()) + self._parser.close())

    def _delta(self, pieces: list[tuple[Channel, str]]) -> Delta:
        delta = Delta()
        for channel, text in pieces:
            if channel == "reasoning":
                delta.reasoning += text
            elif channel == "content":
                delta.content += text
            else:
                call = parse_tool_call(text, next(self._call_ids))
                if call is None:
                    delta.content += f"<tool_call>{text}</tool_call>"
                else:
                    delta.tool_calls.append(call)
                    self.tool_calls += 1
        return delta
