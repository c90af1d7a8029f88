"""One loop timer for many coarse timers: the keepalives of every idle device.

A device's keepalive is due ``keepalive`` seconds after its command session
last moved a byte. Rather than a loop timer per device, moved on every
message, each device sits in one slot of a :class:`Wheel` (one-second slots)
and is looked at when its slot comes: it then says when it wants to be looked
at again. Activity costs nothing; each idle device costs one look per
keepalive interval; a session that closes leaves at once (:meth:`Wheel.remove`,
O(1): a slot is a dict), so the wheel never keeps a closed session alive.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol


class Ticking(Protocol):
    def tick(self, now: float) -> float | None:
        """Called at (or a little after) the time asked for; returns the next, or None."""


class Wheel:
    """Timers of ``resolution`` seconds' precision, driven by one loop timer."""

    def __init__(self, resolution: float = 1.0) -> None:
        self.resolution = resolution
        self._slots: dict[int, dict[Ticking, None]] = {}  # insertion-ordered sets
        self._where: dict[Ticking, int] = {}  # item → its slot
        self._heap: list[int] = []  # slot numbers, each once
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: int | None = None
        self._firing = False

    def __len__(self) -> int:
        return len(self._where)

    def add(self, item: Ticking, when: float) -> None:
        """Call ``item.tick`` at about ``when`` (loop time); an item is in one slot at most."""
        self.remove(item)
        slot = math.ceil(when / self.resolution)
        items = self._slots.get(slot)
        if items is None:
            items = self._slots[slot] = {}
            heapq.heappush(self._heap, slot)
        items[item] = None
        self._where[item] = slot
        if not self._firing and (self._armed_for is None or slot < self._armed_for):
            self._arm(slot)

    def remove(self, item: Ticking) -> None:
        """Forget ``item`` (it closed)."""
        slot = self._where.pop(item, None)
        if slot is not None:
            items = self._slots.get(slot)
            if items is not None:
                items.pop(item, None)

    def _arm(self, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = slot
        self._handle = asyncio.get_running_loop().call_at(slot * self.resolution, self._fire)

    def _fire(self) -> None:
        self._handle = self._armed_for = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = now / self.resolution
        self._firing = True
        try:
            while self._heap and self._heap[0] <= due:
                for item in self._slots.pop(heapq.heappop(self._heap), {}):
                    del self._where[item]
                    when = item.tick(now)
                    if when is not None:
                        self.add(item, max(when, now + self.resolution))
        finally:
            self._firing = False
            if self._heap:
                self._arm(self._heap[0])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._armed_for = None
        self._slots.clear()
        self._where.clear()
        self._heap.clear()
