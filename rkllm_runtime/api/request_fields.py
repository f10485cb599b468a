"""Request fields both APIs share: tools, list bounds, and the refusals of what the NPU cannot do."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rkllm_runtime.api.errors import ApiError, bad_request
from rkllm_runtime.chat import tools_json

# Bounds on list lengths that cut a hostile body's validation short (pydantic stops at the first
# item over the limit). Every chat turn costs at least 4 tokens of template, so more messages
# than this can never fit the largest context (16384 tokens); 128 tools is OpenAI's own limit.
MAX_MESSAGES = 4096
MAX_TOOLS = 128


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionSpec(_Lenient):
    """A function tool as both APIs declare it; checked here because the runtime refuses bad ones."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="1-64 letters, digits, '_', '.', ':' or '-'",
    )
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description='a JSON Schema of type "object" (omitted: no parameters)'
    )
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is None:
            return None
        if schema.get("type", "object") != "object":
            raise ValueError('parameters must be a JSON Schema of type "object"')
        properties = schema.get("properties", {})
        if not isinstance(properties, dict) or not all(
            isinstance(v, dict | bool) for v in properties.values()
        ):
            raise ValueError("parameters.properties must map each parameter name to a JSON Schema")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("parameters.required must be a list of parameter names")
        return schema


class ToolSpec(_Lenient):
    type: Literal["function"]
    function: FunctionSpec


def tools_text(tools: Sequence[ToolSpec] | None) -> str:
    """The tools as the runtime's set_function_tools takes them ("" = none)."""
    return tools_json([t.model_dump(exclude_none=True) for t in tools]) if tools else ""


def reject_unsupported(fields: Mapping[str, tuple[object, object]]) -> None:
    """fields: name -> (value sent, the value meaning "not used"); anything else is a clear 400."""
    for name, (value, neutral) in fields.items():
        if value is not None and value != neutral:
            instead = f"omit {name}" + (
                f" or send {json.dumps(neutral)}" if neutral not in (None, "") else ""
            )
            raise bad_request(
                f"{name}={value!r} is not supported by this server: {instead}",
                param=name,
                code="unsupported_parameter",
            )


def refuse_structured_output(param: str, value: object, instead: str) -> ApiError:
    """Constrained decoding needs the sampler, which librkllmrt does not expose; say what works."""
    return bad_request(
        f"{param}={value!r} is not supported: the NPU runtime cannot constrain decoding to JSON or a "
        f"schema. {instead}, ask for JSON in the prompt (include the schema in the system message) "
        "and validate the reply client-side, retrying if it does not parse.",
        param=param,
        code="unsupported_value",
    )


def refuse_forced_tool_choice(param: str, value: object) -> ApiError:
    return bad_request(
        f"{param}={value!r} is not supported: the NPU runtime cannot force a tool call: send 'auto' "
        '(or omit it) and describe the required call in the system message (e.g. "always answer by '
        'calling get_weather"), then check the reply for a tool call client-side.',
        param=param,
        code="unsupported_value",
    )
