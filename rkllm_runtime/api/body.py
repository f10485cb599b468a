"""Request bodies: bounded in size and time, parsed off the event loop, checked, validated."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from rkllm_runtime.api.errors import ApiError, bad_request
from rkllm_runtime.api.plumbing import scheduler_of

M = TypeVar("M", bound=BaseModel)

# A whole body (at most max_body_bytes) must arrive within this; nginx sends it buffered, at once.
BODY_TIMEOUT_SECONDS = 30
# Tool parameter schemas are the deepest legitimate bodies: a dozen nested objects stay far below.
MAX_JSON_DEPTH = 64
_UNACCEPTABLE_CHARACTER = re.compile("[\0\ud800-\udfff]")
# JSON text can only carry those as escapes (raw control characters and invalid UTF-8 fail parsing).
_SUSPICIOUS_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """A route's openapi_extra declaring model as its JSON body (the route parses it with read_json,
    which bounds size, time and depth before validating against the same model)."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


async def read_json(request: Request, model: type[M]) -> M:
    """The body as a validated model; oversized, malformed or ill-typed bodies become 4xx ApiErrors.

    Parsing and validation run on a worker thread: the pure-Python parts of a large body (the
    string and depth walk) then share the CPU with the streams this event loop is serving.
    """
    limit = scheduler_of(request).config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_SECONDS):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ApiError(408, f"request body not received within {BODY_TIMEOUT_SECONDS} s") from exc
    return await asyncio.to_thread(parse_body, b"".join(chunks), model)


def parse_body(raw: bytes, model: type[M]) -> M:
    try:
        data = json.loads(raw or b"null", parse_constant=_refuse_constant)
    except RecursionError as exc:
        raise bad_request(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    # The precise walk (which names the offending field) costs ~100 ms on a 1 MB body of small
    # items, so it runs only when a cheap look says it will find something.
    if _SUSPICIOUS_ESCAPE.search(raw) or _nests_too_deep(data):
        check_json_values(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param or 'body'}: {first['msg']}", param=param) from exc


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def _nests_too_deep(data: dict[str, Any]) -> bool:
    level: list[Any] = [data]
    for _ in range(MAX_JSON_DEPTH):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def check_json_values(data: dict[str, Any]) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings the runtime cannot take as they are.

    The runtime receives C strings: a NUL would silently end the prompt there (and the KV-cache
    bookkeeping would record text the model never saw), and a lone surrogate has no UTF-8 form.
    Both are refused rather than rewritten, so the model always sees exactly what was sent.
    """
    pending: list[tuple[object, int, tuple[str | int, ...]]] = [(data, 1, ())]
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(
                    f"request body nests deeper than {MAX_JSON_DEPTH} levels", param=_param(path)
                )
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_string(key, path)
                pending.append((item, depth + 1, (*path, key)))


def _check_string(text: str, path: tuple[str | int, ...]) -> None:
    bad = _UNACCEPTABLE_CHARACTER.search(text)
    if bad is None:
        return
    if bad.group() == "\0":
        what = "a NUL character (U+0000): the runtime would cut the text there"
    else:
        what = f"a lone surrogate (U+{ord(bad.group()):04X}), which is not valid Unicode text"
    raise bad_request(
        f"{_param(path) or 'body'}: strings must not contain {what}",
        param=_param(path),
        code="invalid_string",
    )


def _param(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(p) for p in path) or None
