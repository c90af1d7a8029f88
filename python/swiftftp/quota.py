"""Quota accounting: bytes per device per period, from the relays' live counters.

Usage lives in the registry as per-period totals that only ever receive
increments, written every ``quota_flush_interval`` seconds (and when the node
stops), so a crash loses at most that many seconds of accounting and an
operator may reset a device's usage while the node runs.

Policy: a device at or over its quota is refused new data connections
(error 15); a transfer that crosses the quota midway is allowed to finish.
Control connections are counted but never cut.

While the registry fails (damage, I/O errors: :attr:`Registry.error`, logged once by
the registry), usage waits in memory for a flush that works, and a device's usage is
what this node counted since: quotas are not enforced from the registry's figures.
The same loop has the registry file checked every :data:`VERIFY_EVERY` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import logs
from .errors import RegistryError

if TYPE_CHECKING:
    from .state import Device, Node, Session

log = logging.getLogger("swiftftp.quota")

#: Seconds between checks of the registry file by the flush loop (Registry.verify).
VERIFY_EVERY = 60.0
#: Usage of finished sessions kept while the registry fails: devices at most.
MAX_PENDING_DEVICES = 100_000


def period_key(period: str, now: datetime | None = None) -> str:
    """The accounting period containing ``now`` (UTC): ``2026-11``, ``2026-W48``, ``2026-11-24``."""
    now = now or datetime.now(UTC)
    if period == "month":
        return now.strftime("%Y-%m")
    if period == "week":
        year, week, _ = now.isocalendar()
        return f"{year}-W{week:02d}"
    if period == "day":
        return now.strftime("%Y-%m-%d")
    return "total"


class QuotaBook:
    """Reads and writes quota usage for the devices of one node.

    What a finished session moved waits in memory with what running sessions
    moved, and reaches the registry at the next periodic :meth:`flush`: one
    SQLite write per flush interval, not one per session.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        #: Bytes of finished sessions not written yet, by device id.
        self._pending: dict[str, int] = {}

    @property
    def period(self) -> str:
        return period_key(self.node.settings.quota_period)

    def limit(self, device: Device) -> int:
        """The device's quota in bytes per period; 0 = unlimited."""
        self.node.load_overrides(device)
        if device.quota_bytes is not None:
            return device.quota_bytes
        return self.node.settings.quota_bytes

    def used(self, device: Device) -> int:
        """Bytes used this period, including what was moved since the last flush."""
        running = sum(sum(s.unaccounted()) for s in device.sessions if s.accounted is not None)
        pending = self._pending.get(device.android_id, 0)
        try:
            stored = self.node.registry.usage(device.android_id, self.period)
        except RegistryError:
            stored = 0  # logged by the registry; see the module's notes
        return stored + pending + running

    def settle(self, session: Session) -> None:
        """A session ended: keep what it moved since the last flush for the next one."""
        if session.accounted is not None and session.device is not None:
            if delta := session.take_unaccounted():
                key = session.device.android_id
                if key in self._pending or len(self._pending) < MAX_PENDING_DEVICES:
                    self._pending[key] = self._pending.get(key, 0) + delta

    def over(self, device: Device) -> bool:
        limit = self.limit(device)
        return bool(limit) and self.used(device) >= limit

    def flush(self) -> None:
        """Write what every session moved since the last flush, and the devices'
        ``last_seen`` (:meth:`Registry.flush_seen`)."""
        for session in list(self.node.sessions):
            self.settle(session)
        amounts, self._pending = self._pending, {}
        try:
            if amounts:
                self.node.registry.add_usage(self.period, amounts)
        except BaseException:
            for key, amount in amounts.items():  # not lost: the next flush tries again
                self._pending[key] = self._pending.get(key, 0) + amount
            raise
        self.node.registry.flush_seen()

    async def run(self) -> None:
        """Flush periodically until cancelled; flush once more on the way out.  Every
        :data:`VERIFY_EVERY` s, have the registry file checked (from a thread)."""
        verified = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.node.settings.quota_flush_interval)
                try:
                    self.flush()
                except RegistryError:
                    pass  # logged once by the registry; tried again next time
                except Exception:
                    logs.event(log, "quota_flush_failed", level=logging.ERROR, exc_info=True)
                if time.monotonic() - verified >= VERIFY_EVERY:
                    verified = time.monotonic()
                    await asyncio.to_thread(self.node.registry.verify)
        finally:
            try:
                self.flush()
            except RegistryError:
                pass
