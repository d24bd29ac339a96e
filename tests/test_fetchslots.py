"""The node's fetch slots: oldest download first, and nothing lost to cancellation."""

from __future__ import annotations

import trio
import trio.testing

from p2pdist.swarm import FetchSlots


async def test_slots_go_to_the_lowest_priority_waiter_first() -> None:
    slots = FetchSlots(1)
    order: list[int] = []

    async def take(priority: int) -> None:
        async with slots.slot(priority):
            order.append(priority)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery, slots.slot(0):
        for p in (5, 2, 9, 1):
            nursery.start_soon(take, p)
        await trio.testing.wait_all_tasks_blocked()
    assert order == [1, 2, 5, 9]


async def test_a_cancelled_acquire_loses_no_slot() -> None:
    slots = FetchSlots(1)
    for _ in range(3):
        with trio.CancelScope() as scope:
            scope.cancel()  # cancelled at its first checkpoint
            async with slots.slot(0):
                raise AssertionError("unreachable: the acquire was cancelled")
    with trio.move_on_after(1) as waited:
        async with slots.slot(0):
            pass
    assert not waited.cancelled_caught, "the slot was lost to a cancelled acquire"
