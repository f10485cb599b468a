"""Ollama's model management (pull, create, copy, push, delete, blobs) and its root probe.

Models reach a board through Ansible (the rkllm_models role checks and converts them), never
through the API: each of these answers in Ollama's shape with what to do instead. A pull of a model
the board already has succeeds without doing anything, so that scripts which pull before use work.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import ApiError
from rkllm_runtime.api.ollama_shapes import OllamaStatus
from rkllm_runtime.api.plumbing import dumps, scheduler_of
from rkllm_runtime.routing import AUTO_MODEL, LATEST_TAG

router = APIRouter(prefix="/api")
root_router = APIRouter()

# What Ollama answers on / ; clients and UIs probe it (GET or HEAD) to find a running server.
RUNNING = "Ollama is running"
HOW_MODELS_ARRIVE = (
    "models are installed by the operator with Ansible (role rkllm_models: add the model to "
    "rkllm_models_enabled and run site.yml)"
)


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None
    stream: bool = True
    insecure: bool | None = None


def _installed(request: Request) -> list[str]:
    return [AUTO_MODEL, *(m.name for m in scheduler_of(request).config.models)]


def _refusal(request: Request, action: str) -> ApiError:
    installed = ", ".join(_installed(request))
    return ApiError(
        403, f"{action} is not available on this server: {HOW_MODELS_ARRIVE}. Installed: {installed}"
    )


@root_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    return PlainTextResponse(RUNNING)


@router.post(
    "/pull",
    response_model=None,
    openapi_extra=json_body(PullRequest),
    responses=RESPONSE_SHAPES.answer(OllamaStatus, OllamaStatus, "application/x-ndjson"),
)
async def pull(request: Request) -> Response:
    body = await read_json(request, PullRequest)
    name = body.model or body.name or ""
    if name not in _installed(request) and name.removesuffix(LATEST_TAG) not in _installed(request):
        raise _refusal(request, f"pulling {name!r}")
    success: OllamaStatus = {"status": "success"}
    if body.stream:
        return Response((dumps(success) + "\n").encode(), media_type="application/x-ndjson")
    return JSONResponse(success)


@router.post("/create", include_in_schema=False)
async def create(request: Request) -> Response:
    raise _refusal(request, "creating a model")


@router.post("/copy", include_in_schema=False)
async def copy(request: Request) -> Response:
    raise _refusal(request, "copying a model")


@router.post("/push", include_in_schema=False)
async def push(request: Request) -> Response:
    raise _refusal(request, "pushing a model")


@router.delete("/delete", include_in_schema=False)
async def delete(request: Request) -> Response:
    raise _refusal(request, "deleting a model (remove it from rkllm_models_enabled instead)")


@router.api_route("/blobs/{digest}", methods=["HEAD", "POST"], include_in_schema=False)
async def blobs(request: Request, digest: str) -> Response:
    raise _refusal(request, "uploading model blobs")
