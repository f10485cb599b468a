"""Which KV slot of a model a request runs on, and so which cached conversation it evicts.

A slot holds nothing, one request's cache (a one-shot question, or a conversation's first turn: the
server cannot tell them apart), or a conversation (a cache that a later turn continued, or that a
prompt carrying earlier replies filled). A request goes to the slot whose cache is the longest prefix
of its prompt. A request that continues no slot takes, in this order:

1. an empty slot;
2. a slot idle for longer than the model's kv_slot_keep_seconds, least recently used first: its user
   is gone;
3. the most recently used one-request slot: a stream of one-shot requests recycles one slot instead
   of sweeping every cache, so an older one-request cache (perhaps a first turn whose user is still
   reading the answer) lives until its next turn;
4. the least recently used conversation: only when every slot holds a conversation within its window.

With kv_slot_keep_seconds = 0 every cache is past its window: plain least recently used.
"""

from __future__ import annotations

from rkllm_runtime.registry import KvSlot, LoadedModel


def continues(slot: KvSlot, prompt: str, tools_json: str) -> bool:
    """The slot's cache holds the start of this prompt (under the same tools)."""
    return bool(slot.kv_text) and slot.tools_json == tools_json and prompt.startswith(slot.kv_text)


def kept_conversation(slot: KvSlot, keep_seconds: float, now: float) -> bool:
    """The slot holds a conversation whose user may still come back (idle within the window)."""
    return bool(slot.kv_text) and slot.conversation and now - slot.last_used < keep_seconds


def _eviction_rank(slot: KvSlot, keep_seconds: float, now: float) -> tuple[int, float]:
    if not slot.kv_text:
        return 0, slot.last_used
    if now - slot.last_used >= keep_seconds:
        return 1, slot.last_used
    if not slot.conversation:
        return 2, -slot.last_used
    return 3, slot.last_used


def reusable_slot(model: LoadedModel, now: float) -> KvSlot:
    """The slot a request that continues none of them takes (the module's rules 1-4)."""
    keep = model.config.kv_slot_keep_seconds
    return min(model.slots, key=lambda slot: _eviction_rank(slot, keep, now))


def choose_slot(model: LoadedModel, prompt: str, tools_json: str, now: float) -> KvSlot:
    """The slot holding the longest prefix of the prompt, else reusable_slot."""
    if model.config.kv_cache_reuse:
        holders = [slot for slot in model.slots if continues(slot, prompt, tools_json)]
        if holders:
            return max(holders, key=lambda slot: len(slot.kv_text))
    return reusable_slot(model, now)
