"""Simon Willison's `llm` CLI with the server declared in extra-openai-models.yaml."""

from __future__ import annotations

import ast
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .cells import ClientLacks, Target

WEATHER_FUNCTION = '''
def get_weather(location: str) -> str:
    """Weather of a city"""
    return "18 C"
'''


def models_yaml(target: Target) -> str:
    entries = []
    for model_id, name in (("rkllm", target.model), ("rkllm-busy", target.busy_model)):
        entries.append(
            f"- model_id: {model_id}\n  model_name: {name}\n  api_base: {target.url}/v1\n"
            "  supports_tools: true\n  supports_schema: true\n"
        )
    return "".join(entries)


class LlmCli:
    def __init__(self, target: Target) -> None:
        user_dir = Path(tempfile.mkdtemp(prefix="llm-user-"))
        (user_dir / "extra-openai-models.yaml").write_text(models_yaml(target))
        os.environ["LLM_USER_PATH"] = str(user_dir)
        from click.testing import CliRunner
        from llm.cli import cli

        self.cli = cli
        self.runner = CliRunner()

    def run(self, *arguments: str) -> str:
        """The CLI's output; its error message as the exception when it exits non-zero."""
        result = self.runner.invoke(self.cli, list(arguments))
        if result.exit_code != 0:
            raise RuntimeError(f"exit {result.exit_code}: {result.output}{result.exception or ''}")
        return result.output

    def chat(self, prompt: str) -> str:
        return self.run("-m", "rkllm", prompt).removesuffix("\n")

    def stream(self, prompt: str) -> list[str]:
        import llm

        # The CLI prints each chunk as it arrives; the chunks themselves are seen through its Python API.
        return [chunk for chunk in llm.get_model("rkllm").prompt(prompt) if chunk]

    def last_input_tokens(self) -> int:
        return int(json.loads(self.run("logs", "-n", "1", "--json"))[0]["input_tokens"])

    def conversation(self, turns: list[tuple[str, str]]) -> tuple[str, int]:
        # The CLI keeps the history itself: each later user turn continues the logged conversation (-c).
        user_turns = [content for role, content in turns if role == "user"]
        text = self.run("-m", "rkllm", user_turns[0])
        for content in user_turns[1:]:
            text = self.run("-c", content)
        return text.removesuffix("\n"), self.last_input_tokens()

    def tool_call(self, prompt: str) -> tuple[str, dict[str, Any]]:
        output = self.run("-m", "rkllm", "--functions", WEATHER_FUNCTION, "--td", prompt)
        found = re.search(r"Tool call: (\w+)\((.*)\)", output)
        if found is None:
            raise AssertionError(f"no tool call in {output!r}")
        return found[1], dict(ast.literal_eval(found[2]))

    def embed(self, texts: list[str]) -> list[list[float]]:
        raise ClientLacks("llm's OpenAI embedding models have no api_base setting")

    def sampled_chat(self, prompt: str) -> str:
        return self.run("-m", "rkllm", "-o", "temperature", "0.1", prompt).removesuffix("\n")

    def busy_chat(self, prompt: str) -> str:
        return self.run("-m", "rkllm-busy", prompt)

    def structured(self, prompt: str) -> object:
        return self.run("-m", "rkllm", "--schema", "city str", prompt)
