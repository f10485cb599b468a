"""Ollama's answers, built against their declared shapes (ollama_shapes): model listings, and the
lines of a chat or generate run (durations in ns, times in RFC 3339)."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from rkllm_runtime.api.generation import Generation
from rkllm_runtime.api.ollama_shapes import (
    OllamaChatDone,
    OllamaChatLine,
    OllamaChatLoaded,
    OllamaChatMessage,
    OllamaGenerateDone,
    OllamaGenerateLine,
    OllamaGenerateLoaded,
    OllamaModel,
    OllamaModelDetails,
    OllamaRunStats,
)
from rkllm_runtime.api.output import Delta, Outcome
from rkllm_runtime.config import ModelConfig
from rkllm_runtime.routing import AUTO_MODEL
from rkllm_runtime.scheduler import Job

NS = 1_000_000_000
_PARAMETER_SIZE = re.compile(r"(\d+(?:\.\d+)?[BM])\b")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def model_details(model: ModelConfig) -> OllamaModelDetails:
    family = model.name.split("-")[0].lower()
    size = _PARAMETER_SIZE.search(model.name)
    return {
        "parent_model": "",
        "format": "rkllm",
        "family": family,
        "families": [family],
        "parameter_size": size.group(1) if size else "",
        "quantization_level": "W8A8",  # the only RKLLM quantisation the RK3588 NPU runs
    }


def _file_facts(model: ModelConfig) -> tuple[int, str]:
    try:
        stat = Path(model.path).stat()
    except OSError:
        return 0, _now()
    return stat.st_size, datetime.fromtimestamp(stat.st_mtime, UTC).isoformat().replace("+00:00", "Z")


def model_entry(model: ModelConfig) -> OllamaModel:
    size, modified = _file_facts(model)
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": modified,
        "size": size,
        "digest": model.sha256,
        "details": model_details(model),
    }


def auto_entry() -> OllamaModel:
    """Listed so that clients validating a name against /api/tags accept it (langchain-ollama)."""
    details: OllamaModelDetails = {
        "parent_model": "",
        "format": "rkllm",
        "family": AUTO_MODEL,
        "families": [AUTO_MODEL],
        "parameter_size": "",
        "quantization_level": "",
    }
    return {
        "name": AUTO_MODEL,
        "model": AUTO_MODEL,
        "modified_at": _now(),
        "size": 0,
        "digest": "",
        "details": details,
    }


def progress_line(model: str, delta: Delta, chat: bool) -> OllamaChatLine | OllamaGenerateLine:
    return _chat_line(model, delta) if chat else _generate_line(model, delta)


def _generate_line(model: str, delta: Delta) -> OllamaGenerateLine:
    generated: OllamaGenerateLine = {
        "model": model,
        "created_at": _now(),
        "response": delta.content,
        "done": False,
    }
    if delta.reasoning:
        generated["thinking"] = delta.reasoning
    return generated


def _chat_line(model: str, delta: Delta) -> OllamaChatLine:
    message: OllamaChatMessage = {"role": "assistant", "content": delta.content}
    if delta.reasoning:
        message["thinking"] = delta.reasoning
    if delta.tool_calls:
        message["tool_calls"] = [
            {"function": {"name": c.name, "arguments": json.loads(c.arguments)}} for c in delta.tool_calls
        ]
    return {"model": model, "created_at": _now(), "message": message, "done": False}


def final_line(
    generation: Generation, outcome: Outcome, job: Job, chat: bool, total: Delta | None = None
) -> OllamaChatDone | OllamaGenerateDone:
    stats: OllamaRunStats = {
        "done_reason": "length" if outcome.finish_reason == "length" else "stop",
        "total_duration": int((time.monotonic() - job.arrived) * NS),
        "load_duration": int(generation.load_seconds * NS),
        "prompt_eval_count": outcome.prompt_tokens - outcome.cached_tokens,
        "prompt_eval_duration": int(outcome.prefill_seconds * NS),
        "eval_count": outcome.completion_tokens,
        "eval_duration": int(outcome.generate_seconds * NS),
    }
    total = total or Delta()
    if chat:
        chat_done: OllamaChatDone = {**_chat_line(generation.model, total), **stats, "done": True}
        return chat_done
    generate_done: OllamaGenerateDone = {**_generate_line(generation.model, total), **stats, "done": True}
    return generate_done


def loaded_reply(
    model: str, reason: Literal["load", "unload"], chat: bool
) -> OllamaChatLoaded | OllamaGenerateLoaded:
    if chat:
        message: OllamaChatMessage = {"role": "assistant", "content": ""}
        chat_loaded: OllamaChatLoaded = {
            "model": model,
            "created_at": _now(),
            "message": message,
            "done": True,
            "done_reason": reason,
        }
        return chat_loaded
    return {"model": model, "created_at": _now(), "response": "", "done": True, "done_reason": reason}
