"""Clients of the OpenAI API: the official SDK and litellm (its openai/ and ollama_chat/ providers)."""

from __future__ import annotations

import json
from typing import Any

from .cells import CITY_SCHEMA, WEATHER_TOOL, Target

JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def messages_of(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


class OpenAISdk:
    """openai.OpenAI with its defaults (2 retries that honour Retry-After)."""

    def __init__(self, target: Target) -> None:
        import openai

        self.target = target
        self.client = openai.OpenAI(base_url=f"{target.url}/v1", api_key="unused")

    def _create(self, **fields: Any) -> Any:
        return self.client.chat.completions.create(model=fields.pop("model", self.target.model), **fields)

    def chat(self, prompt: str) -> str:
        return str(self._create(messages=user(prompt)).choices[0].message.content)

    def stream(self, prompt: str) -> list[str]:
        chunks = self._create(messages=user(prompt), stream=True)
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        answer = self._create(messages=messages_of(turns))
        return str(answer.choices[0].message.content), answer.usage.prompt_tokens

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        call = self._create(messages=user(prompt), tools=[WEATHER_TOOL]).choices[0].message.tool_calls[0]
        return call.function.name, json.loads(call.function.arguments)

    def embed(self, texts: list[str]) -> list[list[float]]:
        answer = self.client.embeddings.create(model=self.target.embedding_model, input=texts)
        return [item.embedding for item in answer.data]

    def sampled_chat(self, prompt: str) -> str:
        return str(self._create(messages=user(prompt), temperature=0.1).choices[0].message.content)

    def busy_chat(self, prompt: str) -> str:
        return str(
            self._create(model=self.target.busy_model, messages=user(prompt)).choices[0].message.content
        )

    def structured(self, prompt: str) -> object:
        return self._create(messages=user(prompt), response_format=JSON_SCHEMA_FORMAT)


class LitellmOpenAI:
    """litellm.completion with model "openai/<name>" and api_base."""

    prefix = "openai/"
    embedding_prefix = "openai/"

    def __init__(self, target: Target) -> None:
        import litellm

        self.litellm = litellm
        self.target = target
        self.api_base = f"{target.url}/v1"

    def _complete(self, **fields: Any) -> Any:
        model = self.prefix + fields.pop("model", self.target.model)
        return self.litellm.completion(model=model, api_base=self.api_base, api_key="unused", **fields)

    def chat(self, prompt: str) -> str:
        return str(self._complete(messages=user(prompt)).choices[0].message.content)

    def stream(self, prompt: str) -> list[str]:
        chunks = self._complete(messages=user(prompt), stream=True)
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        answer = self._complete(messages=messages_of(turns))
        return str(answer.choices[0].message.content), answer.usage.prompt_tokens

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        call = self._complete(messages=user(prompt), tools=[WEATHER_TOOL]).choices[0].message.tool_calls[0]
        return call.function.name, json.loads(call.function.arguments)

    def embed(self, texts: list[str]) -> list[list[float]]:
        answer = self.litellm.embedding(
            model=self.embedding_prefix + self.target.embedding_model,
            api_base=self.api_base,
            api_key="unused",
            input=texts,
        )
        return [item["embedding"] for item in answer.data]

    def sampled_chat(self, prompt: str) -> str:
        return str(self._complete(messages=user(prompt), temperature=0.1).choices[0].message.content)

    def busy_chat(self, prompt: str) -> str:
        answer = self._complete(model=self.target.busy_model, messages=user(prompt))
        return str(answer.choices[0].message.content)

    def structured(self, prompt: str) -> object:
        return self._complete(messages=user(prompt), response_format=JSON_SCHEMA_FORMAT)


class LitellmOllamaChat(LitellmOpenAI):
    """litellm.completion with model "ollama_chat/<name>"; embeddings through "ollama/<name>"."""

    prefix = "ollama_chat/"
    embedding_prefix = "ollama/"

    def __init__(self, target: Target) -> None:
        super().__init__(target)
        self.api_base = target.url
