"""Embedding routes: OpenAI POST /v1/embeddings, Ollama POST /api/embed and the legacy /api/embeddings.

Every input is one hidden-layer run (RKLLM_INFER_GET_LAST_HIDDEN_LAYER), pooled as the model is
configured (embedding_pooling) and L2-normalised (rkllm_runtime.embedding). All inputs of one call
are one job: admitted once into the model's FIFO (a full queue is the same 503 as for generations)
and run back to back, never interleaved with a generation. Chat models serve embeddings too, with
their configured pooling; a model of kind "embedding" serves nothing else.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import bad_request, domain_error
from rkllm_runtime.api.generation import run_error
from rkllm_runtime.api.ollama_answer import NS
from rkllm_runtime.api.ollama_shapes import OllamaEmbed, OllamaEmbedding
from rkllm_runtime.api.openai_shapes import OpenAIEmbeddingList
from rkllm_runtime.api.plumbing import dumps, scheduler_of, until_disconnect
from rkllm_runtime.config import ModelConfig, ServerConfig
from rkllm_runtime.embedding import to_base64, to_json_array
from rkllm_runtime.errors import RkllmError
from rkllm_runtime.registry import ModelUnavailableError
from rkllm_runtime.routing import AUTO_MODEL, resolve_model
from rkllm_runtime.scheduler import (
    ContextOverflowError,
    EmbeddingBatch,
    check_context,
    estimate_tokens,
)

router = APIRouter()

# OpenAI's own limit on inputs per request.
MAX_EMBEDDING_INPUTS = 2048


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenAIEmbeddingRequest(_Request):
    model: str
    input: str | list[Any]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class OllamaEmbedRequest(_Request):
    model: str
    input: str | list[Any] = ""
    truncate: bool = True
    dimensions: int | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


class OllamaEmbeddingsRequest(_Request):
    model: str
    prompt: str = ""
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None


def input_texts(value: str | list[Any], param: str) -> list[str]:
    """The texts to embed; token-id arrays and non-strings are a clear 400."""
    items = [value] if isinstance(value, str) else value
    if not items:
        raise bad_request(f"{param}: give at least one text", param=param)
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"{param}: at most {MAX_EMBEDDING_INPUTS} texts per request", param=param)
    for index, item in enumerate(items):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise bad_request(
                f"{param}: token-id arrays are not supported (the NPU runtime tokenizes itself and this "
                "server cannot map ids of another tokenizer); send the text as a string or a list of strings",
                param=param,
                code="unsupported_value",
            )
        if not isinstance(item, str):
            raise bad_request(f"{param}[{index}] must be a string", param=param)
        if not item:
            raise bad_request(f"{param}[{index}] is empty; every text must have content", param=param)
    return list(items)


def embedding_model(config: ServerConfig, requested: str) -> ModelConfig:
    """The named model; "auto" picks the first model of kind embedding, else the quick chat model."""
    if requested == AUTO_MODEL:
        dedicated = next((m for m in config.models if m.kind == "embedding"), None)
        if dedicated is not None:
            return dedicated
        return resolve_model(config, AUTO_MODEL, False, "")
    return resolve_model(config, requested, None, "")


def check_dimensions(
    request: Request, model: ModelConfig, dimensions: int | None, produced: int | None
) -> None:
    """The runtime returns the model's hidden size; no other dimension can be served."""
    size = produced or scheduler_of(request).embedding_sizes.get(model.name)
    if dimensions is None or size is None or dimensions == size:
        return
    raise bad_request(
        f"dimensions={dimensions} is not available: model {model.name} returns {size}-dimensional "
        f"embeddings (its hidden size); omit dimensions or send {size}",
        param="dimensions",
        code="unsupported_value",
    )


def fit_context(model: ModelConfig, texts: list[str], truncate: bool, param: str) -> list[str]:
    """Refuse (or, if asked, cut) texts that cannot fit the model's context, before any work."""
    fitted = []
    for index, text in enumerate(texts):
        if truncate and estimate_tokens(text, model.bytes_per_token) >= model.context_length:
            limit = int((model.context_length - 1) * model.bytes_per_token)
            text = text.encode()[:limit].decode("utf-8", errors="ignore")
        try:
            check_context(model, text)
        except ContextOverflowError as exc:
            message = f"{param}[{index}]: {exc}"
            raise bad_request(message, param=param, code="context_length_exceeded") from exc
        fitted.append(text)
    return fitted


async def embed_texts(request: Request, model: ModelConfig, texts: list[str]) -> EmbeddingBatch:
    """Admit once (503 when the queue is full), wait for the turn, embed every text in order."""
    arrived = time.monotonic()
    scheduler = scheduler_of(request)
    ticket = scheduler.admit(model.name)
    try:
        return await until_disconnect(request, scheduler.embed(ticket, model.name, texts, arrived))
    except ModelUnavailableError as exc:
        scheduler.metrics.rejected.labels(model.name, "model_unavailable").inc()
        raise domain_error(exc) from exc
    except RkllmError as exc:
        raise run_error(exc) from exc
    finally:
        ticket.release()  # idempotent; covers a task cancelled before it ever waited


def _json(text: str) -> Response:
    return Response(text, media_type="application/json")


def _object(fields: dict[str, str]) -> str:
    """A JSON object from already-encoded values (vectors are encoded by to_json_array, not dumps)."""
    return "{" + ",".join(f"{dumps(key)}:{value}" for key, value in fields.items()) + "}"


@router.post(
    "/v1/embeddings",
    response_model=None,
    openapi_extra=json_body(OpenAIEmbeddingRequest),
    responses=RESPONSE_SHAPES.answer(OpenAIEmbeddingList),
)
async def openai_embeddings(request: Request) -> Response:
    body = await read_json(request, OpenAIEmbeddingRequest)
    model = embedding_model(scheduler_of(request).config, body.model)
    encoding: Literal["float", "base64"]
    if body.encoding_format == "float":
        encoding = "float"
    elif body.encoding_format == "base64":
        encoding = "base64"
    else:
        raise bad_request(
            f"encoding_format={body.encoding_format!r} is not supported; use 'float' or 'base64'",
            param="encoding_format",
            code="unsupported_value",
        )
    texts = fit_context(model, input_texts(body.input, "input"), False, "input")
    check_dimensions(request, model, body.dimensions, None)
    batch = await embed_texts(request, model, texts)
    check_dimensions(request, model, body.dimensions, len(batch.vectors[0]))
    data = ",".join(
        _object(
            {
                "object": '"embedding"',
                "index": str(index),
                "embedding": dumps(to_base64(vector)) if encoding == "base64" else to_json_array(vector),
            }
        )
        for index, vector in enumerate(batch.vectors)
    )
    usage = {"prompt_tokens": batch.prompt_tokens, "total_tokens": batch.prompt_tokens}
    return _json(
        _object({"object": '"list"', "data": f"[{data}]", "model": dumps(model.name), "usage": dumps(usage)})
    )


@router.post(
    "/api/embed",
    response_model=None,
    openapi_extra=json_body(OllamaEmbedRequest),
    responses=RESPONSE_SHAPES.answer(OllamaEmbed),
)
async def ollama_embed(request: Request) -> Response:
    started = time.monotonic()
    body = await read_json(request, OllamaEmbedRequest)
    model = embedding_model(scheduler_of(request).config, body.model)
    if body.input in ("", []):
        # Ollama answers an empty input with no embeddings (and no work).
        return _json(dumps({"model": model.name, "embeddings": []}))
    texts = fit_context(model, input_texts(body.input, "input"), body.truncate, "input")
    check_dimensions(request, model, body.dimensions, None)
    batch = await embed_texts(request, model, texts)
    check_dimensions(request, model, body.dimensions, len(batch.vectors[0]))
    return _json(
        _object(
            {
                "model": dumps(model.name),
                "embeddings": "[" + ",".join(to_json_array(vector) for vector in batch.vectors) + "]",
                "total_duration": str(int((time.monotonic() - started) * NS)),
                "load_duration": str(int(batch.load_seconds * NS)),
                "prompt_eval_count": str(batch.prompt_tokens),
            }
        )
    )


@router.post(
    "/api/embeddings",
    response_model=None,
    openapi_extra=json_body(OllamaEmbeddingsRequest),
    responses=RESPONSE_SHAPES.answer(OllamaEmbedding),
)
async def ollama_embeddings(request: Request) -> Response:
    """Ollama's older single-text endpoint: prompt in, embedding out."""
    body = await read_json(request, OllamaEmbeddingsRequest)
    model = embedding_model(scheduler_of(request).config, body.model)
    if not body.prompt:
        return _json(dumps({"embedding": []}))
    texts = fit_context(model, [body.prompt], True, "prompt")
    batch = await embed_texts(request, model, texts)
    return _json(_object({"embedding": to_json_array(batch.vectors[0])}))
