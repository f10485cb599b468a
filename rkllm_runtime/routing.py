"""Which configured model serves a request: names, Ollama's ":latest" tag, and "auto"."""

from __future__ import annotations

from rkllm_runtime.config import ModelConfig, ServerConfig

AUTO_MODEL = "auto"
# Ollama's default tag: "qwen:latest" names the same model as "qwen" (nginx strips it too).
LATEST_TAG = ":latest"


class UnknownModelError(LookupError):
    """The request names a model this server does not have."""

    def __init__(self, requested: str, known: list[str]) -> None:
        super().__init__(f"model {requested!r} not found; this server has: {', '.join(known)}")


def resolve_model(
    config: ServerConfig, requested: str, wants_reasoning: bool | None, text: str
) -> ModelConfig:
    """The configured model a request names; "auto" picks the quick or the reasoning model."""
    name = requested
    if requested in (AUTO_MODEL, AUTO_MODEL + LATEST_TAG):
        rules = config.routing
        if wants_reasoning is None:
            lowered = text.lower()
            wants_reasoning = any(k.lower() in lowered for k in rules.reasoning_keywords) or (
                rules.reasoning_min_chars > 0 and len(text) >= rules.reasoning_min_chars
            )
        kind = "reasoning" if wants_reasoning else "quick"
        preferred = config.model(rules.reasoning if wants_reasoning else rules.quick)
        # A node without the preferred model serves with a model of the same kind, else any model.
        same_kind = next((m for m in config.models if m.kind == kind), None)
        fallback = preferred or same_kind or (config.models[0] if config.models else None)
        name = fallback.name if fallback else requested
    model = config.model(name) or config.model(name.removesuffix(LATEST_TAG))
    if model is None:
        raise UnknownModelError(requested, [AUTO_MODEL, *(m.name for m in config.models)])
    return model
