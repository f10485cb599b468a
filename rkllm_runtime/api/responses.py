"""OpenAI's Responses API (POST /v1/responses) on the chat path: the same routing, sampling policy,
template, tools, <think> split and output assembly as /v1/chat/completions; only the shapes differ.

No response is stored: any board behind the balancer may answer the next request, so
previous_response_id, conversation and the stored-response endpoints are refused with what to send
instead (the whole conversation as input).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rkllm_runtime.api.body import json_body, read_json
from rkllm_runtime.api.documented import RESPONSE_SHAPES
from rkllm_runtime.api.errors import ApiError, bad_request
from rkllm_runtime.api.generation import Generation, collect_whole
from rkllm_runtime.api.openai import ChatTurn, start_turn
from rkllm_runtime.api.plumbing import GuardedStream, scheduler_of
from rkllm_runtime.api.request_fields import (
    MAX_MESSAGES,
    MAX_TOOLS,
    FunctionSpec,
    ToolSpec,
    refuse_structured_output,
    reject_unsupported,
)
from rkllm_runtime.api.responses_answer import OutputItems, ResponseEcho, stream_response
from rkllm_runtime.api.responses_shapes import ResponseObject, ResponseStreamEvent
from rkllm_runtime.chat import Message, ToolCall

router = APIRouter(prefix="/v1")

SEND_THE_CONVERSATION = (
    "this server keeps no state between requests (any board behind the balancer may answer the "
    "next one): send the whole conversation as input, i.e. the earlier input items followed by "
    "each response's output items"
)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputPart(_Request):
    type: str
    text: str | None = None
    refusal: str | None = None


class InputItem(_Request):
    """A message (type omitted or "message"), or an earlier turn's function call, its output or
    reasoning, as the client sends them back."""

    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None


class FunctionTool(FunctionSpec):
    """The Responses API's flat function tool: {"type": "function", "name": ..., "parameters": ...}."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "function":
            raise ValueError(
                f"tools of type {data.get('type')!r} are not supported; only 'function' tools are "
                "(built-in tools such as web search or file search run on OpenAI's platform)"
            )
        return data


class TextFormat(_Request):
    type: str = "text"


class TextConfig(_Request):
    format: TextFormat | None = None


class ReasoningConfig(_Request):
    effort: str | None = None


class NamedFunction(_Request):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Request):
    model: str
    input: str | Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        if self.previous_response_id is not None:
            raise bad_request(
                f"previous_response_id is not supported: {SEND_THE_CONVERSATION}",
                param="previous_response_id",
                code="unsupported_parameter",
            )
        if self.conversation is not None:
            raise bad_request(
                f"conversation is not supported: {SEND_THE_CONVERSATION}",
                param="conversation",
                code="unsupported_parameter",
            )
        if self.prompt is not None:
            raise bad_request(
                "prompt (a stored prompt template) is not supported: send instructions and input",
                param="prompt",
                code="unsupported_parameter",
            )
        if self.truncation == "auto":
            raise bad_request(
                "truncation='auto' is not supported: a conversation longer than the context is refused "
                "(context_length_exceeded); drop the oldest items client-side and send 'disabled' or omit it",
                param="truncation",
                code="unsupported_value",
            )
        text_format = self.text.format if self.text and self.text.format else None
        if text_format is not None and text_format.type != "text":
            raise refuse_structured_output(
                "text.format", text_format.model_dump(), "Send text.format {'type': 'text'} or omit it"
            )
        reject_unsupported({"top_logprobs": (self.top_logprobs, 0), "background": (self.background, False)})

    def messages(self) -> list[Message]:
        messages = [Message("system", self.instructions)] if self.instructions else []
        items = [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for index, item in enumerate(items):
            _append_item(messages, item, f"input.{index}")
        if not messages:
            raise bad_request("input: at least one message is needed", param="input")
        return messages

    def function_tools(self) -> list[ToolSpec] | None:
        if not self.tools:
            return None
        return [
            ToolSpec(type="function", function=FunctionSpec.model_validate(t.model_dump(exclude={"type"})))
            for t in self.tools
        ]


def _append_item(messages: list[Message], item: InputItem, where: str) -> None:
    if item.type == "reasoning":
        return  # earlier reasoning is not rendered back into the conversation
    if item.type == "function_call":
        if not item.name or item.call_id is None:
            raise bad_request(f"{where}: a function_call item needs name and call_id", param="input")
        call = ToolCall(item.call_id, item.name, item.arguments or "{}")
        if messages and messages[-1].role == "assistant":
            last = messages.pop()
            messages.append(Message("assistant", last.content, (*last.tool_calls, call)))
        else:
            messages.append(Message("assistant", "", (call,)))
    elif item.type == "function_call_output":
        if item.output is None:
            raise bad_request(f"{where}.output: a function_call_output item needs output", param="input")
        messages.append(Message("tool", _text(item.output, f"{where}.output")))
    else:
        if item.role is None:
            raise bad_request(
                f"{where}.role: a message needs a role (system, developer, user or assistant)", param="input"
            )
        role = "system" if item.role == "developer" else item.role
        messages.append(Message(role, _text(item.content, f"{where}.content")))


def _text(content: str | list[InputPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if part.type in ("input_text", "output_text", "text") and part.text is not None:
            texts.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            texts.append(part.refusal)
        else:
            raise bad_request(
                f"{where}.{index}: content parts of type {part.type!r} are not supported "
                "(text only: input_text, output_text)",
                param="input",
            )
    return "".join(texts)


@router.post(
    "/responses",
    response_model=None,
    openapi_extra=json_body(ResponsesRequest),
    responses=RESPONSE_SHAPES.answer(ResponseObject, get_args(ResponseStreamEvent), "text/event-stream"),
)
async def create_response(request: Request) -> Response:
    body = await read_json(request, ResponsesRequest)
    body.refuse_unsupported()
    tools = body.function_tools()
    turn = ChatTurn(
        model=body.model,
        messages=body.messages(),
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        tools=tools,
        tool_choice=body.tool_choice,
        max_tokens=body.max_output_tokens,
        stops=[],
        sampling={"temperature": body.temperature, "top_p": body.top_p},
    )
    started = await start_turn(request, turn)
    echo = _echo(request, body, started.generation)
    items = OutputItems()
    if body.stream:
        events = stream_response(started.generation, started.output, items, echo)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **started.headers}
        return GuardedStream(events, started.generation, media_type="text/event-stream", headers=headers)
    total, outcome = await collect_whole(request, started.generation, started.output)
    items.feed(total)
    items.finish(outcome)
    return JSONResponse(echo.finished(items, outcome), headers=started.headers)


@router.api_route("/responses/{response_id}", methods=["GET", "DELETE"], include_in_schema=False)
@router.api_route("/responses/{response_id}/{action}", methods=["GET", "POST"], include_in_schema=False)
async def stored_response(response_id: str) -> Response:
    raise ApiError(
        404,
        f"response {response_id!r} not found: responses are not stored on this server; "
        + SEND_THE_CONVERSATION,
        param="response_id",
        code="response_not_found",
    )


def _echo(request: Request, body: ResponsesRequest, generation: Generation) -> ResponseEcho:
    model = scheduler_of(request).config.model(generation.model)
    assert model is not None  # the generation runs on a configured model
    choice = body.tool_choice
    return ResponseEcho(
        model=generation.model,
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        effort=body.reasoning.effort if body.reasoning else None,
        tool_choice=choice.model_dump() if isinstance(choice, BaseModel) else choice or "auto",
        tools=[t.model_dump(exclude_none=True) for t in body.tools or []],
        metadata=body.metadata or {},
        temperature=model.temperature,
        top_p=model.top_p,
        bytes_per_token=model.bytes_per_token,
    )
