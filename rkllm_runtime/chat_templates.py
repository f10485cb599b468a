"""Chat templates as files: Hugging Face-style Jinja2 `chat_template`s rendered in a sandbox.

A template sees what a tokenizer's chat template sees in `transformers`: `messages` (dicts with
role, content and, on assistant turns that call tools, `tool_calls` of
{id, type: "function", function: {name, arguments}}), `tools`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter
that writes JSON as `json.dumps` does (not HTML-escaped). An operator adds a model family by saving
the `chat_template` string of its tokenizer_config.json as `<name>.jinja` in the template directory.

The server keeps a conversation's KV cache only if the template is prefix-stable: the render of
turn n followed by the model's reply is the start of the render of turn n+1.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cache, cached_property
from pathlib import Path
from typing import NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rkllm_runtime.chat import Message, ToolCall

BUILTIN_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "templates" / "chat"
TEMPLATE_SUFFIX = ".jinja"


class ChatTemplateError(ValueError):
    """A chat template that cannot be read or compiled, or that refused to render a conversation."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(
    value: object,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)  # the board's local time, as transformers does


def _environment() -> ImmutableSandboxedEnvironment:
    # The settings transformers renders chat templates with, so dropped-in templates behave the same.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _environment()


def _arguments(text: str) -> object:
    """A tool call's arguments as templates expect them: parsed JSON, else the text as it came."""
    try:
        return json.loads(text or "{}")
    except json.JSONDecodeError:
        return text


def _tool_call(call: ToolCall) -> dict[str, object]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": _arguments(call.arguments)},
    }


def conversation(messages: Sequence[Message], default_system: str = "") -> list[dict[str, object]]:
    """The messages as template data; default_system opens a conversation that brings no system message."""
    turns: list[dict[str, object]] = []
    if default_system and not any(m.role == "system" for m in messages):
        turns.append({"role": "system", "content": default_system})
    for message in messages:
        turn: dict[str, object] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            turn["tool_calls"] = [_tool_call(call) for call in message.tool_calls]
        turns.append(turn)
    return turns


class ChatTemplate:
    def __init__(self, name: str, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template {name}: line {exc.lineno}: {exc.message}") from exc

    def render(
        self,
        messages: Sequence[Message],
        default_system: str = "",
        tools: Sequence[object] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        try:
            return self._template.render(
                messages=conversation(messages, default_system),
                tools=list(tools) if tools else None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"chat template {self.name}: {exc}") from exc
        except Exception as exc:
            # A template is third-party code: whatever it fails with is its refusal of this conversation.
            raise ChatTemplateError(
                f"chat template {self.name} cannot render this conversation: {exc}"
            ) from exc

    @cached_property
    def prefix_break(self) -> str | None:
        """Why this template is not prefix-stable (None: it is), found on a probe conversation.

        Replies are probed plain and with reasoning, as thinking models write them; templates that
        drop earlier turns' reasoning fail the second.
        """
        for reply in ("Paris.", "<think>\nThe capital of France.\n</think>\n\nParis."):
            history = [Message("system", "Answer briefly."), Message("user", "The capital of France?")]
            for question in ("And of Italy?", "And of Spain?"):
                try:
                    before = self.render(history) + reply
                    history = [*history, Message("assistant", reply), Message("user", question)]
                    after = self.render(history)
                except ChatTemplateError as exc:
                    return f"it fails on a probe conversation ({exc})"
                if not after.startswith(before):
                    return (
                        f"the render of a turn and its reply {reply!r} does not start the next turn's render"
                    )
        return None


def load_template(path: Path, *, name: str = "", bos_token: str = "", eos_token: str = "") -> ChatTemplate:
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChatTemplateError(f"cannot read chat template {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ChatTemplateError(f"chat template {path} is not UTF-8 text") from exc
    return ChatTemplate(name or path.stem, source, bos_token=bos_token, eos_token=eos_token)


@cache
def builtin_templates() -> dict[str, ChatTemplate]:
    """The templates that come with the server (templates/chat in the source tree), by name."""
    return {
        path.stem: load_template(path) for path in sorted(BUILTIN_TEMPLATE_DIR.glob(f"*{TEMPLATE_SUFFIX}"))
    }
