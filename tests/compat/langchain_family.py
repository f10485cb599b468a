"""langchain-openai (ChatOpenAI, OpenAIEmbeddings) and langchain-ollama (ChatOllama, OllamaEmbeddings)."""

from __future__ import annotations

from typing import Any

from .cells import CITY_SCHEMA, WEATHER_TOOL, Target


class LangchainChat:
    target: Target

    def __init__(self, target: Target) -> None:
        self.target = target
        self.llm = self.make()

    def make(self, **settings: Any) -> Any:
        raise NotImplementedError

    def chat(self, prompt: str) -> str:
        return str(self.llm.invoke(prompt).content)

    def stream(self, prompt: str) -> list[str]:
        return [str(chunk.content) for chunk in self.llm.stream(prompt) if chunk.content]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        answer = self.llm.invoke(turns)
        return str(answer.content), answer.usage_metadata["input_tokens"]

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        call = self.llm.bind_tools([WEATHER_TOOL]).invoke(prompt).tool_calls[0]
        return call["name"], call["args"]

    def sampled_chat(self, prompt: str) -> str:
        return str(self.make(temperature=0.1).invoke(prompt).content)

    def busy_chat(self, prompt: str) -> str:
        return str(self.make(model=self.target.busy_model).invoke(prompt).content)

    def structured(self, prompt: str) -> object:
        return self.llm.with_structured_output(CITY_SCHEMA | {"title": "city"}).invoke(prompt)


class LangchainOpenAI(LangchainChat):
    def make(self, **settings: Any) -> Any:
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(**({"model": self.target.model} | self.connection() | settings))

    def connection(self) -> dict[str, Any]:
        return {"base_url": f"{self.target.url}/v1", "api_key": "unused"}

    def embed(self, texts: list[str]) -> list[list[float]]:
        from langchain_openai import OpenAIEmbeddings

        # By default OpenAIEmbeddings tokenizes with tiktoken (a download) and sends token ids, which
        # only OpenAI's own models accept; LangChain documents this switch for other servers.
        embeddings = OpenAIEmbeddings(
            model=self.target.embedding_model, check_embedding_ctx_length=False, **self.connection()
        )
        return embeddings.embed_documents(texts)


class LangchainOllama(LangchainChat):
    def make(self, **settings: Any) -> Any:
        from langchain_ollama import ChatOllama

        return ChatOllama(**({"model": self.target.model, "base_url": self.target.url} | settings))

    def embed(self, texts: list[str]) -> list[list[float]]:
        from langchain_ollama import OllamaEmbeddings

        embeddings = OllamaEmbeddings(model=self.target.embedding_model, base_url=self.target.url)
        return embeddings.embed_documents(texts)
