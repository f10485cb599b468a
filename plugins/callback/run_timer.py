"""Prints how long the whole ansible-playbook run took, so cold and warm runs can be compared."""

from __future__ import annotations

import time
from typing import Any

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: run_timer
type: aggregate
short_description: print the wall-clock duration of the playbook run
description:
  - Prints one line with the elapsed seconds at the end of the run.
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

    def v2_playbook_on_start(self, playbook: Any) -> None:
        self._started = time.monotonic()

    def v2_playbook_on_stats(self, stats: Any) -> None:
        elapsed = time.monotonic() - self._started
        self._display.display(f"Playbook run took {elapsed:.1f} s")
