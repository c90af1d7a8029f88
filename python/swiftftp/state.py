"""The node's state model: the devices it knows, their connections, the relayed
sessions, and the :class:`Node` interface the handlers see (no I/O here).

Module layers, bottom up: this module (with ``errors``, ``config``, ``protocol``,
``ftp``, ``outbox``); the handlers (``command``, ``devices``, ``clients``,
``quota``, ``stats``, ``admin``), which know the node only as :class:`Node`;
and ``node.py``, the composition root that builds and runs everything.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import Busy
from .net import normalize_ip

if TYPE_CHECKING:
    import asyncio
    import socket

    from .command import CommandSession
    from .config import Settings
    from .fleet import FleetKeys, Membership
    from .limits import Guard, Throttle
    from .quota import QuotaBook
    from .registry import Registry
    from .relay import Backend, Bucket
    from .stats import Stats
    from .timers import Wheel
    from .tls import NodeTls


@dataclass(eq=False, slots=True)
class Session:
    """One relayed connection as the logs, stats and quota see it."""

    id: str
    kind: str  # "command" | "control" | "data"
    device: Device | None
    peer: str
    opened: float = field(default_factory=time.monotonic)
    counters: Callable[[], tuple[int, int]] = lambda: (0, 0)
    #: (up, down) token buckets of a data session, for reloads.
    buckets: tuple[Bucket, Bucket] | None = None
    #: Bytes already written to the quota; None for sessions not counted (command).
    accounted: list[int] | None = None
    #: The FTP client's address (normalised) on control and data sessions.
    client_ip: str = ""

    @property
    def prefix(self) -> str:
        return self.device.prefix if self.device else "-"

    def unaccounted(self) -> tuple[int, int]:
        up, down = self.counters()
        assert self.accounted is not None
        return up - self.accounted[0], down - self.accounted[1]

    def take_unaccounted(self) -> int:
        """Bytes moved since the last call, marked as accounted."""
        up, down = self.unaccounted()
        assert self.accounted is not None
        self.accounted[0] += up
        self.accounted[1] += down
        return up + down


class Device:
    """What this node knows of one device while it has any connection here.

    An idle device (its command session only) is most of what a node holds, so
    what only its transfers use is made on first use: its connection books, its
    token buckets, its operator overrides (read from the registry at its first
    transfer or quota check, not at every login). benches/test_density.py: 5.0
    KiB per idle device before, with four empty collections and two buckets each.
    """

    __slots__ = (
        "android_id", "prefix", "command", "_control_peers", "_sessions", "_connections",
        "_logging_in", "quota_bytes", "upload_rate", "download_rate", "buckets", "overrides_loaded",
        "rendezvous_failures",
    )

    def __init__(self, android_id: str, prefix: str) -> None:
        self.android_id = android_id
        self.prefix = prefix
        self.command: CommandSession | None = None
        self._control_peers: Counter[str] | None = None
        self._sessions: set[Session] | None = None
        self._connections: Counter[str] | None = None
        self._logging_in: Counter[str] | None = None
        # Operator overrides from the registry (None: the node's defaults).
        self.quota_bytes: int | None = None
        self.upload_rate: int | None = None
        self.download_rate: int | None = None
        self.overrides_loaded = False
        #: (up, down) token buckets shared by the device's data sessions; made at its first.
        self.buckets: tuple[Bucket, Bucket] | None = None
        #: Rendezvous in a row that the device did not take (see command.py).
        self.rendezvous_failures = 0

    @property
    def control_peers(self) -> Counter[str]:
        """Peer IPs of this device's relayed control connections: the only addresses its
        data connections may reach (RFC 2577)."""
        if self._control_peers is None:
            self._control_peers = Counter()
        return self._control_peers

    @property
    def sessions(self) -> set[Session]:
        if self._sessions is None:
            self._sessions = set()
        return self._sessions

    @property
    def connections(self) -> Counter[str]:
        """Connections being set up or relayed, by kind (caps count these)."""
        if self._connections is None:
            self._connections = Counter()
        return self._connections

    @property
    def logging_in(self) -> Counter[str]:
        """Control connections not logged in yet (no 230 from the device), by client
        address group: one address may hold only a share of the device's slots."""
        if self._logging_in is None:
            self._logging_in = Counter()
        return self._logging_in

    def allows(self, address: str) -> bool:
        """May this device's data connections reach ``address`` (RFC 2577)?"""
        return bool(self._control_peers) and normalize_ip(address) in self.control_peers

    def transferring_for(self, client_ip: str) -> bool:
        """Is a data connection of this device relaying for ``client_ip`` now?"""
        return any(s.kind == "data" and s.client_ip == client_ip for s in self._sessions or ())

    @property
    def idle(self) -> bool:
        return self.command is None and not self._sessions and not self._connections


class DeviceTable:
    """The devices this node knows, by id and by prefix, with the number online
    kept as a count: every per-login decision is O(1)."""

    __slots__ = ("by_id", "by_prefix", "online", "peak", "addresses")

    def __init__(self) -> None:
        self.by_id: dict[str, Device] = {}
        self.by_prefix: dict[str, Device] = {}
        #: Devices with an open command session, and the most since memory was last
        #: given back (memory.py resets it).
        self.online = 0
        self.peak = 0
        #: Address groups with a device online, and how many: their data connections are
        #: let in past the node-wide cap on connections not logged in (a reserve).
        self.addresses: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, android_id: str, prefix: str, new: Callable[[Device], None]) -> Device:
        """The device's record, created (and passed to ``new``) on first use."""
        device = self.by_id.get(android_id)
        if device is None:
            device = self.by_id[android_id] = Device(android_id, prefix)
            self.by_prefix[prefix] = device
            new(device)
        return device

    def set_command(self, device: Device, command: CommandSession | None) -> CommandSession | None:
        """Make ``command`` the device's command session; returns the one it replaces."""
        old, device.command = device.command, command
        self.online += (command is not None) - (old is not None)
        if self.online > self.peak:
            self.peak = self.online
        if command is not None:
            self.addresses[command.group] += 1
        if old is not None:
            self.addresses[old.group] -= 1
            if self.addresses[old.group] <= 0:
                del self.addresses[old.group]
        return old

    def online_device(self, prefix: str) -> Device | None:
        """The device with this prefix if its command session is open here."""
        device = self.by_prefix.get(prefix)
        return device if device is not None and device.command is not None else None

    def forget_if_idle(self, device: Device) -> None:
        if device.idle and self.by_id.get(device.android_id) is device:
            del self.by_id[device.android_id]
            self.by_prefix.pop(device.prefix, None)


@contextlib.contextmanager
def holding(device: Device, kind: str, cap: int, table: DeviceTable) -> Iterator[None]:
    """Count a control or data connection of ``device`` while it is set up and
    relayed; :class:`Busy` past ``cap``."""
    if device.connections[kind] >= cap:
        raise Busy(f"too many {kind} connections for this device")
    device.connections[kind] += 1
    try:
        yield
    finally:
        connections = device.connections
        connections[kind] -= 1
        if connections[kind] <= 0:
            del connections[kind]  # none left: the device may be idle
        table.forget_if_idle(device)


class Node(Protocol):
    """What the handlers may use of a node (``node.ProxyNode`` implements it)."""

    settings: Settings
    registry: Registry
    guard: Guard
    throttle: Throttle
    quota: QuotaBook
    stats: Stats
    backend: Backend
    #: The ``[tls]`` certificate for the TLS device port (a relay TLS config); None: off.
    device_tls: Any
    table: DeviceTable
    sessions: set[Session]
    draining: bool
    pending_listeners: int
    keepalives: Wheel
    fleet: Membership | None
    #: The fleet's device key bindings; None outside a fleet.
    keys: FleetKeys | None
    #: FTPS (tls.NodeTls); None without a certificate.
    tls: NodeTls | None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task: ...

    def device(self, android_id: str, prefix: str) -> Device: ...

    def load_overrides(self, device: Device) -> None: ...

    def listener(self, source: str) -> contextlib.AbstractContextManager[socket.socket]: ...

    def session(
        self, kind: str, device: Device | None, peer: str, client_ip: str = ""
    ) -> contextlib.AbstractContextManager[Session]: ...

    def open_session(
        self, kind: str, device: Device | None, peer: str, client_ip: str = ""
    ) -> Session: ...

    def close_session(self, info: Session, outcome: str) -> None: ...

    def connection(self, device: Device, kind: str) -> contextlib.AbstractContextManager[None]: ...

    def refuse(self, reason: str, detail: str = "", address: str = "") -> None: ...

    def left(self) -> None: ...

    async def prefix_for(self, android_id: str) -> str: ...

    async def create_account(self, android_id: str) -> str: ...

    def public_address_for(self, client: socket.socket) -> str: ...
