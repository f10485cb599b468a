"""Errors as each API family shapes them; no request ever gets a traceback or an HTML page.

OpenAI routes (/v1/...) answer {"error": {"message", "type", "param", "code"}}; Ollama routes
(/api/...) and everything else answer {"error": "..."}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rkllm_runtime.api.ollama_shapes import OllamaError
from rkllm_runtime.api.openai_shapes import OpenAIError
from rkllm_runtime.registry import ModelUnavailableError
from rkllm_runtime.routing import UnknownModelError
from rkllm_runtime.scheduler import AdmissionRefusedError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    retry_after: int | None = None

    def __str__(self) -> str:
        return self.message


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# A board whose model cannot be loaded answers 503: the balancer then tries another board.
MODEL_UNAVAILABLE_RETRY_AFTER = 5


def domain_error(exc: UnknownModelError | AdmissionRefusedError | ModelUnavailableError) -> ApiError:
    """The one place where the scheduler's and the router's refusals become HTTP answers."""
    if isinstance(exc, UnknownModelError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, AdmissionRefusedError):
        return ApiError(503, str(exc), code=exc.code, retry_after=exc.retry_after)
    return ApiError(
        503, str(exc), code="model_unavailable", retry_after=MODEL_UNAVAILABLE_RETRY_AFTER
    )


def openai_error(error: ApiError) -> OpenAIError:
    return {
        "error": {
            "message": error.message,
            "type": _TYPES.get(error.status, "server_error"),
            "param": error.param,
            "code": error.code,
        }
    }


def ollama_error(error: ApiError) -> OllamaError:
    return {"error": error.message}


def error_response(path: str, error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    body = openai_error(error) if path.startswith("/v1/") else ollama_error(error)
    return JSONResponse(body, status_code=error.status, headers=headers)


def sse_error_event(error: ApiError) -> bytes:
    """A mid-stream failure, as an OpenAI stream carries it: one data event with an error object."""
    return f"data: {json.dumps(openai_error(error))}\n\n".encode()


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnknownModelError | AdmissionRefusedError | ModelUnavailableError)
    return error_response(request.url.path, domain_error(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    path, method = request.url.path, request.method
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no endpoint {method} {path}; this server has: {', '.join(endpoints(request, path))}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"{method} is not supported on {path}; use {allowed}"
    return error_response(path, ApiError(exc.status_code, message))


def endpoints(request: Request, path: str) -> list[str]:
    """The documented endpoints (the OpenAPI document's) of path's API family (/v1/ or /api/),
    else every one."""
    family = next((prefix for prefix in ("/v1/", "/api/") if path.startswith(prefix)), "/")
    documented: dict[str, dict[str, object]] = request.app.openapi()["paths"]
    return [
        f"{method.upper()} {route}"
        for route, operations in documented.items()
        if route.startswith(family)
        for method in operations
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(request.url.path, bad_request(f"{param or 'body'}: {first['msg']}", param))


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    UnknownModelError: _domain_error,
    AdmissionRefusedError: _domain_error,
    ModelUnavailableError: _domain_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
}


class CatchAllMiddleware:
    """Any unexpected exception becomes a 500 in the API's shape; the traceback goes to the log only.

    A client that disconnects is not an error: it is neither logged as one nor counted.

    (Starlette's own last-resort handler re-raises after answering, and uvicorn then resets the
    connection, so the client might never read the answer.)
    """

    def __init__(self, app: ASGIApp, on_error: Callable[[], None]) -> None:
        self.app = app
        self._on_error = on_error  # counts the failure (metrics), whatever happens to the answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            # The client left (e.g. while sending its body): nobody is there to answer, nothing failed.
            log.info("client disconnected from %s before the answer", scope.get("path"))
        except Exception as exc:
            log.exception("unexpected error on %s", scope.get("path"))
            self._on_error()
            if started:
                raise  # the answer is half sent: only closing the connection is left
            error = ApiError(500, f"internal error: {type(exc).__name__}")
            await error_response(scope.get("path", ""), error)(scope, receive, send)
