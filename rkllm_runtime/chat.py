"""Chat templates, and the parsing of model output into content, reasoning and tool calls.

The server renders whole conversations itself (the runtime's own template is switched off with
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


@dataclass(frozen=True)
class ChatTemplate:
    """Literal (prefix, suffix) strings around each role's turn."""

    name: str
    bos: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    tool: tuple[str, str]
    drop_history_thinking: bool = False  # models trained without earlier turns' reasoning

    def render(self, messages: Sequence[Message], default_system: str = "") -> str:
        parts = [self.bos]
        if default_system and not any(m.role == "system" for m in messages):
            parts.append(self._wrap("system", default_system))
        for message in messages:
            text = message.content
            if message.role == "assistant":
                if self.drop_history_thinking:
                    text = drop_thinking(text)
                text = "\n".join([text, *(_render_tool_call(c) for c in message.tool_calls)]).lstrip("\n")
            parts.append(self._wrap(message.role, text))
        parts.append(self.assistant[0])
        return "".join(parts)

    def _wrap(self, role: Role, text: str) -> str:
        prefix, suffix = getattr(self, role)
        return f"{prefix}{text}{suffix}"


BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "chatml": ChatTemplate(
        name="chatml",
        bos="",
        system=("<|im_start|>system\n", "<|im_end|>\n"),
        user=("<|im_start|>user\n", "<|im_end|>\n"),
        assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
        tool=("<|im_start|>user\n<tool_response>\n", "\n</tool_response><|im_end|>\n"),
    ),
    "deepseek-r1": ChatTemplate(
        name="deepseek-r1",
        bos="<｜begin▁of▁sentence｜>",  # noqa: RUF001
        system=("", ""),
        user=("<｜User｜>", ""),  # noqa: RUF001
        assistant=("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),  # noqa: RUF001
        tool=("<｜User｜><tool_response>\n", "\n</tool_response>"),  # noqa: RUF001
        drop_history_thinking=True,
    ),
    # Phi-3 (mini/small/medium instruct). No BOS text: like the model's own Hugging Face template,
    # it leaves <s> to the tokenizer. Phi-3 has no tool role, so results come back in a user turn.
    "phi3": ChatTemplate(
        name="phi3",
        bos="",
        system=("<|system|>\n", "<|end|>\n"),
        user=("<|user|>\n", "<|end|>\n"),
        assistant=("<|assistant|>\n", "<|end|>\n"),
        tool=("<|user|>\n<tool_response>\n", "\n</tool_response><|end|>\n"),
    ),
}


def _render_tool_call(call: ToolCall) -> str:
    try:
        arguments: object = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        arguments = call.arguments
    body = json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_OPEN}\n{body}\n{TOOL_CLOSE}"


def drop_thinking(text: str) -> str:
    head, sep, tail = text.rpartition(THINK_CLOSE)
    return tail.lstrip() if sep else head + tail


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
