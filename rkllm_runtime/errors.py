"""Typed errors of the librkllmrt binding."""

from __future__ import annotations


class RkllmError(Exception):
    """Base class of every error raised by the binding."""


class LibraryError(RkllmError):
    """The runtime library is missing, cannot be loaded, or is not a 1.2.x library."""


class InitError(RkllmError):
    """rkllm_init failed; the message names the model path and the likely causes."""


class RunError(RkllmError):
    """A run reported RUN_ERROR or rkllm_run failed; the handle stays usable."""


class RuntimeHungError(RkllmError):
    """The watchdog aborted a run that made no progress within its bound; the handle is not trusted."""


class HandleBusyError(RkllmError):
    """A control call could not get the handle because a generation holds it."""


class EngineClosedError(RkllmError):
    """The engine was closed; its handle is gone."""
