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
    template_dir = "<source tree>/templates/chat"  # chat templates (<name>.jinja); the rkllm_server
                                     # role ships them next to the config (/etc/rkllm-server/templates)
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
    template = "chatml"              # chat template: NAME = the file <template_dir>/NAME.jinja
                                     # (built in: "chatml" (Qwen), "deepseek-r1", "phi3"), or a path
                                     # ending in .jinja (absolute, or relative to template_dir)
    bos_token = ""                   # what the template's bos_token / eos_token stand for (copy them
    eos_token = ""                   # from the model's tokenizer_config.json when its template uses them)
    system_prompt = ""               # used when a conversation brings no system message
    pinned = false                   # loaded at start, never evicted, checked by /ready
    base_domain_id = -1              # -1 = follow base_domain_policy
    queue_size = 8                   # requests allowed to wait (besides the running one)
    bytes_per_token = 4.0            # prompt-size estimate used to refuse over-long prompts up front
    kv_cache_reuse = true            # continue a conversation from the KV cache (false: always re-prefill);
                                     # switched off, with a warning, when the template is not prefix-stable
    kv_slots = 1                     # rkllm handles (KV caches) of this model, each holding one
                                     # conversation; each loads the weights again (memory_mb each).
                                     # Still one generation at a time per model.
    kv_slot_keep_seconds = 300.0     # a conversation's slot (a cache a later turn continued) idle for
                                     # less than this is evicted only when every slot holds one; a
                                     # stream of one-turn requests recycles one slot meanwhile
                                     # (rkllm_runtime/slot_policy.py). 0 = least recently used only
    temperature = 0.8                # sampling is fixed at rkllm_init (see rkllm_runtime/api/openai.py)
    sampling = "configured"          # other sampling values in a request: "configured" generates with
                                     # these and names them in X-Rkllm-Sampling-Ignored; "strict": 400
    top_p = 0.9
    top_k = 1
    repeat_penalty = 1.1
    enabled_cpus_mask = 0xF0

Chat templates are Hugging Face-style Jinja2 files (rkllm_runtime/chat_templates.py): to add a model
family, save the `chat_template` string of its tokenizer_config.json as <template_dir>/<name>.jinja.
"""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from rkllm_runtime.chat_templates import (
    BUILTIN_TEMPLATE_DIR,
    TEMPLATE_SUFFIX,
    ChatTemplate,
    ChatTemplateError,
    load_template,
)

DEFAULT_LIBRARY = "/opt/rkllm/current/lib/librkllmrt.so"
_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
log = logging.getLogger(__name__)


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
    bos_token: str = ""
    eos_token: str = ""
    system_prompt: str = ""
    pinned: bool = False
    base_domain_id: int = Field(default=-1, ge=-1)
    queue_size: int = Field(default=8, ge=0)
    bytes_per_token: float = Field(default=4.0, gt=0)
    kv_cache_reuse: bool = True
    kv_slots: int = Field(default=1, ge=1)
    kv_slot_keep_seconds: float = Field(default=300.0, ge=0)
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
    template_dir: str = str(BUILTIN_TEMPLATE_DIR)
    rknpu: RknpuPaths = RknpuPaths()
    watchdog: WatchdogConfig = WatchdogConfig()
    routing: RoutingRules = RoutingRules()
    models: tuple[ModelConfig, ...] = ()
    # Compiled once when the config is validated, by model name.
    _chat_templates: dict[str, ChatTemplate] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _refuse_template_tables(cls, data: object) -> object:
        if isinstance(data, dict) and "templates" in data:
            raise ValueError(
                "[templates.*] tables are no longer read: save each chat template as "
                f"<template_dir>/<name>{TEMPLATE_SUFFIX} (a Hugging Face-style Jinja2 chat template)"
            )
        return data

    @model_validator(mode="after")
    def _check_references(self) -> ServerConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique, repeated: {', '.join(duplicates)}")
        if "auto" in names:
            raise ValueError('"auto" is reserved for routing and cannot name a model')
        for model in self.models:
            path = self.template_path(model)
            if not path.is_file():
                known = sorted(p.stem for p in Path(self.template_dir).glob(f"*{TEMPLATE_SUFFIX}"))
                raise ValueError(
                    f"model {model.name}: unknown template {model.template!r}: there is no file {path} "
                    f"(templates in {self.template_dir}: {', '.join(known) or 'none'})"
                )
            try:
                self._chat_templates[model.name] = load_template(
                    path,
                    name=model.template,
                    bos_token=model.bos_token,
                    eos_token=model.eos_token,
                )
            except ChatTemplateError as exc:
                raise ValueError(f"model {model.name}: {exc}") from exc
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def template_path(self, model: ModelConfig) -> Path:
        if model.template.endswith(TEMPLATE_SUFFIX):
            return Path(self.template_dir) / model.template  # an absolute path stays itself
        if not _TEMPLATE_NAME.fullmatch(model.template):
            raise ValueError(
                f"model {model.name}: template {model.template!r} is neither a name (letters, digits, "
                f"'.', '_', '-') nor a path ending in {TEMPLATE_SUFFIX}"
            )
        return Path(self.template_dir) / f"{model.template}{TEMPLATE_SUFFIX}"

    def template_for(self, model: ModelConfig) -> ChatTemplate:
        return self._chat_templates[model.name]

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
        return _without_unstable_reuse(ServerConfig.model_validate(data))
    except ValidationError as exc:
        # Our own checks' messages are complete sentences; pydantic prefixes them with "Value error, ".
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(problems) from exc


def _without_unstable_reuse(config: ServerConfig) -> ServerConfig:
    """KV-cache reuse off for models whose template is not prefix-stable: their next turn's render
    does not start with the cached text, so each turn is a full prefill anyway; keeping reuse on would
    only hide that. Said once, when it is switched off (a re-parsed config finds it off already)."""
    models = []
    for model in config.models:
        problem = config.template_for(model).prefix_break if model.kv_cache_reuse else None
        if problem:
            log.warning(
                "model %s: chat template %s is not prefix-stable (%s): every turn is prefilled in full, "
                "no KV-cache reuse",
                model.name,
                model.template,
                problem,
            )
            model = model.model_copy(update={"kv_cache_reuse": False})
        models.append(model)
    return config.model_copy(update={"models": tuple(models)})


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
