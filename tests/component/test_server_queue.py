"""The per-model FIFO queue in front of a handle (pure asyncio; the API tests drive it end to end)."""

from __future__ import annotations

import asyncio

import pytest

from rkllm_runtime.config import parse_config
from rkllm_runtime.metrics import Metrics
from rkllm_runtime.scheduler import ModelQueue, QueueFullError


def make_queue(capacity: int) -> ModelQueue:
    config = parse_config({"models": [{"name": "m", "path": "/m"}]})
    return ModelQueue("m", capacity, Metrics(config), retry_after_max=30)


async def test_turns_are_served_first_come_first_served():
    queue = make_queue(3)
    first = queue.admit()
    order: list[int] = []

    async def take(index: int) -> None:
        ticket = queue.admit()
        await ticket.wait()
        order.append(index)
        ticket.release()

    waiters = [asyncio.ensure_future(take(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert order == [] and not queue.idle
    first.release()
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2] and queue.idle


async def test_a_full_queue_refuses_at_once():
    queue = make_queue(1)
    running, waiting = queue.admit(), queue.admit()
    with pytest.raises(QueueFullError) as refused:
        queue.admit()
    assert refused.value.retry_after >= 1
    running.release()
    await waiting.wait()
    waiting.release()
    assert queue.idle


async def test_a_cancelled_waiter_leaves_the_queue():
    queue = make_queue(1)
    running = queue.admit()
    leaving = queue.admit()
    task = asyncio.ensure_future(leaving.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    queue.admit().release()  # the freed place can be taken again
    running.release()
    assert queue.idle


async def test_a_turn_granted_to_a_ticket_released_before_waking_is_passed_on():
    queue = make_queue(2)
    running = queue.admit()
    granted_then_dropped = queue.admit()
    last = queue.admit()
    running.release()  # grants the next ticket, whose holder never resumes
    granted_then_dropped.release()
    await asyncio.wait_for(last.wait(), timeout=1)
    last.release()
    assert queue.idle
