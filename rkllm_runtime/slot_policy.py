"""Which KV slot of a model a request runs on, and so which cached conversation it evicts.

A slot holds nothing, one request's cache (a one-shot question, or a conversation's first turn: the
server cannot tell them apart) or a conversation (a cache that a later turn continued, or that a
prompt carrying earlier replies filled). A request goes to the slot whose cache is the longest prefix
of its prompt. A request that continues none takes an empty slot, else the least recently used slot
that is not a kept conversation, else the least recently used kept conversation. A conversation is
kept while it is idle for less than the model's kv_slot_keep_seconds: other users' one-turn requests
then recycle the other slots, and it is evicted only when every slot holds a kept conversation (more
live conversations than slots). A first turn is kept only as long as least recently used keeps it;
a later turn that missed (its first turn's cache was taken, or it moved boards) fills a kept slot.

With kv_slot_keep_seconds = 0 nothing is kept: plain least recently used.
"""

from __future__ import annotations

from rkllm_runtime.registry import KvSlot, LoadedModel


def continues(slot: KvSlot, prompt: str, tools_json: str) -> bool:
    """The slot's cache holds the start of this prompt (under the same tools)."""
    return bool(slot.kv_text) and slot.tools_json == tools_json and prompt.startswith(slot.kv_text)


def kept_conversation(slot: KvSlot, keep_seconds: float, now: float) -> bool:
    """The slot holds a conversation whose user may still come back (idle within the window)."""
    return bool(slot.kv_text) and slot.conversation and now - slot.last_used < keep_seconds


def reusable_slot(model: LoadedModel, now: float) -> KvSlot:
    """The slot a request that continues none of them takes: empty, else not kept, else kept; least
    recently used first within each."""
    keep = model.config.kv_slot_keep_seconds
    return min(
        model.slots,
        key=lambda slot: (bool(slot.kv_text), kept_conversation(slot, keep, now), slot.last_used),
    )


def choose_slot(model: LoadedModel, prompt: str, tools_json: str, now: float) -> KvSlot:
    """The slot holding the longest prefix of the prompt, else reusable_slot."""
    if model.config.kv_cache_reuse:
        holders = [slot for slot in model.slots if continues(slot, prompt, tools_json)]
        if holders:
            return max(holders, key=lambda slot: len(slot.kv_text))
    return reusable_slot(model, now)
