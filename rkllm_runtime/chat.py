"""Conversations, and the parsing of model output into content, reasoning and tool calls.

The server renders whole conversations itself with the model's chat template
(rkllm_runtime/chat_templates.py; the runtime's own template is switched off with
set_chat_template("", "", "")) so that it knows the exact text held in a handle's KV cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool"]
Channel = Literal["content", "reasoning", "tool_call"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text (OpenAI's representation)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


def parse_tool_call(block: str, call_id: str) -> ToolCall | None:
    """A <tool_call> body as the model wrote it; None when it is not the expected JSON object."""
    try:
        data = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", {})
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=call_id, name=data["name"], arguments=text)


def _partial_tag_length(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into one of tags."""
    best = 0
    for tag in tags:
        for size in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:size]):
                best = size
                break
    return best


@dataclass
class OutputParser:
    """Splits streamed model text into channels; tags split across tokens are held back, never leaked."""

    separate_thinking: bool
    parse_tool_calls: bool
    _buffer: str = ""
    _channel: Channel = "content"
    _pieces: list[tuple[Channel, str]] = field(default_factory=list)

    def feed(self, text: str) -> list[tuple[Channel, str]]:
        self._buffer += text
        self._pieces = []
        while self._step():
            pass
        return self._pieces

    def close(self) -> list[tuple[Channel, str]]:
        """End of output: whatever is held back is emitted; an unclosed tool call stays visible text."""
        self._pieces = []
        if self._channel == "tool_call":
            self._emit("content", TOOL_OPEN + self._buffer)
        else:
            self._emit(self._channel, self._buffer)
        self._buffer = ""
        return self._pieces

    def _opening_tags(self) -> list[str]:
        tags = []
        if self.separate_thinking:
            tags.append(THINK_OPEN)
        if self.parse_tool_calls:
            tags.append(TOOL_OPEN)
        return tags

    def _step(self) -> bool:
        if self._channel == "content":
            tags = self._opening_tags()
            found = [(self._buffer.find(t), t) for t in tags if t in self._buffer]
            if not found:
                keep = _partial_tag_length(self._buffer, tags)
                self._emit("content", self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return False
            index, tag = min(found)
            self._emit("content", self._buffer[:index])
            self._buffer = self._buffer[index + len(tag) :]
            self._channel = "reasoning" if tag == THINK_OPEN else "tool_call"
            return True
        closing = THINK_CLOSE if self._channel == "reasoning" else TOOL_CLOSE
        index = self._buffer.find(closing)
        if index < 0:
            if self._channel == "reasoning":
                keep = _partial_tag_length(self._buffer, [closing])
                self._emit("reasoning", self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
            return False
        self._emit(self._channel, self._buffer[:index])
        self._buffer = self._buffer[index + len(closing) :]
        self._channel = "content"
        return True

    def _emit(self, channel: Channel, text: str) -> None:
        if text or channel == "tool_call":
            self._pieces.append((channel, text))


@dataclass
class StopMatcher:
    """Cuts the output at the first stop sequence, holding back text that may be the start of one."""

    stops: Sequence[str]
    _held: str = ""
    stopped: bool = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self._held += text
        hits = [i for i in (self._held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._held = self._held[: min(hits)], ""
            return out
        keep = _partial_tag_length(self._held, self.stops)
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out

    def close(self) -> str:
        out, self._held = self._held, ""
        return out


def tools_json(tools: Sequence[object]) -> str:
    return json.dumps(list(tools), ensure_ascii=False, separators=(",", ":"))
