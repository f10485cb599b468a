"""Chat templates from the catalog to the prompt: the built-in phi3, template files shipped by the
rkllm_server role next to the server config, and the server's own check of that config."""

from __future__ import annotations

import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from double_replies import expected_reply
from server_harness import render_server_config, serve

from rkllm_runtime.chat import Message
from rkllm_runtime.chat_templates import builtin_templates
from rkllm_runtime.config import load_config, parse_config
from tests.support import REPO_ROOT

PHI3 = "Phi-3-mini-4k-instruct"
# A Llama 3-style chat template, as an operator would drop it in.
LLAMA3 = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' }}
    {{- message.content + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def phi3_preset() -> dict[str, Any]:
    defaults = yaml.safe_load((REPO_ROOT / "roles/rkllm_convert/defaults/main.yml").read_text())
    return dict(defaults["rkllm_convert_presets"][PHI3])


def test_phi3_renders_every_role_in_phi3_format():
    text = builtin_templates()["phi3"].render(
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
    conversation = [Message("system", "S"), Message("user", "U")]
    assert config.template_for(config.models[0]).render(conversation) == builtin_templates()["phi3"].render(
        conversation
    )


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
    bad.write_text('[[models]]\nname = "p"\npath = "/p.rkllm"\ntemplate = "phi-3"\n')
    refused = check(bad)
    assert refused.returncode == 2 and "unknown template 'phi-3'" in refused.stderr, refused.stderr
    assert "chatml, deepseek-r1, phi3" in refused.stderr, "the error names the templates there are"
    assert "Traceback" not in refused.stderr


def installed_entry(name: str, path: Path, catalog: dict[str, Any]) -> dict[str, Any]:
    """What the rkllm_models role hands the server role for an installed catalog entry."""
    return {
        "name": name,
        "path": str(path),
        "memory_mb": catalog["memory_mb"],
        "kind": catalog["kind"],
        "context_length": 4096,
        "sha256": "ab" * 32,
        "template": catalog["template"],
    }


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
    with serve(double_library_path, data["models"], template_dir=data["template_dir"]) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        answer = client.chat.completions.create(model=PHI3, messages=messages)
    # The double's reply is a function of the exact input text: this is the prompt rkllm_run received.
    prompt = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert answer.choices[0].message.content == expected_reply(prompt, 6)
    chatml = builtin_templates()["chatml"].render([Message("system", "Be brief."), Message("user", "Hi")])
    assert expected_reply(chatml, 6) != expected_reply(prompt, 6), "the check tells the templates apart"


def test_the_role_ships_template_files_the_server_config_names(tmp_path, make_model):
    own = tmp_path / "own-templates"
    own.mkdir()
    (own / "llama3.jinja").write_text(LLAMA3)
    workdir = tmp_path / "render"
    model = {"name": "Llama-3.2-1B", "path": str(make_model("llama")), "kind": "quick", "template": "llama3"}
    dirs = [str(REPO_ROOT / "templates/chat"), f"{own}/"]
    settings = {"Llama-3.2-1B": {"bos_token": "<|begin_of_text|>"}}
    role_vars = {"rkllm_server_chat_template_dirs": dirs, "rkllm_server_model_settings": settings}
    config_path = render_server_config(workdir, [model], **role_vars)
    shipped = workdir / "templates"
    names = sorted(p.name for p in shipped.iterdir())
    assert names == ["chatml.jinja", "deepseek-r1.jinja", "llama3.jinja", "phi3.jinja"]
    for path in shipped.iterdir():
        info = path.stat()
        assert info.st_uid == 0 and stat.S_IMODE(info.st_mode) == 0o644, path
        source = own if path.name == "llama3.jinja" else REPO_ROOT / "templates/chat"
        assert path.read_bytes() == (source / path.name).read_bytes()
    assert tomllib.loads(config_path.read_text())["template_dir"] == str(shipped)
    config = load_config(config_path)
    assert config.template_for(config.models[0]).render([Message("user", "Hi")]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )

    installed, shipped_at = config_path.read_text(), (shipped / "llama3.jinja").stat().st_mtime_ns
    render_server_config(workdir, [model], **role_vars)
    assert config_path.read_text() == installed, "a second run changes nothing"
    assert (shipped / "llama3.jinja").stat().st_mtime_ns == shipped_at

    # A changed template changes the config (its digest): the server checks it and restarts.
    (own / "llama3.jinja").write_text(LLAMA3.replace("'<|eot_id|>'", "'<|eot_id|>!'"))
    render_server_config(workdir, [model], **role_vars)
    assert config_path.read_text() != installed
    changed = load_config(config_path)
    assert changed.template_for(changed.models[0]).render([Message("user", "Hi")]).count("<|eot_id|>!") == 1


def test_the_role_refuses_a_broken_template_and_keeps_the_installed_config(tmp_path, make_model):
    own = tmp_path / "own-templates"
    own.mkdir()
    (own / "mine.jinja").write_text(LLAMA3)
    workdir = tmp_path / "render"
    model = {"name": "m", "path": str(make_model("m")), "kind": "quick", "template": "mine"}
    dirs = [str(own)]
    config_path = render_server_config(workdir, [model], rkllm_server_chat_template_dirs=dirs)
    installed = config_path.read_text()
    (own / "mine.jinja").write_text("{%- for message in messages %}\n{{ message.content }}\n")
    with pytest.raises(RuntimeError, match=r"model m: chat template mine: line \d+: Unexpected end"):
        render_server_config(workdir, [model], rkllm_server_chat_template_dirs=dirs)
    assert config_path.read_text() == installed


def test_the_role_refuses_two_templates_of_the_same_name(tmp_path, make_model):
    own = tmp_path / "own-templates"
    own.mkdir()
    (own / "chatml.jinja").write_text(LLAMA3)
    model = {"name": "m", "path": str(make_model("m")), "kind": "quick"}
    dirs = [str(REPO_ROOT / "templates/chat"), str(own)]
    with pytest.raises(RuntimeError, match="two chat templates have the same file name"):
        render_server_config(tmp_path / "render", [model], rkllm_server_chat_template_dirs=dirs)
    assert not (tmp_path / "render/config.toml").exists()
