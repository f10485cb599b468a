"""Loading librkllmrt.so 1.2.x and calling it through the prototypes declared in abi.FUNCTIONS."""

from __future__ import annotations

import ctypes
import os
import resource
from ctypes import POINTER, byref, c_int
from pathlib import Path
from typing import TYPE_CHECKING

from rkllm_runtime import abi
from rkllm_runtime.errors import LibraryError

if TYPE_CHECKING:
    # The class of CFUNCTYPE's results (abi.LLMResultCallback); typeshed names it only for checkers.
    from ctypes import _CFunctionType

DEFAULT_LIBRARY_PATH = "/opt/rkllm/current/lib/librkllmrt.so"
LIBRARY_ENV_VAR = "RKLLM_LIB"
# rkllm_init opens one dma-buf fd per NPU buffer; the official servers ask for 102400 and models
# fail with "Too many open files" under the usual 1024 default.
OPEN_FILES_TARGET = 102400


def resolve_library_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Explicit path first, then $RKLLM_LIB, then the system path the rkllm_lib role installs."""
    if path is not None:
        return Path(path)
    from_env = os.environ.get(LIBRARY_ENV_VAR)
    if from_env:
        return Path(from_env)
    return Path(DEFAULT_LIBRARY_PATH)


def raise_open_file_limit(target: int = OPEN_FILES_TARGET) -> int:
    """Raise the RLIMIT_NOFILE soft limit toward target as far as allowed; returns the new soft limit.

    Root may also lift the hard limit; anyone else may raise the soft limit up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    if hard == resource.RLIM_INFINITY or hard >= target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return target


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class RkllmLibrary:
    """One loaded librkllmrt.so with every function typed once; methods return the C status."""

    def __init__(self, cdll: ctypes.CDLL, path: Path) -> None:
        missing = [name for name in abi.SYMBOLS_SINCE_1_2 if not hasattr(cdll, name)]
        if missing:
            raise LibraryError(
                f"{path} is not a librkllmrt 1.2.x library: it lacks {', '.join(missing)}. "
                "This binding speaks the 1.2.x ABI only (1.1.x has different struct layouts and a "
                "void callback); install librkllmrt 1.2.3."
            )
        absent = [name for name in abi.FUNCTIONS if not hasattr(cdll, name)]
        if absent:
            raise LibraryError(f"{path} lacks 1.2.x functions {', '.join(absent)}")
        for name, (restype, argtypes) in abi.FUNCTIONS.items():
            function = getattr(cdll, name)
            function.restype = restype
            function.argtypes = argtypes
        self._cdll = cdll
        self.path = path

    def create_default_param(self) -> abi.RKLLMParam:
        param: abi.RKLLMParam = self._cdll.rkllm_createDefaultParam()
        return param

    def init(self, param: abi.RKLLMParam, callback: _CFunctionType) -> tuple[int, int | None]:
        """Returns (status, handle)."""
        handle = abi.LLMHandle()
        status: int = self._cdll.rkllm_init(byref(handle), byref(param), callback)
        return status, handle.value

    def destroy(self, handle: int) -> int:
        return int(self._cdll.rkllm_destroy(handle))

    def run(
        self, handle: int, rkllm_input: abi.RKLLMInput, infer_param: abi.RKLLMInferParam, userdata: int
    ) -> int:
        return int(self._cdll.rkllm_run(handle, byref(rkllm_input), byref(infer_param), userdata))

    def abort(self, handle: int) -> int:
        return int(self._cdll.rkllm_abort(handle))

    def clear_kv_cache(self, handle: int, keep_system_prompt: bool) -> int:
        null = POINTER(c_int)()
        return int(self._cdll.rkllm_clear_kv_cache(handle, int(keep_system_prompt), null, null))

    def get_kv_cache_size(self, handle: int) -> tuple[int, int]:
        """Returns (status, cached positions of batch 0); the binding always runs n_batch=1."""
        sizes = (c_int * 1)()
        status = int(self._cdll.rkllm_get_kv_cache_size(handle, sizes))
        return status, sizes[0]

    def set_chat_template(self, handle: int, system_prompt: bytes, prefix: bytes, postfix: bytes) -> int:
        return int(self._cdll.rkllm_set_chat_template(handle, system_prompt, prefix, postfix))

    def set_function_tools(
        self, handle: int, system_prompt: bytes, tools_json: bytes, tool_response_tag: bytes
    ) -> int:
        return int(self._cdll.rkllm_set_function_tools(handle, system_prompt, tools_json, tool_response_tag))

    def load_lora(self, handle: int, adapter: abi.RKLLMLoraAdapter) -> int:
        return int(self._cdll.rkllm_load_lora(handle, byref(adapter)))

    def load_prompt_cache(self, handle: int, path: bytes) -> int:
        return int(self._cdll.rkllm_load_prompt_cache(handle, path))

    def release_prompt_cache(self, handle: int) -> int:
        return int(self._cdll.rkllm_release_prompt_cache(handle))


def load_library(path: str | os.PathLike[str] | None = None) -> RkllmLibrary:
    """Load librkllmrt 1.2.x (path > $RKLLM_LIB > system path) and raise the open-file limit."""
    resolved = resolve_library_path(path)
    if not resolved.is_file():
        raise LibraryError(
            f"librkllmrt not found at {resolved} "
            f"(set {LIBRARY_ENV_VAR} or install it with the rkllm_lib role)"
        )
    try:
        cdll = ctypes.CDLL(str(resolved))
    except OSError as exc:
        raise LibraryError(f"cannot load {resolved}: {exc}") from exc
    library = RkllmLibrary(cdll, resolved)
    raise_open_file_limit()
    return library
