"""Prints how long the playbook run took and its slowest tasks, so cold and warm runs can be compared."""

from __future__ import annotations

import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: run_timer
type: aggregate
short_description: print the wall-clock duration of the run and of its slowest tasks
description:
  - At the end of the run, prints the elapsed seconds and the slowest tasks (wall clock, all hosts).
options:
  slowest:
    description: How many of the slowest tasks to list.
    default: 8
    type: int
    env:
      - name: RKLLM_RUN_TIMER_SLOWEST
requirements:
  - enable in callbacks_enabled
"""


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "run_timer"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self._started = time.monotonic()
        self._current: tuple[str, float] | None = None
        self._durations: dict[str, float] = {}

    def _close_current(self) -> None:
        if self._current is not None:
            name, started = self._current
            self._durations[name] = self._durations.get(name, 0.0) + time.monotonic() - started
            self._current = None

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._started = time.monotonic()

    def v2_playbook_on_task_start(self, task: Any, is_conditional: bool) -> None:
        self._close_current()
        self._current = (task.get_name(), time.monotonic())

    def v2_playbook_on_handler_task_start(self, task: Any) -> None:
        self.v2_playbook_on_task_start(task, False)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        self._close_current()
        slowest = sorted(self._durations.items(), key=lambda item: item[1], reverse=True)
        for name, seconds in slowest[: self.get_option("slowest")]:
            self._display.display(f"{seconds:7.1f} s  {name}")
        self._display.display(f"Playbook run took {time.monotonic() - self._started:.1f} s")
