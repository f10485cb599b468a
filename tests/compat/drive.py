"""Run one client's row of the matrix offline and print it as JSON (one process per client).

python -m tests.compat.drive CLIENT URL MODEL BUSY_MODEL EMBEDDING_MODEL VOCABULARY (tokens joined by |)
"""

from __future__ import annotations

import importlib
import json
import sys
import time

from .offline import go_offline

# client name -> (module, class); the modules import their library only when the class is built.
CLIENTS = {
    "openai": (".openai_family", "OpenAISdk"),
    "ollama": (".ollama_family", "OllamaSdk"),
    "langchain-openai": (".langchain_family", "LangchainOpenAI"),
    "langchain-ollama": (".langchain_family", "LangchainOllama"),
    "litellm openai/": (".openai_family", "LitellmOpenAI"),
    "litellm ollama_chat/": (".openai_family", "LitellmOllamaChat"),
    "llama-index OpenAILike": (".llama_index_family", "LlamaIndexOpenAILike"),
    "llama-index Ollama": (".llama_index_family", "LlamaIndexOllama"),
    "llm CLI": (".llm_cli", "LlmCli"),
}


def main(argv: list[str]) -> None:
    name, url, model, busy_model, embedding_model, vocabulary = argv
    guard = go_offline()
    from .cells import Target, run_row

    target = Target(url, model, busy_model, embedding_model, tuple(vocabulary.split("|")))
    started = time.monotonic()
    module, cls = CLIENTS[name]
    client = getattr(importlib.import_module(module, __package__), cls)(target)
    setup_seconds = round(time.monotonic() - started, 2)
    row = run_row(client, target)
    downloaded = sorted(path.name for path in guard.tiktoken_cache.iterdir())
    row |= {
        "client": name,
        "setup_seconds": setup_seconds,
        "outbound": guard.attempts,
        "tiktoken_cache": downloaded,
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
