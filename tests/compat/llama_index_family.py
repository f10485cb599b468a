"""llama-index's OpenAILike and Ollama LLMs (and their embedding classes)."""

from __future__ import annotations

from typing import Any

from .cells import Target


def get_weather(location: str) -> str:
    """Weather of a city"""
    return f"18 C in {location}"


def chat_messages(turns: list[tuple[str, str]]) -> list[Any]:
    from llama_index.core.llms import ChatMessage

    return [ChatMessage(role=role, content=content) for role, content in turns]


def prompt_tokens(raw: Any) -> int:
    """Usage as the server sent it: an openai response object (OpenAILike) or Ollama's JSON."""
    if isinstance(raw, dict):
        return int(raw.get("prompt_eval_count") or raw["usage"]["prompt_tokens"])
    return int(raw.usage.prompt_tokens)


class LlamaIndexCommon:
    llm: Any
    target: Target

    def make(self, **settings: Any) -> Any:
        raise NotImplementedError

    def chat(self, prompt: str) -> str:
        return str(self.llm.chat(chat_messages([("user", prompt)])).message.content)

    def stream(self, prompt: str) -> list[str]:
        return [part.delta for part in self.llm.stream_chat(chat_messages([("user", prompt)])) if part.delta]

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        answer = self.llm.chat(chat_messages(turns))
        return str(answer.message.content), prompt_tokens(answer.raw)

    def tool_llm(self) -> Any:
        return self.llm

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        from llama_index.core.tools import FunctionTool

        llm = self.tool_llm()
        answer = llm.chat_with_tools([FunctionTool.from_defaults(fn=get_weather)], user_msg=prompt)
        call = llm.get_tool_calls_from_response(answer, error_on_no_tool_call=True)[0]
        return call.tool_name, dict(call.tool_kwargs)

    def sampled_chat(self, prompt: str) -> str:
        return str(self.make(temperature=0.1).chat(chat_messages([("user", prompt)])).message.content)

    def busy_chat(self, prompt: str) -> str:
        llm = self.make(model=self.target.busy_model)
        return str(llm.chat(chat_messages([("user", prompt)])).message.content)


class LlamaIndexOpenAILike(LlamaIndexCommon):
    """OpenAILike with its defaults: temperature 0.1 and the legacy /v1/completions endpoint."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.llm = self.make()

    def make(self, **settings: Any) -> Any:
        from llama_index.llms.openai_like import OpenAILike

        fields: dict[str, Any] = {
            "model": self.target.model,
            "api_base": f"{self.target.url}/v1",
            "api_key": "unused",
        }
        return OpenAILike(**(fields | settings))

    def tool_llm(self) -> Any:
        # Tools need the chat endpoint; OpenAILike documents these two switches for it.
        return self.make(is_chat_model=True, is_function_calling_model=True)

    def embed(self, texts: list[str]) -> list[list[float]]:
        from llama_index.embeddings.openai_like import OpenAILikeEmbedding

        embedding = OpenAILikeEmbedding(
            model_name=self.target.embedding_model, api_base=f"{self.target.url}/v1", api_key="unused"
        )
        return [list(vector) for vector in embedding.get_text_embedding_batch(texts)]

    def structured(self, prompt: str) -> object:
        llm = self.make(is_chat_model=True, additional_kwargs={"response_format": {"type": "json_object"}})
        return llm.chat(chat_messages([("user", prompt)]))


class LlamaIndexOllama(LlamaIndexCommon):
    def __init__(self, target: Target) -> None:
        self.target = target
        self.llm = self.make()

    def make(self, **settings: Any) -> Any:
        from llama_index.llms.ollama import Ollama

        return Ollama(**({"model": self.target.model, "base_url": self.target.url} | settings))

    def embed(self, texts: list[str]) -> list[list[float]]:
        from llama_index.embeddings.ollama import OllamaEmbedding

        embedding = OllamaEmbedding(model_name=self.target.embedding_model, base_url=self.target.url)
        return [list(vector) for vector in embedding.get_text_embedding_batch(texts)]

    def structured(self, prompt: str) -> object:
        return self.make(json_mode=True).chat(chat_messages([("user", prompt)]))
