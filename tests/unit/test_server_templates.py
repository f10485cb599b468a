"""Chat templates from the catalog to the prompt: the built-in phi3, custom templates rendered by the
rkllm_server role into the server config, and the server's own check of that config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from balancer_harness import REPO, local_host, run_role_tasks
from server_harness import serve
from test_engine import expected_reply

from rkllm_runtime.chat import BUILTIN_TEMPLATES, Message
from rkllm_runtime.config import ConfigError, load_config, parse_config

PHI3 = "Phi-3-mini-4k-instruct"
LLAMA3 = {
    "bos": "<|begin_of_text|>",
    "system": ["<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"],
    "user": ["<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"],
    "assistant": ["<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"],
}
GOOD_TURNS = {"system": ["S:", "\n"], "user": ["U:", "\n"], "assistant": ["A:", "\n"]}


def phi3_preset() -> dict[str, Any]:
    defaults = yaml.safe_load((REPO / "roles/rkllm_convert/defaults/main.yml").read_text())
    return dict(defaults["rkllm_convert_presets"][PHI3])


def test_phi3_renders_every_role_in_phi3_format():
    text = BUILTIN_TEMPLATES["phi3"].render(
        [
            Message("system", "Be brief."),
            Message("user", "Weather?"),
            Message("assistant", "Sunny."),
            Message("tool", "18 C"),
            Message("user", "Thanks"),
        ]
    )
    assert text == (
        "<|system|>\nBe brief.<|end|>\n"
        "<|user|>\nWeather?<|end|>\n"
        "<|assistant|>\nSunny.<|end|>\n"
        "<|user|>\n<tool_response>\n18 C\n</tool_response><|end|>\n"
        "<|user|>\nThanks<|end|>\n"
        "<|assistant|>\n"
    )


def test_the_phi3_conversion_preset_names_a_template_the_server_knows():
    template = phi3_preset()["template"]
    config = parse_config({"models": [{"name": PHI3, "path": "/m.rkllm", "template": template}]})
    assert config.template_for(config.models[0]) is BUILTIN_TEMPLATES["phi3"]


def test_a_custom_template_without_a_tool_turn_returns_tool_results_in_a_user_turn():
    config = parse_config(
        {"templates": {"mine": GOOD_TURNS}, "models": [{"name": "m", "path": "/m", "template": "mine"}]}
    )
    rendered = config.template_for(config.models[0]).render([Message("tool", "42")])
    assert rendered == "U:<tool_response>\n42\n</tool_response>\nA:"


@pytest.mark.parametrize(
    ("templates", "complaint"),
    [
        ({"phi3": GOOD_TURNS}, "'phi3' is built in"),
        ({"my template": GOOD_TURNS}, "letters, digits"),
        ({"t": {**GOOD_TURNS, "assistant": ["", "\n"]}}, "^templates.t: the assistant turn needs a prefix"),
        ({"t": {**GOOD_TURNS, "user": ["", "\n"]}}, "^templates.t: the user turn needs a prefix"),
        ({"t": {"system": ["S:", "\n"], "user": ["U:", "\n"]}}, r"templates\.t\.assistant: Field required"),
        ({"t": {**GOOD_TURNS, "user": ["U:"]}}, r"templates\.t\.user"),
        ({"t": {**GOOD_TURNS, "eos": "x"}}, r"templates\.t\.eos"),
    ],
)
def test_bad_custom_templates_are_refused_naming_the_template(templates, complaint):
    with pytest.raises(ConfigError, match=complaint):
        parse_config({"templates": templates})


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rkllm_runtime", "--check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_check_flag_validates_without_loading_a_library(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(
        'library = "/nonexistent/librkllmrt.so"\n'
        '[[models]]\nname = "p"\npath = "/p.rkllm"\ntemplate = "phi3"\n'
    )
    accepted = check(good)
    assert accepted.returncode == 0 and "p (phi3)" in accepted.stdout, accepted.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[templates.chatml]\nsystem = ["", ""]\nuser = ["U", ""]\nassistant = ["A", ""]\n')
    refused = check(bad)
    assert refused.returncode == 2 and "'chatml' is built in" in refused.stderr
    assert "Traceback" not in refused.stderr


def render_server_config(workdir: Path, models: list[dict[str, Any]], **role_vars: Any) -> Path:
    """Run the rkllm_server role's config tasks (template + the server's --check) on this machine."""
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    venv = home / "current"
    if not venv.exists():
        venv.symlink_to(REPO / ".venv")  # the role checks with <home>/current/bin/rkllm-server
    config = workdir / "config.toml"
    host_vars = {
        **local_host(),
        "rkllm_server_home": str(home),
        "rkllm_server_config_path": str(config),
        "rkllm_server_group": "root",
        "rkllm_server_models": models,
        **role_vars,
    }
    inventory = {"all": {"hosts": {"board1": host_vars}}}
    run_role_tasks(workdir, inventory, {}, role="rkllm_server", tasks_from="config", hosts="all")
    return config


def installed_entry(name: str, path: Path, catalog: dict[str, Any]) -> dict[str, Any]:
    """What the rkllm_models role hands the server role for an installed catalog entry."""
    return {"name": name, "path": str(path), "memory_mb": catalog["memory_mb"], "kind": catalog["kind"],
            "context_length": 4096, "sha256": "ab" * 32, "template": catalog["template"]}


def test_a_converted_phi3_model_is_served_with_the_phi3_prompt(
    tmp_path, make_model, double_library_path, double_log
):
    model_file = make_model("phi3", reply_tokens=6)
    config_path = render_server_config(
        tmp_path / "render",
        [installed_entry(PHI3, model_file, phi3_preset())],
        rkllm_server_library_path=str(double_library_path),
    )
    config = load_config(config_path)
    assert config.models[0].template == "phi3"
    data = tomllib.loads(config_path.read_text())
    with serve(double_library_path, data["models"]) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        answer = client.chat.completions.create(model=PHI3, messages=messages)
    # The double's reply is a function of the exact input text: this is the prompt rkllm_run received.
    prompt = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert answer.choices[0].message.content == expected_reply(prompt, 6)
    chatml = BUILTIN_TEMPLATES["chatml"].render([Message("system", "Be brief."), Message("user", "Hi")])
    assert expected_reply(chatml, 6) != expected_reply(prompt, 6), "the check tells the templates apart"


def test_the_role_renders_custom_templates_the_server_uses(tmp_path, make_model):
    model_file = make_model("llama")
    templates = {"llama3": LLAMA3, "odd.strings_1": {**GOOD_TURNS, "user": ['🙂 "quoted" \\ ', "\t\n"]}}
    config_path = render_server_config(
        tmp_path / "render",
        [{"name": "Llama-3.2-1B", "path": str(model_file), "kind": "quick", "template": "llama3"}],
        rkllm_server_templates=templates,
    )
    config = load_config(config_path)
    assert config.template_for(config.models[0]).render([Message("user", "Hi")]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    odd = config.templates["odd.strings_1"]
    assert odd.user == ('🙂 "quoted" \\ ', "\t\n"), "strings survive TOML verbatim"


def test_the_role_refuses_a_bad_template_and_keeps_the_installed_config(tmp_path, make_model):
    workdir = tmp_path / "render"
    model = {"name": "m", "path": str(make_model("m")), "kind": "quick", "template": "mine"}
    config_path = render_server_config(workdir, [model], rkllm_server_templates={"mine": GOOD_TURNS})
    installed = config_path.read_text()
    broken = {"mine": {**GOOD_TURNS, "assistant": ["", "\n"]}}
    with pytest.raises(RuntimeError, match="assistant turn needs a prefix"):
        render_server_config(workdir, [model], rkllm_server_templates=broken)
    assert config_path.read_text() == installed
