"""A proxy node: the two listeners, the devices it knows, and every task it owns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import aio, relay
from .config import Settings
from .net import close_gracefully, listen_on, normalize_ip
from .registry import Registry

if TYPE_CHECKING:
    from .devices import CommandSession

log = logging.getLogger("swiftftp")


@dataclass(eq=False)
class Session:
    """One relayed connection as the logs and stats see it."""

    id: str
    kind: str  # "command" | "control" | "data"
    prefix: str
    peer: str
    opened: float = field(default_factory=time.monotonic)
    counters: Callable[[], tuple[int, int]] = lambda: (0, 0)


class Device:
    """What this node knows of one device while it has any connection here."""

    def __init__(self, android_id: str, prefix: str) -> None:
        self.android_id = android_id
        self.prefix = prefix
        self.command: CommandSession | None = None
        #: Peer IPs of this device's relayed control connections: the only
        #: addresses its data connections may reach (RFC 2577).
        self.control_peers: Counter[str] = Counter()
        self.sessions: set[Session] = set()

    def allows(self, address: str) -> bool:
        return normalize_ip(address) in self.control_peers

    @property
    def idle(self) -> bool:
        return self.command is None and not self.sessions


class ProxyNode:
    """Listens for devices and FTP clients and relays between them."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings.registry_path)
        self.backend = relay.get_backend(settings.relay_backend)
        self.devices: dict[str, Device] = {}  # by android_id
        self.by_prefix: dict[str, Device] = {}
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[socket.socket] = []
        self._ids = itertools.count(1)
        self.opened: Counter[str] = Counter()
        self.started = time.time()
        self.ftp_port = settings.ftp_port
        self.device_port = settings.device_port

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind both listeners and start accepting."""
        from .clients import handle_client
        from .devices import handle_device

        s = self.settings
        devices = listen_on(s.listen, s.device_port, backlog=512)
        try:
            clients = listen_on(s.listen, s.ftp_port, backlog=512)
        except OSError:
            devices.close()
            raise
        self._listeners = [devices, clients]
        self.device_port = devices.getsockname()[1]
        self.ftp_port = clients.getsockname()[1]
        self.spawn(self._accept(devices, handle_device), "accept-devices")
        self.spawn(self._accept(clients, handle_client), "accept-clients")
        log.info(
            "listening on %s: FTP clients on port %d, devices on port %d, relay backend %s",
            s.listen, self.ftp_port, self.device_port, self.backend.name,
        )

    async def close(self) -> None:
        """Stop listening, end every session, wait for every task."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        self._listeners = []

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Start a task the node owns: kept, named, cancelled on close."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def tasks(self) -> int:
        return len(self._tasks)

    async def _accept(
        self,
        listener: socket.socket,
        handler: Callable[[ProxyNode, socket.socket], Coroutine[Any, Any, None]],
    ) -> None:
        kind = handler.__name__.removeprefix("handle_")
        while True:
            try:
                sock, _ = await aio.accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                log.warning("accept on %s failed: %s", kind, exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            self.spawn(self._guard(handler, sock), f"{kind}-{next(self._ids)}")

    async def _guard(
        self,
        handler: Callable[[ProxyNode, socket.socket], Coroutine[Any, Any, None]],
        sock: socket.socket,
    ) -> None:
        """Whatever a handler does, the socket is closed and the listener lives on."""
        try:
            await handler(self, sock)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection handler failed")
        finally:
            await close_gracefully(sock)

    # ---- devices ------------------------------------------------------------------

    def device(self, android_id: str, prefix: str) -> Device:
        """The device's record on this node, created on first use."""
        device = self.devices.get(android_id)
        if device is None:
            device = self.devices[android_id] = Device(android_id, prefix)
            self.by_prefix[prefix] = device
        return device

    def forget_if_idle(self, device: Device) -> None:
        if device.idle and self.devices.get(device.android_id) is device:
            del self.devices[device.android_id]
            self.by_prefix.pop(device.prefix, None)

    def online(self, prefix: str) -> Device | None:
        """The device with this prefix if its command session is open here."""
        device = self.by_prefix.get(prefix)
        return device if device and device.command else None

    def public_address_for(self, client: socket.socket) -> str:
        """The address a client should use to reach this node (for 227 replies)."""
        return self.settings.public_address or normalize_ip(client.getsockname()[0])

    # ---- sessions -----------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, kind: str, device: Device | None, peer: str, **extra: Any):
        """Log and count one session from open to close."""
        info = Session(f"{kind[:3]}{next(self._ids)}", kind, device.prefix if device else "-", peer)
        self.opened[kind] += 1
        if device:
            device.sessions.add(info)
        log.info("session open id=%s kind=%s prefix=%s peer=%s", info.id, kind, info.prefix, peer)
        reason = "closed"
        try:
            yield info
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        except BaseException as exc:
            reason = type(exc).__name__
            raise
        finally:
            up, down = info.counters()
            log.info(
                "session close id=%s kind=%s prefix=%s peer=%s up=%d down=%d duration=%.3f reason=%s",
                info.id, kind, info.prefix, peer, up, down, time.monotonic() - info.opened, reason,
            )
            if device:
                device.sessions.discard(info)
                self.forget_if_idle(device)
