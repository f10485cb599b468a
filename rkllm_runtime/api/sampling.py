"""Sampling values a request sends against what the model's handle was initialised with."""

from __future__ import annotations

import math
from collections.abc import Mapping

from starlette.requests import Request

from rkllm_runtime.api.errors import bad_request
from rkllm_runtime.api.plumbing import scheduler_of
from rkllm_runtime.config import ModelConfig

SAMPLING_IGNORED_HEADER = "X-Rkllm-Sampling-Ignored"


def configured_sampling(model: ModelConfig) -> dict[str, float | None]:
    """What the model's handle was initialised with; None: the runtime has no such setting."""
    return {
        "temperature": model.temperature,
        "top_p": model.top_p,
        "top_k": model.top_k,
        "repeat_penalty": model.repeat_penalty,
        "presence_penalty": 0.0,  # the server initialises every handle without these two penalties
        "frequency_penalty": 0.0,
        "min_p": 0.0,  # librkllmrt has no min-p sampling: 0 (off) is what it does
        "seed": None,
    }


def apply_sampling_policy(
    request: Request, model: ModelConfig, requested: Mapping[str, float | int | None]
) -> dict[str, str]:
    """Sampling values the model does not run with; the response headers that say so.

    RKLLM fixes sampling at rkllm_init, and re-initialising per request would cost seconds of NPU
    load, drop the KV cache and change sampling for every request queued behind. So by default a
    request is generated with the model's configured sampling and told which values were not
    applied; a model configured with sampling = "strict" refuses them instead.
    """
    configured = configured_sampling(model)
    ignored = []
    for name, value in requested.items():
        wanted = configured[name]
        if value is not None and (
            wanted is None or not math.isclose(float(value), wanted, rel_tol=1e-6, abs_tol=1e-6)
        ):
            ignored.append(name)
    if not ignored:
        return {}
    if model.sampling == "strict":
        name = ignored[0]
        value = configured[name]
        runs_with = f"runs with {name}={value}" if value is not None else f"has no {name}"
        raise bad_request(
            f"{name}={requested[name]} is not available: the NPU runtime fixes sampling when the model "
            f"is loaded, and model {model.name} {runs_with}. Omit {name} or change the model's "
            "configuration.",
            param=name,
            code="unsupported_value",
        )
    counter = scheduler_of(request).metrics.sampling_ignored
    for name in ignored:
        counter.labels(model.name, name).inc()
    return {SAMPLING_IGNORED_HEADER: ",".join(ignored)}
