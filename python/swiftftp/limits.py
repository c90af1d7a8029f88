"""Bounds on what clients and devices may use: the node-wide caps from the descriptor
limit, admission per address group, prefix-guessing lockout and the node-wide guess
budget, and the token buckets (node-wide, per device, per session) of every relay."""

from __future__ import annotations

import resource
import time
from collections import Counter, deque
from collections.abc import Callable, Container
from typing import TYPE_CHECKING

from .config import Settings
from .net import address_group
from .relay import Backend, Bucket

if TYPE_CHECKING:
    from .state import Device


class Capacity:
    """The node-wide caps derived from the descriptor limit (when a setting is 0).

    Every session holds descriptors: a command session one, a relayed control
    connection two (and a rendezvous listener while it is set up), a data
    connection two sockets and, in the rust relay, two pipes (four more). So half
    the limit goes to devices online, a quarter to connections not logged in yet
    (what a flood of strangers fills), and the last quarter stays for the
    relayed sessions, their data connections and rendezvous.
    """

    def __init__(self, settings: Settings, nofile: int | None = None) -> None:
        if nofile is None:
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if nofile == resource.RLIM_INFINITY:
                nofile = 1 << 20
        self.nofile = nofile
        self.command_sessions = settings.max_command_sessions or max(16, nofile // 2)
        self.pending = settings.max_pending_connections or max(16, nofile // 4)

    def describe(self) -> str:
        return (f"descriptor limit {self.nofile}: up to {self.command_sessions} devices online, "
                f"{self.pending} connections not logged in yet")


class Admission:
    """One admitted connection's place in the :class:`Guard`'s counts: released once,
    when the connection ends; :meth:`logged_in` ends its pre-login part early."""

    __slots__ = ("_guard", "_group", "_counter", "_pending", "_closer")

    def __init__(self, guard: Guard, group: str, counter: Counter[str] | None) -> None:
        self._guard = guard
        self._group = group
        self._counter = counter
        self._pending = True
        self._closer: Callable[[], None] | None = None
        if counter is not None:
            counter[group] += 1
        guard.pending += 1

    def watch(self, closer: Callable[[], None]) -> None:
        """Call ``closer`` if the address is locked out while this is not logged in."""
        self._closer = closer
        self._guard._watchers.setdefault(self._group, set()).add(self)

    def logged_in(self) -> None:
        """No longer a connection not logged in: off the pending count, out of reach of
        a lockout."""
        if self._pending:
            self._pending = False
            self._guard.pending -= 1
            if self._closer is not None:
                watchers = self._guard._watchers.get(self._group)
                if watchers is not None:
                    watchers.discard(self)
                    if not watchers:
                        del self._guard._watchers[self._group]
                self._closer = None

    def release(self) -> None:
        self.logged_in()
        if self._counter is not None:
            _decrement(self._counter, self._group)
            self._counter = None

    def _lock(self) -> None:
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()


class Guard:
    """Who may connect and try to log in, per address group (an IPv4 address, an IPv6
    /64 by default: :func:`~swiftftp.net.address_group`) and node-wide.

    * FTP connections per group, device connections not logged in per group, and
      all connections not logged in yet node-wide (:class:`Capacity`);
    * new device ids per group per hour (each takes a prefix for good);
    * guessing: ``guess_max_failures`` failed logins within ``guess_window``
      seconds lock the group out for ``guess_lockout`` seconds, its connections
      still logging in included (they are closed); the failures are not forgotten
      meanwhile, so the next one after the lockout locks it again. And a
      node-wide budget of ``guess_rate`` failed guesses per second (a token
      bucket, :meth:`may_guess`) bounds guessing spread over many addresses.
    """

    def __init__(self, settings: Settings, capacity: Capacity | None = None) -> None:
        self.settings = settings
        self.capacity = capacity or Capacity(settings)
        self.connections: Counter[str] = Counter()
        self.logins: Counter[str] = Counter()
        #: Connections not logged in yet, node-wide.
        self.pending = 0
        self._failures = RecentEvents()
        self._new_devices = RecentEvents()
        self._locked_until: dict[str, float] = {}
        self._watchers: dict[str, set[Admission]] = {}
        self._tokens = self._burst
        self._stamp = time.monotonic()

    def group(self, ip: str) -> str:
        return address_group(ip, self.settings.ipv6_prefix)

    def admit(self, ip: str) -> Admission | str:
        """An FTP client's connection: its :class:`Admission`, or why it may not."""
        group = self.group(ip)
        if self.locked(group):
            return "locked out"
        if self.connections[group] >= self.settings.max_connections_per_ip:
            return "too many connections from this address"
        if self.pending >= self.capacity.pending:
            return "too many connections not logged in on this node"
        return Admission(self, group, self.connections)

    def admit_login(self, ip: str, reserved: Container[str] = ()) -> Admission | str:
        """A device connection yet to log in: its :class:`Admission`, or why it may not
        (silent connections held open must not use up the node's descriptors). From an
        address group in ``reserved`` (a device online there: its data connections) the
        node-wide cap does not apply, only the per-address one."""
        group = self.group(ip)
        if self.logins[group] >= self.settings.max_pending_logins_per_ip:
            return "too many pending device logins"
        if group not in reserved and self.pending >= self.capacity.pending:
            return "too many connections not logged in on this node"
        return Admission(self, group, self.logins)

    def locked(self, group: str) -> bool:
        until = self._locked_until.get(group)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._locked_until[group]
            return False
        return True

    # ---- guessing ------------------------------------------------------------------------

    @property
    def _burst(self) -> float:
        return max(1.0, 2 * self.settings.guess_rate)

    def _refill(self) -> float:
        now = time.monotonic()
        rate = self.settings.guess_rate
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        return self._tokens

    def may_guess(self, ip: str) -> bool:
        """May this address try a prefix now? One with no failure within the window
        may (it cannot be told from a user who typed the right one); one with
        failures needs a token of the node-wide budget. Checked before the lookup, so
        a refused guess learns nothing. So the node answers at most ``guess_rate``
        failed guesses a second, and one more per fresh address per window: 250
        addresses get 10 + 250/600 ≈ 10.4 a second with the defaults."""
        if not self.settings.guess_rate:
            return True
        tokens = self._refill()
        if self._failures.count(self.group(ip), self.settings.guess_window):
            return tokens >= 1
        return True

    def failure(self, ip: str, guess: bool = True) -> bool:
        """Record a failed login (``guess``: a prefix or a password tried, which takes
        from the node-wide budget); True if this one locks the address out, and then
        its connections still logging in are closed."""
        s = self.settings
        group = self.group(ip)
        if guess and s.guess_rate:
            self._refill()
            self._tokens -= 1
        if self._failures.add(group, s.guess_window) >= s.guess_max_failures and not self.locked(group):
            self._locked_until[group] = time.monotonic() + s.guess_lockout
            for admission in list(self._watchers.pop(group, ())):
                admission._lock()
            return True
        return False

    def new_device(self, ip: str) -> bool:
        """Count the first login of a device id unknown to the registry; False past
        ``max_new_devices_per_ip`` in an hour.  Each new id takes a prefix for good, so
        one address must not be able to spray ids and use up the registry."""
        group = self.group(ip)
        if self._new_devices.count(group, 3600) >= self.settings.max_new_devices_per_ip:
            return False
        self._new_devices.add(group, 3600)
        return True

    @property
    def locked_out(self) -> int:
        return sum(1 for group in list(self._locked_until) if self.locked(group))


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]  # no entry kept for every address ever seen


class RecentEvents:
    """Per address group, the times of recent events in a sliding window. Memory stays
    bounded under a spray of source addresses: past ``max_addresses`` entries the
    stale ones go, and if none is stale the oldest."""

    def __init__(self, max_addresses: int = 100_000) -> None:
        self._times: dict[str, deque[float]] = {}
        self._max = max_addresses

    def count(self, key: str, window: float) -> int:
        recent = self._times.get(key)
        if not recent:
            return 0
        while recent and recent[0] < time.monotonic() - window:
            recent.popleft()
        return len(recent)

    def add(self, key: str, window: float) -> int:
        """Record one event now; how many ``key`` had within ``window`` seconds."""
        now = time.monotonic()
        if key not in self._times and len(self._times) >= self._max:
            for old in [a for a, q in self._times.items() if not q or q[-1] < now - window]:
                del self._times[old]
            if len(self._times) >= self._max:
                del self._times[next(iter(self._times))]
        self._times.setdefault(key, deque(maxlen=1024)).append(now)
        return self.count(key, window)

    def forget(self, key: str) -> None:
        self._times.pop(key, None)


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
        """(up chain, down chain) for a new data session of ``device`` (its buckets made
        now if this is its first; its overrides are loaded by then)."""
        buckets = device.buckets
        if buckets is None:
            buckets = device.buckets = self.device_buckets(device)
        return (
            [session[0], buckets[0], self.node[0]],
            [session[1], buckets[1], self.node[1]],
        )

    def apply(self, settings: Settings, devices: list[Device], sessions: list) -> None:
        """New limits for everything running (SIGHUP)."""
        self.settings = settings
        burst = settings.burst or None
        for bucket, rate in zip(self.node, settings.rates("node"), strict=True):
            bucket.set_rate(rate, burst)
        for device in devices:
            for bucket, rate in zip(device.buckets or (), self.device_rates(device), strict=False):
                bucket.set_rate(rate, burst)
        up, down = settings.rates("session")
        for session in sessions:
            if session.buckets:
                session.buckets[0].set_rate(up, burst)
                session.buckets[1].set_rate(down, burst)
