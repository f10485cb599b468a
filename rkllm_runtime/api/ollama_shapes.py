"""What the Ollama-compatible routes answer (field names and meanings as Ollama's API documents them;
durations in nanoseconds, times in RFC 3339). The routes build these; tests validate real answers
against them.
"""

from __future__ import annotations

from typing import Literal, NotRequired

from typing_extensions import TypedDict  # pydantic reads typing.TypedDict from 3.12 on


class OllamaVersion(TypedDict):
    version: str
    rkllm_runtime: str  # this server's own version, beside the Ollama version it speaks


class OllamaModelDetails(TypedDict):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class OllamaModel(TypedDict):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: OllamaModelDetails


class OllamaTags(TypedDict):
    models: list[OllamaModel]


class OllamaLoadedModel(OllamaModel):
    expires_at: str
    size_vram: int
    context_length: int


class OllamaRunning(TypedDict):
    models: list[OllamaLoadedModel]


# Keys as Ollama writes them: GGUF metadata names, dotted (hence the functional form).
OllamaModelInfo = TypedDict(
    "OllamaModelInfo", {"general.architecture": str, "rkllm.context_length": int}
)


class OllamaShow(TypedDict):
    modelfile: str
    parameters: str
    template: str
    details: OllamaModelDetails
    capabilities: list[str]
    model_info: OllamaModelInfo


class OllamaFunctionCall(TypedDict):
    name: str
    arguments: dict[str, object]


class OllamaToolCall(TypedDict):
    function: OllamaFunctionCall


class OllamaChatMessage(TypedDict):
    role: Literal["assistant"]
    content: str
    thinking: NotRequired[str]
    tool_calls: NotRequired[list[OllamaToolCall]]


class OllamaChatLine(TypedDict):
    """One line of a /api/chat stream before the last."""

    model: str
    created_at: str
    message: OllamaChatMessage
    done: bool


class OllamaGenerateLine(TypedDict):
    """One line of a /api/generate stream before the last."""

    model: str
    created_at: str
    response: str
    done: bool
    thinking: NotRequired[str]


class OllamaRunStats(TypedDict):
    done_reason: Literal["stop", "length"]
    total_duration: int
    load_duration: int
    prompt_eval_count: int  # prompt tokens not served from the KV cache
    prompt_eval_duration: int
    eval_count: int
    eval_duration: int


class OllamaChatDone(OllamaChatLine, OllamaRunStats):
    """The last line of a /api/chat stream, or the whole non-streamed answer."""


class OllamaGenerateDone(OllamaGenerateLine, OllamaRunStats):
    """The last line of a /api/generate stream, or the whole non-streamed answer."""


class OllamaChatLoaded(OllamaChatLine):
    """/api/chat without messages: the model was loaded (or, with keep_alive 0, unloaded)."""

    done_reason: Literal["load", "unload"]


class OllamaGenerateLoaded(OllamaGenerateLine):
    """/api/generate without a prompt: the model was loaded (or, with keep_alive 0, unloaded)."""

    done_reason: Literal["load", "unload"]


class OllamaEmbed(TypedDict):
    model: str
    embeddings: list[list[float]]
    # Absent when the input was empty (nothing was run).
    total_duration: NotRequired[int]
    load_duration: NotRequired[int]
    prompt_eval_count: NotRequired[int]


class OllamaEmbedding(TypedDict):
    """The older /api/embeddings answer: one vector (empty for an empty prompt)."""

    embedding: list[float]


class OllamaStatus(TypedDict):
    status: str


class OllamaError(TypedDict):
    """Every error answer outside /v1/, and an error line in the middle of an NDJSON stream."""

    error: str
