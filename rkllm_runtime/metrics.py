"""Prometheus metrics of one server app (its own CollectorRegistry, so apps never share counters)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Literal, get_args

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rkllm_runtime.config import ServerConfig

# What a model's KV slot is doing: no conversation, one conversation's cache, or generating.
SlotState = Literal["empty", "holding", "running"]
# Why a handle was destroyed and created again (rkllm_handle_reinits_total).
ReinitReason = Literal["poisoned", "handle_failed"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# *_created series double every counter and histogram for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_TOKEN_GAP_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_RATE_BUCKETS = (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0, 20.0, 25.0, 32.0, 45.0, 64.0, 128.0, 1000.0)
_LOAD_BUCKETS = (0.1, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)

_CORE_LOAD = re.compile(r"Core(\d+):\s*(\d+(?:\.\d+)?)%")
_DRIVER_VERSION = re.compile(r"v?(\d+\.\d+\.\d+)")


def read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def parse_npu_load(text: str) -> dict[str, float]:
    """'NPU load:  Core0: 12%, Core1:  0%, Core2:  0%,' -> {'0': 12.0, '1': 0.0, '2': 0.0}."""
    return {core: float(value) for core, value in _CORE_LOAD.findall(text)}


def parse_driver_version(text: str | None) -> str:
    match = _DRIVER_VERSION.search(text or "")
    return match.group(1) if match else "unknown"


class _NodeCollector(Collector):
    """Read at scrape time: NPU load from the rknpu debugfs file, and the build info."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config

    def collect(self) -> Iterator[GaugeMetricFamily]:
        load = GaugeMetricFamily(
            "rkllm_npu_load_percent", "NPU load per core (rknpu debugfs)", labels=["core"]
        )
        for core, percent in parse_npu_load(read_text(self._config.rknpu.load_path) or "").items():
            load.add_metric([core], percent)
        yield load
        info = GaugeMetricFamily(
            "rkllm_build_info",
            "Server build, runtime, driver and model of this server",
            labels=["server_version", "server_revision", "runtime", "driver", "model", "model_sha256"],
        )
        server, revision = server_build()
        driver = parse_driver_version(read_text(self._config.rknpu.version_path))
        runtime = self._config.runtime_version
        for model in self._config.models:
            info.add_metric([server, revision, runtime, driver, model.name, model.sha256 or "unknown"], 1)
        yield info


def server_build() -> tuple[str, str]:
    """Package version and git revision: the fleet's build bakes the revision in as the version's local
    label (0.1.0+g1a2b3c4d5e6f); an editable install has none."""
    try:
        version = metadata.version("rkllm-runtime")
    except metadata.PackageNotFoundError:
        return "unknown", "unknown"
    public, _, local = version.partition("+")
    return public, local or "unknown"


class Metrics:
    def __init__(self, config: ServerConfig) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("rkllm_requests_running", "Generations running", ["model"], registry=r)
        self.waiting = Gauge("rkllm_requests_waiting", "Requests queued for a handle", ["model"], registry=r)
        # One counter for every request that got no answer, so the error-ratio alert needs one series:
        # queue_full, draining, runtime_hung and model_unavailable are refused before any work (503),
        # run_error failed in the runtime during generation, internal is a server bug (500).
        self.rejected = Counter(
            "rkllm_requests_rejected",
            "Requests refused or failed, by reason (queue_full, draining, runtime_hung, model_unavailable, "
            "run_error, internal)",
            ["model", "reason"],
            registry=r,
        )
        self.sampling_ignored = Counter(
            "rkllm_sampling_ignored",
            "Requests that sent a sampling value the model does not run with (fixed at rkllm_init)",
            ["model", "parameter"],
            registry=r,
        )
        self.embedding_requests = Counter(
            "rkllm_embedding_requests",
            "Embedding requests served (each one admission, however many inputs)",
            ["model"],
            registry=r,
        )
        self.embedding_inputs = Counter(
            "rkllm_embedding_inputs", "Texts embedded (one hidden-layer run each)", ["model"], registry=r
        )
        self.prompt_tokens = Counter("rkllm_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=r)
        self.prompt_tokens_cached = Counter(
            "rkllm_prompt_tokens_cached",
            "Prompt tokens served from a KV slot's cache instead of being prefilled",
            ["model"],
            registry=r,
        )
        self.kv_slot_evictions = Counter(
            "rkllm_kv_slot_evictions",
            "KV slots cleared to serve another conversation than the one they held",
            ["model"],
            registry=r,
        )
        self.kv_slot_conversation_evictions = Counter(
            "rkllm_kv_slot_conversation_evictions",
            "KV slots cleared while they held a conversation idle for less than kv_slot_keep_seconds "
            "(every slot held one: more live conversations than slots)",
            ["model"],
            registry=r,
        )
        self.handle_reinits = Counter(
            "rkllm_handle_reinits",
            "rkllm handles destroyed and created again, by reason: poisoned (a run or probe left the handle "
            "broken), handle_failed (a call carrying nothing of the request failed before its run: a cache "
            "clear or query, an empty tool list). Tools the runtime refuses while the handle works re-init "
            "nothing",
            ["model", "reason"],
            registry=r,
        )
        self.kv_slot_state = Gauge(
            "rkllm_kv_slot_state",
            "1 for the state each KV slot of a loaded model is in (empty, holding a conversation, running)",
            ["model", "slot", "state"],
            registry=r,
        )
        self.generation_tokens = Counter("rkllm_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.time_to_first_token = Histogram(
            "rkllm_time_to_first_token_seconds",
            "Request arrival to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "rkllm_inter_token_latency_seconds",
            "Gap between consecutive tokens",
            ["model"],
            buckets=_TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "rkllm_request_queue_time_seconds",
            "Time waiting for the handle",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "rkllm_e2e_request_latency_seconds",
            "Request arrival to last token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decode_rate = Histogram(
            "rkllm_decode_tokens_per_second",
            "Decode speed reported by the runtime's perf stats",
            ["model"],
            buckets=_RATE_BUCKETS,
            registry=r,
        )
        self.model_load = Histogram(
            "rkllm_model_load_seconds", "rkllm_init duration", ["model"], buckets=_LOAD_BUCKETS, registry=r
        )
        self.model_memory = Gauge(
            "rkllm_model_memory_bytes",
            "Memory of the model's handles (one per KV slot) as the runtime's perf stats last reported it; "
            "0 once unloaded",
            ["model"],
            registry=r,
        )
        self.watchdog_fired = Counter(
            "rkllm_watchdog_fired",
            "Runs the watchdog aborted because the runtime made no progress within the model's stall bound",
            ["model"],
            registry=r,
        )
        self.watchdog_stuck = Gauge(
            "rkllm_watchdog_runtime_stuck",
            "1 once rkllm_abort failed to end a hung run: systemd watchdog pings stopped, a restart is due",
            registry=r,
        )
        self.watchdog_checks = Counter(
            "rkllm_watchdog_checks", "Rounds of the hung-runtime watchdog over the loaded handles", registry=r
        )
        self.watchdog_pings = Counter(
            "rkllm_watchdog_pings", "WATCHDOG=1 notifications sent to systemd", registry=r
        )
        # Read at scrape time: the drain switch is a file the operator's playbooks create and remove.
        self.draining = Gauge(
            "rkllm_draining",
            "1 while the drain file exists (new requests refused with 503 draining), else 0",
            registry=r,
        )
        drain_file = Path(config.drain_file) if config.drain_file else None
        self.draining.set_function(lambda: float(drain_file is not None and drain_file.exists()))
        r.register(_NodeCollector(config))
        # The process metrics (process_start_time_seconds shows restarts) of the default registry,
        # which this app's own registry does not include by itself.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        # Series exist from the start, so rate() and increase() see the first failure too.
        for model in config.models:
            self.running.labels(model.name).set(0)
            self.waiting.labels(model.name).set(0)
            self.prompt_tokens_cached.labels(model.name)
            self.embedding_requests.labels(model.name)
            self.embedding_inputs.labels(model.name)
            self.kv_slot_evictions.labels(model.name)
            self.kv_slot_conversation_evictions.labels(model.name)
            for reinit in get_args(ReinitReason):
                self.handle_reinits.labels(model.name, reinit)
            self.watchdog_fired.labels(model.name)
            for reason in ("queue_full", "model_unavailable", "run_error", "runtime_hung"):
                self.rejected.labels(model.name, reason)

    def set_slot_state(self, model: str, slot: int, state: SlotState | None) -> None:
        """1 on the slot's current state and 0 on the others; None (its handle is gone) drops the series."""
        for name in get_args(SlotState):
            labels = (model, str(slot), name)
            if state is not None:
                self.kv_slot_state.labels(*labels).set(1 if name == state else 0)
            else:
                with suppress(KeyError):
                    self.kv_slot_state.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
