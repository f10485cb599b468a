"""Hung-runtime watchdog of one node, and systemd's service watchdog.

A run whose runtime sends no callback for longer than its model's stall bound (a whole context's
prefill at the slowest plausible rate, plus slack: WatchdogConfig.stall_seconds) is judged hung: it
is aborted and fails with RuntimeHungError, and its slot is re-created before its next use. If
rkllm_abort does not end the run within abort_grace_seconds, the runtime is stuck: the request fails
anyway, the node refuses new work, and WATCHDOG=1 pings to systemd stop for good, so systemd
(WatchdogSec=) restarts the service. Pings also stop while a hung run is being aborted, and whenever
the event loop itself is blocked, since this loop sends them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from rkllm_runtime.engine import Engine
from rkllm_runtime.scheduler import Scheduler

log = logging.getLogger(__name__)

# Bounds on how often handles are checked: often enough to judge a stall close to its bound.
MIN_CHECK_INTERVAL_S = 0.01
MAX_CHECK_INTERVAL_S = 1.0


class SystemdNotifier:
    """sd_notify(3) over $NOTIFY_SOCKET (a datagram to a unix socket), without libsystemd."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and ours and self._address else None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, message: str) -> bool:
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message.encode(), self._address)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self._address, exc)
                self._warned = True
            return False
        return True


class RuntimeWatchdog:
    """Checks every loaded handle for stalled runs and pings systemd while none is stalled."""

    def __init__(
        self,
        scheduler: Scheduler,
        notifier: SystemdNotifier,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = scheduler
        self._config = scheduler.config.watchdog
        self._notifier = notifier
        self._clock = clock
        self._recovering: set[Engine] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        bounds = [self._config.stall_seconds(m.context_length) for m in scheduler.config.models]
        interval = min(bounds, default=MAX_CHECK_INTERVAL_S) / 4
        if notifier.watchdog_seconds is not None:
            interval = min(interval, notifier.watchdog_seconds / 3)
        self.interval = max(MIN_CHECK_INTERVAL_S, min(MAX_CHECK_INTERVAL_S, interval))

    @property
    def healthy(self) -> bool:
        """No run is being aborted for a stall and the runtime is not stuck: systemd may be pinged."""
        return not self._recovering and self._scheduler.runtime_stuck is None

    async def run(self) -> None:
        if self._notifier.watchdog_seconds is not None:
            log.info(
                "systemd watchdog: %.1f s; pinging every %.2f s while the runtime makes progress or is idle",
                self._notifier.watchdog_seconds,
                self.interval,
            )
        while True:
            if self._config.enabled:
                self.check()
            if self.healthy and self._notifier.notify("WATCHDOG=1"):
                self._scheduler.metrics.watchdog_pings.inc()
            await asyncio.sleep(self.interval)

    def check(self) -> None:
        self._scheduler.metrics.watchdog_checks.inc()
        now = self._clock()
        for model in self._scheduler.registry.loaded():
            bound = self._config.stall_seconds(model.config.context_length)
            for slot in model.slots:
                stalled = slot.engine.stalled_for(now)
                if stalled is None or stalled <= bound or slot.engine in self._recovering:
                    continue
                reason = (
                    f"watchdog: no progress from the NPU runtime for {stalled:.1f} s (bound {bound:.1f} s: "
                    f"{model.config.context_length} tokens of context at "
                    f"{self._config.prefill_tokens_per_second:g} tokens/s + {self._config.slack_seconds:g} s)"
                )
                self._fire(model.config.name, slot.index, slot.engine, reason)

    def _fire(self, model: str, slot: int, engine: Engine, reason: str) -> None:
        returned = engine.mark_hung(reason)
        if returned is None:  # it returned meanwhile
            return
        self._scheduler.metrics.watchdog_fired.labels(model).inc()
        log.error("%s slot %d: %s; aborting the run", model, slot, reason)
        self._recovering.add(engine)
        task = asyncio.get_running_loop().create_task(self._recover(model, slot, engine, returned))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _recover(self, model: str, slot: int, engine: Engine, returned: asyncio.Future[None]) -> None:
        grace = self._config.abort_grace_seconds
        # In a thread: a wedged runtime may block in rkllm_abort itself, and the loop must go on.
        aborting = asyncio.ensure_future(asyncio.to_thread(engine.abort_hung))
        aborting.add_done_callback(_log_abort_failure)
        try:
            await asyncio.wait_for(asyncio.shield(returned), grace)
        except TimeoutError:
            self._declare_stuck(f"rkllm_abort did not end the hung run of {model} slot {slot} in {grace:g} s")
            engine.abandon_hung()
            return
        finally:
            self._recovering.discard(engine)
        log.warning(
            "%s slot %d: the hung run ended on rkllm_abort; its handle is re-created on next use", model, slot
        )

    def _declare_stuck(self, problem: str) -> None:
        self._scheduler.runtime_stuck = problem
        self._scheduler.metrics.watchdog_stuck.set(1)
        restart = (
            "systemd restarts the service (WatchdogSec)"
            if self._notifier.watchdog_seconds is not None
            else "not under systemd's watchdog: restart the service"
        )
        log.critical(
            "%s; the runtime is stuck: new requests are refused and systemd watchdog pings stopped; %s",
            problem,
            restart,
        )
        self._notifier.notify(f"STATUS=NPU runtime stuck: {problem}")


def _log_abort_failure(aborting: asyncio.Future[None]) -> None:
    if not aborting.cancelled() and aborting.exception() is not None:
        log.error("rkllm_abort of a hung run failed: %r", aborting.exception())
