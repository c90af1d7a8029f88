"""Bounds on what clients and devices may use: per-IP admission and prefix-guessing
lockout, and the token buckets (node-wide, per device, per session) of every relay."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from .config import Settings
from .relay import Backend, Bucket

if TYPE_CHECKING:
    from .state import Device


class Guard:
    """Per IP: open FTP connections, device connections not logged in yet, new device
    ids in the last hour, and failed logins within a window.

    ``guess_max_failures`` failures within ``guess_window`` seconds lock the
    IP out for ``guess_lockout`` seconds: prefix guessing then costs a new
    source address every few attempts.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        self._failures = RecentEvents()
        self._new_devices = RecentEvents()
        self._locked_until: dict[str, float] = {}

    def admit(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; a refusal reason instead if it may not."""
        if self.locked(ip):
            return "locked out"
        if self.connections[ip] >= self.settings.max_connections_per_ip:
            return "too many connections from this address"
        self.connections[ip] += 1
        return None

    def release(self, ip: str) -> None:
        _decrement(self.connections, ip)

    def admit_login(self, ip: str) -> bool:
        """Count a device connection from ``ip`` that is yet to log in; False past the cap
        (silent connections held open must not use up the node's descriptors)."""
        if self.logins[ip] >= self.settings.max_pending_logins_per_ip:
            return False
        self.logins[ip] += 1
        return True

    def login_done(self, ip: str) -> None:
        _decrement(self.logins, ip)

    def locked(self, ip: str) -> bool:
        until = self._locked_until.get(ip)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._locked_until[ip]
            return False
        return True

    def failure(self, ip: str) -> bool:
        """Record a failed login; True if this one locks the IP out."""
        s = self.settings
        if self._failures.add(ip, s.guess_window) >= s.guess_max_failures:
            self._failures.forget(ip)
            self._locked_until[ip] = time.monotonic() + s.guess_lockout
            return True
        return False

    def new_device(self, ip: str) -> bool:
        """Count the first login of a device id unknown to the registry; False past
        ``max_new_devices_per_ip`` in an hour.  Each new id takes a prefix for good, so
        one address must not be able to spray ids and use up the registry."""
        if self._new_devices.count(ip, 3600) >= self.settings.max_new_devices_per_ip:
            return False
        self._new_devices.add(ip, 3600)
        return True

    @property
    def locked_out(self) -> int:
        return sum(1 for ip in list(self._locked_until) if self.locked(ip))


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # no entry kept for every address ever seen


class RecentEvents:
    """Per IP, the times of recent events in a sliding window; memory stays bounded
    under a spray of source addresses."""

    def __init__(self, max_addresses: int = 100_000) -> None:
        self._times: dict[str, deque[float]] = {}
        self._max = max_addresses

    def count(self, ip: str, window: float) -> int:
        recent = self._times.get(ip)
        if not recent:
            return 0
        while recent and recent[0] < time.monotonic() - window:
            recent.popleft()
        return len(recent)

    def add(self, ip: str, window: float) -> int:
        """Record one event now; how many ``ip`` had within ``window`` seconds."""
        now = time.monotonic()
        if ip not in self._times and len(self._times) >= self._max:
            for old in [a for a, q in self._times.items() if not q or q[-1] < now - window]:
                del self._times[old]
        self._times.setdefault(ip, deque()).append(now)
        return self.count(ip, window)

    def forget(self, ip: str) -> None:
        self._times.pop(ip, None)


class Throttle:
    """The token buckets of one node.

    Every data session relays through a chain of three buckets per direction:
    its own, its device's (shared by all of that device's sessions) and the
    node's.  A bucket at rate 0 is unlimited; keeping it in the chain lets a
    reload turn a limit on for sessions already running.
    """

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        up, down = settings.rates("node")
        self.node = (self._bucket(up), self._bucket(down))

    def _bucket(self, rate: int) -> Bucket:
        return self.backend.bucket(rate, self.settings.burst or None)

    def device_buckets(self, device: Device) -> tuple[Bucket, Bucket]:
        up, down = self.device_rates(device)
        return self._bucket(up), self._bucket(down)

    def device_rates(self, device: Device) -> tuple[int, int]:
        up, down = self.settings.rates("device")
        if device.upload_rate is not None:
            up = device.upload_rate
        if device.download_rate is not None:
            down = device.download_rate
        return up, down

    def session_buckets(self) -> tuple[Bucket, Bucket]:
        up, down = self.settings.rates("session")
        return self._bucket(up), self._bucket(down)

    def chains(self, device: Device, session: tuple[Bucket, Bucket]) -> tuple[list, list]:
        """(up chain, down chain) for a new data session of ``device``."""
        return (
            [session[0], device.buckets[0], self.node[0]],
            [session[1], device.buckets[1], self.node[1]],
        )

    def apply(self, settings: Settings, devices: list[Device], sessions: list) -> None:
        """New limits for everything running (SIGHUP)."""
        self.settings = settings
        burst = settings.burst or None
        for bucket, rate in zip(self.node, settings.rates("node"), strict=True):
            bucket.set_rate(rate, burst)
        for device in devices:
            for bucket, rate in zip(device.buckets, self.device_rates(device), strict=True):
                bucket.set_rate(rate, burst)
        up, down = settings.rates("session")
        for session in sessions:
            if session.buckets:
                session.buckets[0].set_rate(up, burst)
                session.buckets[1].set_rate(down, burst)
