"""The answer of one chat or text completion, built against its declared shape (openai_shapes): whole,
or as the chunks of its stream."""

from __future__ import annotations

import time
import uuid

from rkllm_runtime.api.openai_shapes import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    CompletionUsage,
    TextCompletion,
    TextCompletionChoice,
    ToolCallChunk,
    ToolCallOut,
)
from rkllm_runtime.api.output import Delta, Outcome
from rkllm_runtime.chat import ToolCall


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _usage(outcome: Outcome) -> CompletionUsage:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _tool_call(call: ToolCall) -> ToolCallOut:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_chunks(calls: list[ToolCall], first_index: int) -> list[ToolCallChunk]:
    return [{"index": first_index + i, **_tool_call(c)} for i, c in enumerate(calls)]


class ChatAnswer:
    """The chat completion of one request: whole, or as stream chunks."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = _completion_id("chatcmpl"), int(time.time()), model

    def _chunk(self, choices: list[ChatCompletionChunkChoice]) -> ChatCompletionChunk:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def first_chunk(self) -> ChatCompletionChunk | None:
        opening: ChatCompletionDelta = {"role": "assistant", "content": ""}
        return self._chunk([{"index": 0, "delta": opening, "logprobs": None, "finish_reason": None}])

    def delta_chunk(self, delta: Delta, tool_index: int) -> ChatCompletionChunk:
        out: ChatCompletionDelta = {}
        if delta.content:
            out["content"] = delta.content
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.tool_calls:
            out["tool_calls"] = _tool_call_chunks(delta.tool_calls, tool_index)
        return self._chunk([{"index": 0, "delta": out, "logprobs": None, "finish_reason": None}])

    def final_chunk(self, outcome: Outcome) -> ChatCompletionChunk:
        reason = outcome.finish_reason
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage_chunk(self, outcome: Outcome) -> ChatCompletionChunk:
        chunk = self._chunk([])
        chunk["usage"] = _usage(outcome)
        return chunk

    def whole(self, total: Delta, outcome: Outcome) -> ChatCompletion:
        message: ChatCompletionMessage = {"role": "assistant", "content": total.content or None}
        if total.reasoning:
            message["reasoning_content"] = total.reasoning
        if total.tool_calls:
            message["tool_calls"] = [_tool_call(call) for call in total.tool_calls]
        elif message["content"] is None:
            message["content"] = ""
        choice: ChatCompletionChoice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": outcome.finish_reason,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": _usage(outcome),
        }


class TextAnswer:
    """The legacy text completion of one request: whole, or as stream chunks of the same object."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = _completion_id("cmpl"), int(time.time()), model

    def _completion(self, choices: list[TextCompletionChoice]) -> TextCompletion:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def first_chunk(self) -> TextCompletion | None:
        return None

    def delta_chunk(self, delta: Delta, tool_index: int) -> TextCompletion:
        text = delta.reasoning + delta.content
        return self._completion([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def final_chunk(self, outcome: Outcome) -> TextCompletion:
        return self._completion(
            [{"index": 0, "text": "", "logprobs": None, "finish_reason": outcome.finish_reason}]
        )

    def usage_chunk(self, outcome: Outcome) -> TextCompletion:
        chunk = self._completion([])
        chunk["usage"] = _usage(outcome)
        return chunk

    def whole(self, total: Delta, outcome: Outcome) -> TextCompletion:
        text, reason = total.reasoning + total.content, outcome.finish_reason
        whole = self._completion([{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])
        whole["usage"] = _usage(outcome)
        return whole


Answer = ChatAnswer | TextAnswer
