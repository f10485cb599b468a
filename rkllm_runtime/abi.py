"""ctypes mirror of the librkllmrt 1.2.3 C API (rkllm.h), written from the ABI facts.

Every struct below has the field order and C types of the 1.2.3 header; the layout tests compare
sizes and offsets against a C program compiled from tests/fakelib/rkllm.h and against the reference
layout measured on x86_64 and aarch64 (both LP64, so ctypes computes the same layout on either).
The 1.1.4 → 1.2.x break (n_keep, role/enable_thinking, keep_history, perf, int-returning callback)
is exactly what other bindings got wrong, hence one table of prototypes applied in one place.

ctypes creates field attributes from `_fields_` at class creation, invisible to a type checker; the
`if TYPE_CHECKING:` block in each struct declares the Python type a field reads as, so that every
access to a field is checked. The layout still comes from `_fields_` alone.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_float,
    c_int,
    c_int8,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_void_p,
)
from enum import IntEnum
from typing import TYPE_CHECKING, Any

# C enums are int-sized on every ABI the runtime ships for.
c_enum = c_int

LLMHandle = c_void_p

CPU0, CPU1, CPU2, CPU3, CPU4, CPU5, CPU6, CPU7 = (1 << n for n in range(8))
RK3588_BIG_CORES_MASK = CPU4 | CPU5 | CPU6 | CPU7


class LLMCallState(IntEnum):
    RKLLM_RUN_NORMAL = 0
    RKLLM_RUN_WAITING = 1
    RKLLM_RUN_FINISH = 2
    RKLLM_RUN_ERROR = 3


class RKLLMInputType(IntEnum):
    RKLLM_INPUT_PROMPT = 0
    RKLLM_INPUT_TOKEN = 1
    RKLLM_INPUT_EMBED = 2
    RKLLM_INPUT_MULTIMODAL = 3


class RKLLMInferMode(IntEnum):
    RKLLM_INFER_GENERATE = 0
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1
    RKLLM_INFER_GET_LOGITS = 2


class RKLLMExtendParam(Structure):
    if TYPE_CHECKING:
        base_domain_id: int
        embed_flash: int
        enabled_cpus_num: int
        enabled_cpus_mask: int
        n_batch: int
        use_cross_attn: int
        reserved: ctypes.Array[c_uint8]

    _fields_ = (
        ("base_domain_id", c_int32),
        ("embed_flash", c_int8),
        ("enabled_cpus_num", c_int8),
        ("enabled_cpus_mask", c_uint32),
        ("n_batch", c_uint8),
        ("use_cross_attn", c_int8),
        ("reserved", c_uint8 * 104),
    )


class RKLLMParam(Structure):
    if TYPE_CHECKING:
        model_path: bytes | None
        max_context_len: int
        max_new_tokens: int
        top_k: int
        n_keep: int
        top_p: float
        temperature: float
        repeat_penalty: float
        frequency_penalty: float
        presence_penalty: float
        mirostat: int
        mirostat_tau: float
        mirostat_eta: float
        skip_special_token: bool
        is_async: bool
        img_start: bytes | None
        img_end: bytes | None
        img_content: bytes | None
        extend_param: RKLLMExtendParam

    _fields_ = (
        ("model_path", c_char_p),
        ("max_context_len", c_int32),
        ("max_new_tokens", c_int32),
        ("top_k", c_int32),
        ("n_keep", c_int32),
        ("top_p", c_float),
        ("temperature", c_float),
        ("repeat_penalty", c_float),
        ("frequency_penalty", c_float),
        ("presence_penalty", c_float),
        ("mirostat", c_int32),
        ("mirostat_tau", c_float),
        ("mirostat_eta", c_float),
        ("skip_special_token", c_bool),
        ("is_async", c_bool),
        ("img_start", c_char_p),
        ("img_end", c_char_p),
        ("img_content", c_char_p),
        ("extend_param", RKLLMExtendParam),
    )


class RKLLMLoraAdapter(Structure):
    if TYPE_CHECKING:
        lora_adapter_path: bytes | None
        lora_adapter_name: bytes | None
        scale: float

    _fields_ = (
        ("lora_adapter_path", c_char_p),
        ("lora_adapter_name", c_char_p),
        ("scale", c_float),
    )


class RKLLMEmbedInput(Structure):
    if TYPE_CHECKING:
        embed: ctypes._Pointer[c_float]
        n_tokens: int

    _fields_ = (
        ("embed", POINTER(c_float)),
        ("n_tokens", c_size_t),
    )


class RKLLMTokenInput(Structure):
    if TYPE_CHECKING:
        input_ids: ctypes._Pointer[c_int32]
        n_tokens: int

    _fields_ = (
        ("input_ids", POINTER(c_int32)),
        ("n_tokens", c_size_t),
    )


class RKLLMMultiModalInput(Structure):
    if TYPE_CHECKING:
        prompt: bytes | None
        image_embed: ctypes._Pointer[c_float]
        n_image_tokens: int
        n_image: int
        image_width: int
        image_height: int

    _fields_ = (
        ("prompt", c_char_p),
        ("image_embed", POINTER(c_float)),
        ("n_image_tokens", c_size_t),
        ("n_image", c_size_t),
        ("image_width", c_size_t),
        ("image_height", c_size_t),
    )


class RKLLMInputUnion(Union):
    """The header's anonymous union; RKLLMInput exposes its members directly."""

    if TYPE_CHECKING:
        prompt_input: bytes | None
        embed_input: RKLLMEmbedInput
        token_input: RKLLMTokenInput
        multimodal_input: RKLLMMultiModalInput

    _fields_ = (
        ("prompt_input", c_char_p),
        ("embed_input", RKLLMEmbedInput),
        ("token_input", RKLLMTokenInput),
        ("multimodal_input", RKLLMMultiModalInput),
    )


class RKLLMInput(Structure):
    if TYPE_CHECKING:
        role: bytes | None
        enable_thinking: bool
        input_type: int
        _input: RKLLMInputUnion
        # _anonymous_ lifts the union's members onto the struct itself.
        prompt_input: bytes | None
        embed_input: RKLLMEmbedInput
        token_input: RKLLMTokenInput
        multimodal_input: RKLLMMultiModalInput

    _anonymous_ = ("_input",)
    _fields_ = (
        ("role", c_char_p),
        ("enable_thinking", c_bool),
        ("input_type", c_enum),
        ("_input", RKLLMInputUnion),
    )


class RKLLMLoraParam(Structure):
    if TYPE_CHECKING:
        lora_adapter_name: bytes | None

    _fields_ = (("lora_adapter_name", c_char_p),)


class RKLLMPromptCacheParam(Structure):
    if TYPE_CHECKING:
        save_prompt_cache: int
        prompt_cache_path: bytes | None

    _fields_ = (
        ("save_prompt_cache", c_int),
        ("prompt_cache_path", c_char_p),
    )


class RKLLMCrossAttnParam(Structure):
    if TYPE_CHECKING:
        encoder_k_cache: ctypes._Pointer[c_float]
        encoder_v_cache: ctypes._Pointer[c_float]
        encoder_mask: ctypes._Pointer[c_float]
        encoder_pos: ctypes._Pointer[c_int32]
        num_tokens: int

    _fields_ = (
        ("encoder_k_cache", POINTER(c_float)),
        ("encoder_v_cache", POINTER(c_float)),
        ("encoder_mask", POINTER(c_float)),
        ("encoder_pos", POINTER(c_int32)),
        ("num_tokens", c_int),
    )


class RKLLMInferParam(Structure):
    if TYPE_CHECKING:
        mode: int
        lora_params: ctypes._Pointer[RKLLMLoraParam]
        prompt_cache_params: ctypes._Pointer[RKLLMPromptCacheParam]
        keep_history: int

    _fields_ = (
        ("mode", c_enum),
        ("lora_params", POINTER(RKLLMLoraParam)),
        ("prompt_cache_params", POINTER(RKLLMPromptCacheParam)),
        ("keep_history", c_int),
    )


class RKLLMResultLastHiddenLayer(Structure):
    if TYPE_CHECKING:
        hidden_states: ctypes._Pointer[c_float]
        embd_size: int
        num_tokens: int

    _fields_ = (
        ("hidden_states", POINTER(c_float)),
        ("embd_size", c_int),
        ("num_tokens", c_int),
    )


class RKLLMResultLogits(Structure):
    if TYPE_CHECKING:
        logits: ctypes._Pointer[c_float]
        vocab_size: int
        num_tokens: int

    _fields_ = (
        ("logits", POINTER(c_float)),
        ("vocab_size", c_int),
        ("num_tokens", c_int),
    )


class RKLLMPerfStat(Structure):
    if TYPE_CHECKING:
        prefill_time_ms: float
        prefill_tokens: int
        generate_time_ms: float
        generate_tokens: int
        memory_usage_mb: float

    _fields_ = (
        ("prefill_time_ms", c_float),
        ("prefill_tokens", c_int),
        ("generate_time_ms", c_float),
        ("generate_tokens", c_int),
        ("memory_usage_mb", c_float),
    )


class RKLLMResult(Structure):
    if TYPE_CHECKING:
        text: bytes | None
        token_id: int
        last_hidden_layer: RKLLMResultLastHiddenLayer
        logits: RKLLMResultLogits
        perf: RKLLMPerfStat

    _fields_ = (
        ("text", c_char_p),
        ("token_id", c_int32),
        ("last_hidden_layer", RKLLMResultLastHiddenLayer),
        ("logits", RKLLMResultLogits),
        ("perf", RKLLMPerfStat),
    )


# Since 1.2.1 the callback returns int: 0 = continue, 1 = pause/stop. A void Python callback hands
# the runtime whatever is in the return register.
LLMResultCallback = CFUNCTYPE(c_int, POINTER(RKLLMResult), c_void_p, c_enum)

CALLBACK_CONTINUE = 0
CALLBACK_STOP = 1

# All 15 exported functions: name -> (restype, argtypes). library.py applies this once.
FUNCTIONS: dict[str, tuple[Any, tuple[Any, ...]]] = {
    "rkllm_createDefaultParam": (RKLLMParam, ()),
    "rkllm_init": (c_int, (POINTER(LLMHandle), POINTER(RKLLMParam), LLMResultCallback)),
    "rkllm_load_lora": (c_int, (LLMHandle, POINTER(RKLLMLoraAdapter))),
    "rkllm_load_prompt_cache": (c_int, (LLMHandle, c_char_p)),
    "rkllm_release_prompt_cache": (c_int, (LLMHandle,)),
    "rkllm_destroy": (c_int, (LLMHandle,)),
    "rkllm_run": (c_int, (LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p)),
    "rkllm_run_async": (c_int, (LLMHandle, POINTER(RKLLMInput), POINTER(RKLLMInferParam), c_void_p)),
    "rkllm_abort": (c_int, (LLMHandle,)),
    "rkllm_is_running": (c_int, (LLMHandle,)),
    "rkllm_clear_kv_cache": (c_int, (LLMHandle, c_int, POINTER(c_int), POINTER(c_int))),
    "rkllm_get_kv_cache_size": (c_int, (LLMHandle, POINTER(c_int))),
    "rkllm_set_chat_template": (c_int, (LLMHandle, c_char_p, c_char_p, c_char_p)),
    "rkllm_set_function_tools": (c_int, (LLMHandle, c_char_p, c_char_p, c_char_p)),
    "rkllm_set_cross_attn_params": (c_int, (LLMHandle, POINTER(RKLLMCrossAttnParam))),
}

# Symbols a 1.1.x library does not export; their absence means the struct layouts above are wrong
# for that library.
SYMBOLS_SINCE_1_2 = (
    "rkllm_clear_kv_cache",
    "rkllm_get_kv_cache_size",
    "rkllm_set_chat_template",
    "rkllm_set_function_tools",
    "rkllm_set_cross_attn_params",
)

# Every C type of the header, for the layout tests and for anyone inspecting the binding.
STRUCTS: tuple[type[ctypes.Structure], ...] = (
    RKLLMExtendParam,
    RKLLMParam,
    RKLLMLoraAdapter,
    RKLLMEmbedInput,
    RKLLMTokenInput,
    RKLLMMultiModalInput,
    RKLLMInput,
    RKLLMLoraParam,
    RKLLMPromptCacheParam,
    RKLLMCrossAttnParam,
    RKLLMInferParam,
    RKLLMResultLastHiddenLayer,
    RKLLMResultLogits,
    RKLLMPerfStat,
    RKLLMResult,
)


def field_layout(struct: type[ctypes.Structure]) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) for every field, with the anonymous union's members flattened."""
    layout: dict[str, tuple[int, int]] = {}
    anonymous = set(getattr(struct, "_anonymous_", ()))
    for field in struct._fields_:
        name, ctype = field[0], field[1]
        descriptor = getattr(struct, name)
        if name in anonymous:
            # ctypes refuses an _anonymous_ field that is not a struct or union: never fails.
            assert issubclass(ctype, (Structure, Union))
            for member_field in ctype._fields_:
                member, member_type = member_field[0], member_field[1]
                inner = getattr(ctype, member)
                layout[member] = (descriptor.offset + inner.offset, ctypes.sizeof(member_type))
        else:
            layout[name] = (descriptor.offset, ctypes.sizeof(ctype))
    return layout
