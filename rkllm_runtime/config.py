"""Server configuration: one TOML file (rendered by Ansible), overridable from the command line.

Format (every key optional unless marked; values shown are the defaults)::

    library = "/opt/rkllm/current/lib/librkllmrt.so"   # librkllmrt.so to load
    runtime_version = "1.2.3"        # reported in rkllm_build_info
    host = "127.0.0.1"
    port = 8080
    max_body_bytes = 1048576         # larger request bodies get 413
    npu_memory_budget_mb = 0         # 0 = no budget; else LRU-evict unpinned models to stay below it
    base_domain_policy = "first_fit" # "first_fit": fill NPU memory domain 0, then 1, ... as models
                                     # load (rkllm_runtime.npu_memory); "shared": every model on domain 0;
                                     # "per_model": the i-th model of the list gets domain i.
                                     # A model's own base_domain_id always wins.
    think = "separate"               # "separate": <think> text goes to reasoning_content / thinking;
                                     # "inline": it stays in the content
    retry_after_max_seconds = 30     # cap of the Retry-After estimate sent with 503
    drain_file = ""                  # while this file exists the node is draining: new requests get
                                     # 503 "draining" (the balancer retries them on another board),
                                     # admitted ones finish, /ready answers 503 "draining" (after
                                     # checking the models); "" = no drain switch

    [watchdog]                       # a run with no runtime callback for longer than its model's
                                     # stall bound is aborted and fails; the bound allows the longest
                                     # legitimate prefill: context_length / prefill_tokens_per_second
                                     # + slack_seconds (4096 tokens: 102.4 + 15 = 117.4 s)
    enabled = true
    prefill_tokens_per_second = 40.0 # slowest prefill a healthy board may have (RK3588 measured:
                                     # 310 tok/s for a 1.5B w8a8 model, 125 tok/s for 3.8B)
    slack_seconds = 15.0
    abort_grace_seconds = 10.0       # rkllm_abort must end the run within this; otherwise the runtime
                                     # is stuck: systemd watchdog pings stop, systemd restarts the service

    [rknpu]
    load_path = "/sys/kernel/debug/rknpu/load"        # "NPU load:  Core0: 12%, Core1:  0%, ..."
    version_path = "/sys/kernel/debug/rknpu/version"  # "RKNPU driver: v0.9.8"

    [routing]                        # how model "auto" picks a model
    quick = "Qwen2.5-1.5B-Instruct"
    reasoning = "DeepSeek-R1-Distill-Qwen-1.5B"
    reasoning_keywords = ["step by step", "prove", "reason", "think"]  # in the last user message
    reasoning_min_chars = 0          # > 0: a last user message at least this long counts as reasoning

    [[models]]
    name = "Qwen2.5-1.5B-Instruct"   # required
    path = "/opt/rkllm/models/Qwen2.5-1.5B-Instruct.rkllm"   # required
    sha256 = ""                      # reported in rkllm_build_info (Ansible knows it; never hashed here)
    memory_mb = 0                    # NPU memory the model takes, for the budget
    kind = "quick"                   # "quick" | "reasoning" | "embedding" (serves only the embeddings
                                     # endpoints; chat and generate on it answer 400)
    embedding_pooling = "last"       # how /v1/embeddings, /api/embed pool the last hidden layer's
                                     # token states: "last" token (Qwen3-Embedding-style models) or
                                     # "mean" of all tokens; chat models serve embeddings this way too
    context_length = 4096            # max_context_len given to rkllm_init
    max_new_tokens = 2048            # per-request ceiling (max_tokens / num_predict are capped to it)
    template = "chatml"              # "chatml" (Qwen) | "deepseek-r1" | "phi3" | a name from [templates]
    system_prompt = ""               # used when a conversation brings no system message
    pinned = false                   # loaded at start, never evicted, checked by /ready
    base_domain_id = -1              # -1 = follow base_domain_policy
    queue_size = 8                   # requests allowed to wait (besides the running one)
    bytes_per_token = 4.0            # prompt-size estimate used to refuse over-long prompts up front
    kv_cache_reuse = true            # continue a conversation from the KV cache (false: always re-prefill)
    kv_slots = 1                     # rkllm handles (KV caches) of this model, each holding one
                                     # conversation; each loads the weights again (memory_mb each).
                                     # Still one generation at a time per model.
    temperature = 0.8                # sampling is fixed at rkllm_init (see rkllm_runtime/api/openai.py)
    sampling = "configured"          # other sampling values in a request: "configured" generates with
                                     # these and names them in X-Rkllm-Sampling-Ignored; "strict": 400
    top_p = 0.9
    top_k = 1
    repeat_penalty = 1.1
    enabled_cpus_mask = 0xF0

    [templates.my-template]          # optional custom chat templates: a name of letters, digits,
                                     # ".", "_", "-" that is not a built-in one; each turn is
                                     # [prefix, suffix], strings used verbatim
    bos = ""
    system = ["<|im_start|>system\\n", "<|im_end|>\\n"]
    user = ["<|im_start|>user\\n", "<|im_end|>\\n"]              # the prefix is required
    assistant = ["<|im_start|>assistant\\n", "<|im_end|>\\n"]    # the prefix is required
    tool = ["<|im_start|>user\\n<tool_response>\\n", "\\n</tool_response><|im_end|>\\n"]
                                     # optional; by default the user turn around
                                     # "<tool_response>\\n" ... "\\n</tool_response>"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rkllm_runtime.chat import BUILTIN_TEMPLATES, ChatTemplate

DEFAULT_LIBRARY = "/opt/rkllm/current/lib/librkllmrt.so"
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """The configuration file or a command-line override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RknpuPaths(_Strict):
    load_path: str = "/sys/kernel/debug/rknpu/load"
    version_path: str = "/sys/kernel/debug/rknpu/version"


class WatchdogConfig(_Strict):
    enabled: bool = True
    prefill_tokens_per_second: float = Field(default=40.0, gt=0)
    slack_seconds: float = Field(default=15.0, ge=0)
    abort_grace_seconds: float = Field(default=10.0, gt=0)

    def stall_seconds(self, context_length: int) -> float:
        """How long a run may go without a callback: a whole context's prefill plus slack."""
        return context_length / self.prefill_tokens_per_second + self.slack_seconds


class RoutingRules(_Strict):
    quick: str = "Qwen2.5-1.5B-Instruct"
    reasoning: str = "DeepSeek-R1-Distill-Qwen-1.5B"
    reasoning_keywords: tuple[str, ...] = ("step by step", "prove", "reason", "think")
    reasoning_min_chars: int = Field(default=0, ge=0)


class TemplateConfig(_Strict):
    bos: str = ""
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    # Most models have no tool role: by default tool results come back inside a user turn.
    tool: tuple[str, str] | None = None

    @model_validator(mode="after")
    def _check_turns(self) -> TemplateConfig:
        # Without these the model gets no cue whose turn it is and answers for the user.
        if not self.user[0]:
            raise ValueError("the user turn needs a prefix (e.g. <|user|>\\n)")
        if not self.assistant[0]:
            raise ValueError("the assistant turn needs a prefix: it ends every prompt")
        return self

    def chat_template(self, name: str) -> ChatTemplate:
        tool = self.tool or (f"{self.user[0]}<tool_response>\n", f"\n</tool_response>{self.user[1]}")
        return ChatTemplate(
            name=name, bos=self.bos, system=self.system, user=self.user, assistant=self.assistant, tool=tool
        )


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    sha256: str = ""
    memory_mb: int = Field(default=0, ge=0)
    kind: Literal["quick", "reasoning", "embedding"] = "quick"
    embedding_pooling: Literal["last", "mean"] = "last"
    context_length: int = Field(default=4096, gt=0, le=16384)
    max_new_tokens: int = Field(default=2048, gt=0)
    template: str = "chatml"
    system_prompt: str = ""
    pinned: bool = False
    base_domain_id: int = Field(default=-1, ge=-1)
    queue_size: int = Field(default=8, ge=0)
    bytes_per_token: float = Field(default=4.0, gt=0)
    kv_cache_reuse: bool = True
    kv_slots: int = Field(default=1, ge=1)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    top_k: int = Field(default=1, ge=0, le=1000)
    repeat_penalty: float = Field(default=1.1, ge=0, le=2)
    sampling: Literal["configured", "strict"] = "configured"
    enabled_cpus_mask: int = Field(default=0xF0, gt=0)


class ServerConfig(_Strict):
    library: str = DEFAULT_LIBRARY
    runtime_version: str = "1.2.3"
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, gt=0)
    npu_memory_budget_mb: int = Field(default=0, ge=0)
    base_domain_policy: Literal["first_fit", "shared", "per_model"] = "first_fit"
    think: Literal["separate", "inline"] = "separate"
    retry_after_max_seconds: int = Field(default=30, ge=1)
    drain_file: str = ""
    rknpu: RknpuPaths = RknpuPaths()
    watchdog: WatchdogConfig = WatchdogConfig()
    routing: RoutingRules = RoutingRules()
    templates: dict[str, TemplateConfig] = Field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()

    @model_validator(mode="after")
    def _check_references(self) -> ServerConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        if "auto" in names:
            raise ValueError('"auto" is reserved for routing and cannot name a model')
        for name in self.templates:
            if name in BUILTIN_TEMPLATES:
                raise ValueError(f"templates.{name}: {name!r} is built in; give your template another name")
            if not _TEMPLATE_NAME.fullmatch(name):
                raise ValueError(f"templates.{name}: a template name is letters, digits, '.', '_' or '-'")
        known = set(BUILTIN_TEMPLATES) | set(self.templates)
        for model in self.models:
            if model.template not in known:
                raise ValueError(
                    f"model {model.name}: unknown template {model.template!r} (known: {sorted(known)})"
                )
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def template_for(self, model: ModelConfig) -> ChatTemplate:
        custom = self.templates.get(model.template)
        if custom is None:
            return BUILTIN_TEMPLATES[model.template]
        return custom.chat_template(model.template)

    def fixed_domain(self, model: ModelConfig) -> int | None:
        """The model's base_domain_id, or None when it is chosen at load time (first_fit)."""
        if model.base_domain_id >= 0:
            return model.base_domain_id
        if self.base_domain_policy == "shared":
            return 0
        if self.base_domain_policy == "per_model":
            return [m.name for m in self.models].index(model.name)
        return None


def parse_config(data: dict[str, object]) -> ServerConfig:
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as exc:
        # Our own checks' messages are complete sentences; pydantic prefixes them with "Value error, ".
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(problems) from exc


def load_config(path: str | Path) -> ServerConfig:
    try:
        with Path(path).open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return parse_config(data)


def with_overrides(
    config: ServerConfig,
    *,
    library: str | None = None,
    host: str | None = None,
    port: int | None = None,
    models: dict[str, str] | None = None,
) -> ServerConfig:
    """Apply command-line flags: --model NAME=PATH replaces that model's path or adds a model."""
    data = config.model_dump()
    if library is not None:
        data["library"] = library
    if host is not None:
        data["host"] = host
    if port is not None:
        data["port"] = port
    entries = list(data["models"])
    for name, path in (models or {}).items():
        existing = next((m for m in entries if m["name"] == name), None)
        if existing is None:
            entries.append({"name": name, "path": path})
        else:
            existing["path"] = path
    data["models"] = entries
    return parse_config(data)
