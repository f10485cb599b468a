"""What the OpenAI-compatible routes answer: chat completions and their stream chunks, legacy text
completions, the model list, embeddings and error bodies (field names and meanings as OpenAI's API
reference gives them). The routes build these; tests validate real answers against them.
"""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict  # pydantic reads typing.TypedDict from 3.12 on

from rkllm_runtime.api.output import FinishReason


class OpenAIModel(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class OpenAIModelList(TypedDict):
    object: Literal["list"]
    data: list[OpenAIModel]


class PromptTokensDetails(TypedDict):
    cached_tokens: int


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class FunctionCallOut(TypedDict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCallOut(TypedDict):
    """A tool call in a whole answer's message."""

    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ToolCallChunk(ToolCallOut):
    """A tool call in a stream chunk: index numbers the calls across the whole stream."""

    index: int


class ChatCompletionMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None  # None when the answer is tool calls only
    reasoning_content: NotRequired[str]
    tool_calls: NotRequired[list[ToolCallOut]]


class ChatCompletionChoice(TypedDict):
    index: int
    message: ChatCompletionMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChatCompletionDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str
    reasoning_content: str
    tool_calls: list[ToolCallChunk]


class ChatCompletionChunkChoice(TypedDict):
    index: int
    delta: ChatCompletionDelta
    logprobs: None
    finish_reason: FinishReason | None


class ChatCompletionChunk(TypedDict):
    """One `data:` event of a chat stream; the last one before [DONE] may carry usage and no choice."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: NotRequired[CompletionUsage]


class TextCompletionChoice(TypedDict):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason | None


class TextCompletion(TypedDict):
    """A legacy /v1/completions answer, whole or (object unchanged) one stream chunk of it."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: NotRequired[CompletionUsage]


class OpenAIEmbedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (encoding_format="base64")


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingList(TypedDict):
    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: EmbeddingUsage


class OpenAIErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(TypedDict):
    """Every /v1/ error answer, and an error event in the middle of a stream."""

    error: OpenAIErrorDetail
