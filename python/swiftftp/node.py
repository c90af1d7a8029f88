"""A proxy node: the two listeners, the devices it knows, every session and task it owns."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import admin, aio, logs, relay
from .config import OPTIONS, Settings, reloadable_changes
from .errors import ConfigError, ErrorCode, FleetError, ProtocolError
from .fleet import Bucket, Membership, ServerList, SharedPrefixes
from .limits import Guard, Throttle
from .net import bracketed, close_gracefully, listen_in_range, listen_on, normalize_ip, split_server
from .quota import QuotaBook
from .registry import Registry
from .stats import Stats, sample_throughput, serve_http

if TYPE_CHECKING:
    from .devices import CommandSession
    from .relay import Bucket

log = logging.getLogger("swiftftp")


class Busy(Exception):
    """A cap was reached; the message says which, for the refusal."""


@dataclass(eq=False)
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
    """What this node knows of one device while it has any connection here."""

    def __init__(self, android_id: str, prefix: str) -> None:
        self.android_id = android_id
        self.prefix = prefix
        self.command: CommandSession | None = None
        #: Peer IPs of this device's relayed control connections: the only
        #: addresses its data connections may reach (RFC 2577).
        self.control_peers: Counter[str] = Counter()
        self.sessions: set[Session] = set()
        #: Connections being set up or relayed, by kind (caps count these).
        self.connections: Counter[str] = Counter()
        # Operator overrides from the registry (None: the node's defaults).
        self.quota_bytes: int | None = None
        self.upload_rate: int | None = None
        self.download_rate: int | None = None
        self.buckets: tuple[Bucket, Bucket]

    def allows(self, address: str) -> bool:
        return normalize_ip(address) in self.control_peers

    @property
    def idle(self) -> bool:
        return self.command is None and not self.sessions and not +self.connections


class ProxyNode:
    """Listens for devices and FTP clients and relays between them."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.registry = registry or Registry(settings.registry_path)
        self.backend = relay.get_backend(settings.relay_backend)
        self.throttle = Throttle(self.backend, settings)
        self.guard = Guard(settings)
        self.quota = QuotaBook(self)
        self.stats = Stats()
        self.devices: dict[str, Device] = {}  # by android_id
        self.by_prefix: dict[str, Device] = {}
        self.sessions: set[Session] = set()
        self.pending_listeners = 0
        #: Set by :meth:`drain`: new FTP clients and command sessions are turned away.
        self.draining = False
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._ids = itertools.count(1)
        self.ftp_port = settings.ftp_port
        self.device_port = settings.device_port
        self.stats_address: tuple[str, int] | None = None
        #: This node's place in the fleet; None outside a fleet.
        self.fleet: Membership | None = None

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind both listeners (and the stats and control sockets), start accepting."""
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
        try:
            if s.stats_listen:
                server = await serve_http(self, *s.stats_listen)
                self._servers.append(server)
                self.stats_address = server.sockets[0].getsockname()[:2]
            with contextlib.suppress(OSError):  # e.g. a state dir path too long for AF_UNIX
                self._servers.append(await admin.serve(self, admin.socket_path(s.state_dir)))
            if s.fleet_bucket:
                await self._join_fleet()
        except (OSError, FleetError, ConfigError):
            await self.close()
            raise
        logs.setup_transfer_log(
            s.transfer_log if s.transfer_log else s.state_dir / "transfers.log", s.log_format
        )
        self.spawn(self._accept(devices, handle_device, "dev"), "accept-devices")
        self.spawn(self._accept(clients, handle_client, "ftp"), "accept-clients")
        self.spawn(self.quota.run(), "quota-flush")
        self.spawn(sample_throughput(self), "throughput")
        log.info(
            "listening on %s: FTP clients on port %d, devices on port %d, relay backend %s",
            bracketed(s.listen), self.ftp_port, self.device_port, self.backend.name,
        )

    async def _join_fleet(self) -> None:
        """Share the bucket's prefix map, and put this node on the server list."""
        s = self.settings
        bucket = Bucket(s.fleet_bucket or "", s.s3_endpoint, s.fleet_key_prefix)
        await asyncio.to_thread(bucket.check)
        self.registry.shared = SharedPrefixes(bucket)
        host = s.fleet_host or s.public_address or socket.getfqdn()
        if split_server(host, 0)[1] == 0 and self.device_port != 2222:
            host = f"{bracketed(host)}:{self.device_port}"  # devices assume 2222 otherwise
        ports = {"ftp_port": self.ftp_port, "device_port": self.device_port}
        fleet = Membership(ServerList(bucket, host, ports, s.fleet_heartbeat, s.fleet_servers_key))
        await fleet.join()
        self.fleet = fleet
        self.spawn(fleet.run(), "fleet-heartbeat")
        log.info("in the fleet of bucket %s as %s; servers: %s", bucket.name, host,
                 ", ".join(fleet.servers))

    async def prefix_for(self, android_id: str) -> str:
        """The device's prefix.  In a fleet, a first login on this node asks the bucket,
        from a thread so the loop goes on; if S3 cannot be reached the device is told to
        try again (error 0)."""
        if self.registry.shared is None or self.registry.known(android_id):
            return self.registry.prefix_for(android_id)
        return await self._ask_fleet(self.registry.prefix_for, android_id)

    async def create_account(self, android_id: str) -> str:
        """Legacy ``create_account`` (a secret); in a fleet, off the loop like prefix_for."""
        if self.registry.shared is None:
            return self.registry.create_account(android_id)
        return await self._ask_fleet(self.registry.create_account, android_id)

    async def _ask_fleet(self, call: Callable[[str], str], android_id: str) -> str:
        try:
            return await asyncio.to_thread(call, android_id)
        except (FleetError, RuntimeError) as exc:  # S3 unreachable, or no prefix to be had
            log.error("cannot register %s: %s", android_id, exc)
            raise ProtocolError(ErrorCode.INTERNAL, "device registry unavailable; try again") from None

    @property
    def busy(self) -> int:
        """FTP clients connected plus data sessions open: what a drain waits for."""
        return sum(self.guard.connections.values()) + sum(s.kind == "data" for s in self.sessions)

    async def drain(self, timeout: float) -> bool:
        """Wind down before a stop: turn new FTP clients and command sessions away,
        ask every device to ``reconnect`` when idle (PROTOCOL.md), and give the clients
        and transfers already here up to ``timeout`` seconds.  True if they all ended."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def tell(command: Any, newserver: str | None) -> None:
            message = {"action": "reconnect"} | ({"newserver": newserver} if newserver else {})
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(5):
                    await command.notify(message)

        others = await self.fleet.leave() if self.fleet else []
        commands = [d.command for d in self.devices.values() if d.command is not None]
        log.info("draining: %d devices asked to reconnect%s, %d clients and transfers to finish",
                 len(commands), " elsewhere in the fleet" if others else "", self.busy)
        await asyncio.gather(*(tell(c, random.choice(others) if others else None) for c in commands))
        self.left()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await self._drained.wait()
        if self.busy:
            log.warning("drain timed out: %d clients and transfers still open", self.busy)
            return False
        log.info("drained")
        return True

    def left(self) -> None:
        """A client or a transfer ended: the drain may be over."""
        if self.draining and not self.busy:
            self._drained.set()

    async def close(self) -> None:
        """Stop listening, end every session, flush the quota, wait for every task."""
        if self.fleet:
            await self.fleet.leave()
        for server in self._servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        self._listeners = []
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        logs.setup_transfer_log(None, "plain")

    def reload(self, settings: Settings) -> list[str]:
        """Apply the reloadable part of ``settings`` (SIGHUP); returns what changed."""
        applied, ignored = reloadable_changes(self.settings, settings)
        if ignored:
            log.warning("reload: %s need a restart; kept as they were", ", ".join(ignored))
        # in place: the guard, the throttle and every handler read this same object
        merged = self.settings
        for option in OPTIONS:
            if option.reloadable:
                setattr(merged, option.attr, getattr(settings, option.attr))
        for device in self.devices.values():
            self._load_overrides(device)
        self.throttle.apply(merged, list(self.devices.values()), list(self.sessions))
        log.info("reloaded: %s", ", ".join(applied) or "nothing changed")
        return applied

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
        kind: str,
    ) -> None:
        while True:
            try:
                sock, _ = await aio.accept(listener)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                log.warning("accept on the %s port failed: %s", kind, exc)
                await asyncio.sleep(0.1)
                continue
            conn_id = f"{kind}{next(self._ids)}"
            self.spawn(self._guard(handler, sock, conn_id), conn_id)

    async def _guard(
        self,
        handler: Callable[[ProxyNode, socket.socket], Coroutine[Any, Any, None]],
        sock: socket.socket,
        conn_id: str,
    ) -> None:
        """Whatever a handler does, the socket is closed and the listener lives on."""
        logs.session_id.set(conn_id)
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
            self._load_overrides(device)
            device.buckets = self.throttle.device_buckets(device)
        return device

    def _load_overrides(self, device: Device) -> None:
        record = self.registry.find(device.android_id)
        if record:
            device.quota_bytes = record.quota_bytes
            device.upload_rate, device.download_rate = record.upload_rate, record.download_rate

    def forget_if_idle(self, device: Device) -> None:
        if device.idle and self.devices.get(device.android_id) is device:
            del self.devices[device.android_id]
            self.by_prefix.pop(device.prefix, None)

    @contextlib.contextmanager
    def connection(self, device: Device, kind: str) -> Iterator[None]:
        """Count a control or data connection of ``device`` while it is set up and relayed."""
        cap = {
            "control": self.settings.max_control_per_device,
            "data": self.settings.max_data_per_device,
        }[kind]
        if device.connections[kind] >= cap:
            raise Busy(f"too many {kind} connections for this device")
        device.connections[kind] += 1
        try:
            yield
        finally:
            device.connections[kind] -= 1
            self.forget_if_idle(device)

    def online(self, prefix: str) -> Device | None:
        """The device with this prefix if its command session is open here."""
        device = self.by_prefix.get(prefix)
        return device if device and device.command else None

    @property
    def command_sessions(self) -> int:
        return sum(1 for d in self.devices.values() if d.command)

    def public_address_for(self, client: socket.socket) -> str:
        """The address a client should use to reach this node (for 227 replies)."""
        return self.settings.public_address or normalize_ip(client.getsockname()[0])

    @contextlib.contextmanager
    def listener(self) -> Iterator[socket.socket]:
        """A rendezvous or passive listener from the data port range, capped node-wide."""
        if self.pending_listeners >= self.settings.max_pending_listeners:
            raise Busy("too many pending listeners on this node")
        sock = listen_in_range(self.settings.listen, self.settings.data_ports)
        self.pending_listeners += 1
        try:
            yield sock
        finally:
            self.pending_listeners -= 1
            sock.close()

    def refuse(self, reason: str, detail: str = "") -> None:
        """Count and log a refusal."""
        self.stats.refuse(reason)
        log.warning("refused (%s)%s", reason, f": {detail}" if detail else "")

    # ---- sessions -----------------------------------------------------------------

    @contextlib.contextmanager
    def session(self, kind: str, device: Device | None, peer: str) -> Iterator[Session]:
        """Log, count and account one session from open to close."""
        info = Session(logs.session_id.get(), kind, device, peer)
        if kind != "command":
            info.accounted = [0, 0]
        self.stats.opened[kind] += 1
        self.sessions.add(info)
        if device:
            device.sessions.add(info)
        log.info("session open id=%s kind=%s prefix=%s peer=%s", info.id, kind, info.prefix, peer)
        outcome = "ok"
        try:
            yield info
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except TimeoutError:
            outcome = "timeout"
            raise
        except BaseException as exc:
            outcome = type(exc).__name__
            raise
        finally:
            self._closed(info, outcome)

    def _closed(self, info: Session, outcome: str) -> None:
        up, down = info.counters()
        duration = time.monotonic() - info.opened
        self.stats.session_closed(info.kind, info.prefix, up, down, duration)  # ops hook: histograms
        self.sessions.discard(info)
        self.left()
        if info.kind != "command":
            self.stats.closed_bytes[0] += up
            self.stats.closed_bytes[1] += down
            try:
                self.quota.flush([info])
            except Exception:
                log.exception("quota flush failed")
        log.info(
            "session close id=%s kind=%s prefix=%s peer=%s up=%d down=%d duration=%.3f reason=%s",
            info.id, info.kind, info.prefix, info.peer, up, down, duration, outcome,
        )
        if info.kind == "data":
            direction = "upload" if up > down else "download" if down else "none"
            logs.log_transfer(
                session=info.id, prefix=info.prefix, client=info.peer, direction=direction,
                bytes=up + down, up=up, down=down, duration=f"{duration:.3f}",
                rate=round((up + down) / duration) if duration > 0 else 0, outcome=outcome,
            )
        if info.device:
            info.device.sessions.discard(info)
            self.forget_if_idle(info.device)
