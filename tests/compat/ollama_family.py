"""The official ollama package."""

from __future__ import annotations

from typing import Any

from .cells import CITY_SCHEMA, WEATHER_TOOL, Target
from .openai_family import messages_of, user


class OllamaSdk:
    """ollama.Client with its defaults (no retries)."""

    def __init__(self, target: Target) -> None:
        import ollama

        self.target = target
        self.client = ollama.Client(host=target.url)

    def _chat(self, **fields: Any) -> Any:
        return self.client.chat(model=fields.pop("model", self.target.model), **fields)

    def chat(self, prompt: str) -> str:
        return str(self._chat(messages=user(prompt)).message.content)

    def stream(self, prompt: str) -> list[str]:
        parts = self._chat(messages=user(prompt), stream=True)
        return [part.message.content for part in parts if part.message.content]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        answer = self._chat(messages=messages_of(turns))
        return str(answer.message.content), int(answer.prompt_eval_count)

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        call = self._chat(messages=user(prompt), tools=[WEATHER_TOOL]).message.tool_calls[0]
        return call.function.name, dict(call.function.arguments)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [
            list(vector)
            for vector in self.client.embed(model=self.target.embedding_model, input=texts).embeddings
        ]

    def sampled_chat(self, prompt: str) -> str:
        return str(self._chat(messages=user(prompt), options={"temperature": 0.1}).message.content)

    def busy_chat(self, prompt: str) -> str:
        return str(self._chat(model=self.target.busy_model, messages=user(prompt)).message.content)

    def structured(self, prompt: str) -> object:
        return self._chat(messages=user(prompt), format=CITY_SCHEMA)
