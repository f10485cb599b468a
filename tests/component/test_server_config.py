"""Server configuration file and command-line overrides."""

from __future__ import annotations

import pytest

from rkllm_runtime.chat import Message
from rkllm_runtime.config import ConfigError, load_config, parse_config, with_overrides

EXAMPLE = """
library = "/opt/rkllm/1.2.3/lib/librkllmrt.so"
port = 9000
npu_memory_budget_mb = 6000
think = "inline"

[rknpu]
load_path = "/tmp/load"

[routing]
reasoning_keywords = ["why"]

[[models]]
name = "Qwen2.5-1.5B-Instruct"
path = "/models/q.rkllm"
memory_mb = 1659
pinned = true
kv_slots = 2

[[models]]
name = "DeepSeek-R1-Distill-Qwen-1.5B"
path = "/models/r.rkllm"
kind = "reasoning"
template = "deepseek-r1"
queue_size = 2

[[models]]
name = "custom"
path = "/models/c.rkllm"
template = "MINE_PATH"

[[models]]
name = "Qwen3-Embedding-0.6B"
path = "/models/e.rkllm"
kind = "embedding"
"""


def test_the_documented_format_loads(tmp_path):
    path = tmp_path / "server.toml"
    mine = tmp_path / "mine.jinja"
    mine.write_text("{% for m in messages %}{{ m.role[0] | upper }}:{{ m.content }}\n{% endfor %}A:")
    path.write_text(EXAMPLE.replace("MINE_PATH", str(mine)))
    config = load_config(path)
    assert config.port == 9000 and config.think == "inline" and config.rknpu.load_path == "/tmp/load"
    qwen, r1, custom, embedder = config.models
    assert qwen.pinned and qwen.memory_mb == 1659 and r1.kind == "reasoning" and r1.queue_size == 2
    assert qwen.kv_slots == 2 and r1.kv_slots == 1, "one KV slot unless configured"
    assert config.template_for(custom).render([Message("user", "hi")], "sys") == "S:sys\nU:hi\nA:"
    assert config.routing.reasoning_keywords == ("why",)
    assert embedder.kind == "embedding" and embedder.embedding_pooling == "last", "last token by default"
    assert qwen.embedding_pooling == "last"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("port = 'x'", "port"),
        ("surprise = 1", "surprise"),
        ("[[models]]\nname = 'a'\npath = '/a'\ntemplate = 'nope'", "unknown template"),
        ("[[models]]\nname = 'a'\npath = '/a'\n[[models]]\nname = 'a'\npath = '/b'", "unique"),
        ("[[models]]\nname = 'auto'\npath = '/a'", "reserved"),
        ("[[models]]\nname = 'a'\npath = '/a'\ncontext_length = 99999", "context_length"),
        ("[[models]]\nname = 'a'\npath = '/a'\nkv_slots = 0", "kv_slots"),
        ("[[models]]\nname = 'a'\npath = '/a'\nkind = 'embeddings'", "kind"),
        ("[[models]]\nname = 'a'\npath = '/a'\nembedding_pooling = 'cls'", "embedding_pooling"),
        ("this is = not toml [", "not valid TOML"),
    ],
)
def test_invalid_configs_are_refused_with_the_reason(tmp_path, text, complaint):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=complaint):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_command_line_overrides_replace_paths_and_add_models():
    config = parse_config({"models": [{"name": "a", "path": "/old", "pinned": True}]})
    changed = with_overrides(config, library="/lib.so", port=1, models={"a": "/new", "b": "/b"})
    assert changed.library == "/lib.so" and changed.port == 1
    assert [(m.name, m.path, m.pinned) for m in changed.models] == [("a", "/new", True), ("b", "/b", False)]


def test_base_domain_policies():
    models = [
        {"name": "a", "path": "/a"},
        {"name": "b", "path": "/b"},
        {"name": "c", "path": "/c", "base_domain_id": 5},
    ]
    for policy, expected in [("shared", [0, 0, 5]), ("per_model", [0, 1, 5]), ("first_fit", [None, None, 5])]:
        config = parse_config({"base_domain_policy": policy, "models": models})
        assert [config.fixed_domain(m) for m in config.models] == expected
