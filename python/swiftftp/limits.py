"""Bounds on what clients and devices may use: per-IP admission and prefix-guessing
lockout, and the token buckets (node-wide, per device, per session) of every relay."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import TYPE_CHECKING

from .config import Settings
from .relay import Backend, Bucket

if TYPE_CHECKING:
    from .node import Device


class Guard:
    """Per IP: open FTP connections, device connections not logged in yet, and failed
    logins within a window.

    ``guess_max_failures`` failures within ``guess_window`` seconds lock the
    IP out for ``guess_lockout`` seconds: prefix guessing then costs a new
    source address every few attempts.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connections: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        self._failures: dict[str, deque[float]] = {}
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
        self.connections[ip] -= 1
        if self.connections[ip] <= 0:
            del self.connections[ip]

    def admit_login(self, ip: str) -> bool:
        """Count a device connection from ``ip`` that is yet to log in; False past the cap
        (silent connections held open must not use up the node's descriptors)."""
        if self.logins[ip] >= self.settings.max_pending_logins_per_ip:
            return False
        self.logins[ip] += 1
        return True

    def login_done(self, ip: str) -> None:
        self.logins[ip] -= 1
        if self.logins[ip] <= 0:
            del self.logins[ip]

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
        now = time.monotonic()
        recent = self._failures.setdefault(ip, deque())
        recent.append(now)
        while recent and recent[0] < now - s.guess_window:
            recent.popleft()
        if len(recent) >= s.guess_max_failures:
            del self._failures[ip]
            self._locked_until[ip] = now + s.guess_lockout
            return True
        if len(self._failures) > 100_000:  # bounded memory under a spray of sources
            self._expire(now)
        return False

    def _expire(self, now: float) -> None:
        window = self.settings.guess_window
        for ip in [ip for ip, q in self._failures.items() if not q or q[-1] < now - window]:
            del self._failures[ip]

    @property
    def locked_out(self) -> int:
        return sum(1 for ip in list(self._locked_until) if self.locked(ip))


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
