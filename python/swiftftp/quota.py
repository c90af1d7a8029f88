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

In a fleet (:class:`~swiftftp.fleet.SharedUsage`) the bucket holds the usage that
counts: every flush also hands this node's new bytes to the bucket (from a thread,
one exchange at a time, each wait bounded), which adds them to this node's own object
of each device and reads back the fleet-wide sums and overrides of the devices that
are active here or refused over quota.  A device's first transfer on this node reads
its sum and overrides first (:meth:`QuotaBook.read_soon`).  Quotas are checked against
the last sum read plus what this node counted since; nothing on the data path waits
for S3.  While the bucket cannot be reached the node keeps its counts in memory, says
so in one WARNING line, and sends them when the bucket answers again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import logs
from .errors import FleetError, RegistryError

if TYPE_CHECKING:
    from .fleet import SharedUsage
    from .state import Device, Node, Session

log = logging.getLogger("swiftftp.quota")

#: Seconds between checks of the registry file by the flush loop (Registry.verify).
VERIFY_EVERY = 60.0
#: Usage of finished sessions kept while the registry fails: devices at most.
MAX_PENDING_DEVICES = 100_000
#: Longest a device's first transfer on this node waits for its fleet-wide figures
#: (the node's own figures are used past it).
FIRST_READ_SECONDS = 2.0
#: Longest the flush loop waits for one exchange with the bucket (a slower one goes on
#: in its thread; the next waits for it to end).
EXCHANGE_SECONDS = 10.0


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
        #: The fleet's usage and overrides; None outside a fleet (set when joining).
        self.shared: SharedUsage | None = None
        #: Bytes flushed here but not in the bucket yet, by (period, device id).
        self._unsent: dict[tuple[str, str], int] = {}
        #: Each device's fleet-wide usage as last read (with what this node sent since).
        self._fleet: dict[str, int] = {}
        self._fleet_period = ""
        #: Devices whose figures the next exchange reads again (SIGHUP, a failed read).
        self._refresh: set[str] = set()
        #: Devices refused over quota here: every exchange reads them again, so that a
        #: reset or a larger quota set on another node frees them.
        self._over: set[str] = set()
        self._lock = threading.Lock()  # _unsent and _fleet, shared with the exchange's thread
        self._exchange: asyncio.Future | None = None
        #: Devices whose figures are being read for their first transfer here.
        self._reading: dict[str, asyncio.Task] = {}
        #: Threads that wait for S3: a slow bucket never holds up the default executor's
        #: other work (registry, prefix allotting).
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        #: Why the bucket could not be reached; None while it answers (logged once).
        self.fleet_error: str | None = None

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
        if self.shared is not None:
            period = self.period
            with self._lock:
                stored = self._cache(period).get(device.android_id, 0)
                stored += self._unsent.get((period, device.android_id), 0)
            return stored + pending + running
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
        refused = bool(limit) and self.used(device) >= limit
        if refused and self.shared is not None:
            self._over.add(device.android_id)
        return refused

    def flush(self) -> None:
        """Write what every session moved since the last flush, and the devices'
        ``last_seen`` (:meth:`Registry.flush_seen`)."""
        for session in list(self.node.sessions):
            self.settle(session)
        amounts, self._pending = self._pending, {}
        if self.shared is not None:
            # the bucket's figures count: these wait for the next exchange; SQLite keeps
            # this node's own record (not put back on failure: they would count twice)
            period = self.period
            with self._lock:
                for key, amount in amounts.items():
                    self._unsent[(period, key)] = self._unsent.get((period, key), 0) + amount
            if amounts:
                self.node.registry.add_usage(period, amounts)
            self.node.registry.flush_seen()
            return
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
                if self.shared is not None:
                    await self.exchange()
                if time.monotonic() - verified >= VERIFY_EVERY:
                    verified = time.monotonic()
                    await asyncio.to_thread(self.node.registry.verify)
        finally:
            try:
                self.flush()
            except RegistryError:
                pass
            if self.shared is not None:
                await self._last_exchange()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    async def _last_exchange(self) -> None:
        """The node stops: what it counted goes to the bucket (bounded; kept in the local
        registry either way)."""
        try:
            async with asyncio.timeout(EXCHANGE_SECONDS):
                if self._exchange is not None and not self._exchange.done():
                    await asyncio.wait([self._exchange])
                await self._in_thread(self._send_and_read, self.period, set())
        except (FleetError, TimeoutError) as exc:
            logs.event(log, "fleet_usage_lost", level=logging.WARNING, reason=str(exc) or "timed out",
                       devices=len(self._unsent))

    # ---- the fleet's figures ----------------------------------------------------------

    def _in_thread(self, call: Any, *args: Any) -> asyncio.Future:
        """``call(*args)`` in one of the threads that talk to S3."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="fleet-usage")
        return asyncio.get_running_loop().run_in_executor(self._pool, call, *args)

    def _failed(self, exc: BaseException) -> None:
        reason = str(exc) or "timed out"
        if self.fleet_error is None:
            logs.event(log, "fleet_usage_unreachable", level=logging.WARNING, reason=reason,
                       consequence="usage is kept in memory and sent when the bucket answers; "
                                   "quotas count the last fleet-wide figures plus this node's")
        self.fleet_error = reason

    def _answered(self) -> None:
        if self.fleet_error is not None:
            self.fleet_error = None
            logs.event(log, "fleet_usage_recovered")

    def _cache(self, period: str) -> dict[str, int]:
        """The fleet-wide figures of ``period`` (emptied when a new period begins); under
        the lock."""
        if self._fleet_period != period:
            self._fleet, self._fleet_period = {}, period
        return self._fleet

    def _apply(self, period: str, figures: dict[str, int], overrides: dict[str, dict | None]) -> None:
        """Figures read from the bucket: the devices' sums and overrides."""
        with self._lock:
            self._cache(period).update(figures)
        changed = []
        for android_id, record in overrides.items():
            device = self.node.devices.get(android_id)
            if device is None or record is None:
                continue  # no fleet-wide override: the registry's (or the defaults) stand
            device.quota_bytes = record["quota_bytes"]
            device.upload_rate, device.download_rate = record["upload_rate"], record["download_rate"]
            changed.append(device)
        if changed:
            self.node.throttle.apply(self.node.settings, changed, [])

    def _read(self, period: str, ids: Iterable[str]) -> tuple[dict[str, int], dict[str, dict | None]]:
        """(sums, overrides) of these devices, from the bucket (blocks: a thread)."""
        assert self.shared is not None
        figures, overrides = {}, {}
        for android_id in ids:
            figures[android_id] = self.shared.used(period, android_id)
            overrides[android_id] = self.shared.overrides(android_id)
        return figures, overrides

    def _send_and_read(self, period: str, wanted: set[str]) -> tuple[dict[str, int], dict[str, dict | None]]:
        """Send what this node counted, then read the figures of ``wanted`` (a thread)."""
        assert self.shared is not None
        with self._lock:
            unsent = dict(self._unsent)
        for (when, android_id), amount in unsent.items():
            self.shared.add(when, {android_id: amount})
            with self._lock:  # in the bucket now: counted in the fleet's figure
                left = self._unsent.pop((when, android_id), 0) - amount
                if left:
                    self._unsent[(when, android_id)] = left
                if when == self._fleet_period:
                    self._fleet[android_id] = self._fleet.get(android_id, 0) + amount
            if when == period:
                wanted.add(android_id)
        return self._read(period, wanted)

    def read_soon(self, device: Device) -> None:
        """A device's first transfer on this node: read its fleet-wide usage and overrides
        in a task of the node's (one at a time per device); :meth:`ready` waits for it."""
        if self.shared is None or device.android_id in self._reading:
            return
        if self.fleet_error is not None:
            # S3 is away: no thread per new device waiting for it; the next exchange reads it
            self._refresh.add(device.android_id)
            return
        android_id = device.android_id
        task = self.node.spawn(self._first_read(device), f"fleet-read-{device.prefix}")
        self._reading[android_id] = task
        task.add_done_callback(lambda _: self._reading.pop(android_id, None))

    async def ready(self, device: Device) -> None:
        """Wait for the device's figures being read (at most :data:`FIRST_READ_SECONDS`)."""
        task = self._reading.get(device.android_id)
        if task is not None:
            await asyncio.shield(task)  # a cancelled transfer leaves the read to finish

    async def _first_read(self, device: Device) -> None:
        period = self.period
        try:
            async with asyncio.timeout(FIRST_READ_SECONDS):
                figures, overrides = await self._in_thread(self._read, period, [device.android_id])
        except (FleetError, TimeoutError) as exc:
            self._refresh.add(device.android_id)  # the next exchange tries again
            self._failed(exc)
            return
        self._answered()
        if period == self.period:
            self._apply(period, figures, overrides)

    async def exchange(self, also: Iterable[str] = ()) -> None:
        """Send this node's counts to the bucket and read back the figures of the devices
        active here, refused over quota, or in ``also``; one exchange at a time."""
        if self.shared is None:
            return
        self._refresh.update(also)
        if self._exchange is not None and not self._exchange.done():
            return  # the next one reads them
        period = self.period
        devices = self.node.devices
        self._over = {android_id for android_id in self._over if android_id in devices}
        wanted = self._refresh | self._over
        wanted |= {s.device.android_id for s in self.node.sessions
                   if s.device is not None and s.accounted is not None}
        self._refresh.clear()
        self._exchange = asyncio.ensure_future(self._in_thread(self._send_and_read, period, wanted))
        # retrieved even when nobody waits for it any more (past the timeout)
        self._exchange.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            async with asyncio.timeout(EXCHANGE_SECONDS):
                # shielded: the thread runs to its end anyway; the next exchange waits for it
                figures, overrides = await asyncio.shield(self._exchange)
        except (FleetError, TimeoutError) as exc:
            self._refresh |= wanted
            self._failed(exc)
            return
        self._answered()
        if period == self.period:
            self._apply(period, figures, overrides)
        self._over = {android_id for android_id in self._over
                      if android_id in devices and self._still_over(devices[android_id])}

    def _still_over(self, device: Device) -> bool:
        limit = device.quota_bytes if device.quota_bytes is not None else self.node.settings.quota_bytes
        return bool(limit) and self.used(device) >= limit
