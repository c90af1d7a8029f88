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
from pathlib import Path
from typing import Any

from . import admin, logs, memory, relay
from .clients import handle_client, handle_implicit
from .command import close_all
from .config import OPTIONS, Settings, reloadable_changes
from .devices import handle_device, handle_tls_device
from .errors import Busy, ConfigError, ErrorCode, FleetError, ProtocolError, RegistryError
from .fleet import Bucket, FleetKeys, Membership, ServerList, SharedKeys, SharedPrefixes, SharedUsage
from .identity import fingerprint
from .limits import Capacity, Guard, Throttle
from .net import bracketed, close_gracefully, listen_in_range, listen_on, normalize_ip, split_server
from .quota import QuotaBook
from .registry import Registry
from .state import Device, DeviceTable, Session, holding
from .stats import Stats, sample_throughput, serve_http
from .timers import Wheel
from .tls import NodeTls, describe

log = logging.getLogger("swiftftp")

#: A listener's connection handler: (node, socket, peer address) → whether it kept the socket.
Handler = Callable[["ProxyNode", socket.socket, tuple], Coroutine[Any, Any, bool]]


class ProxyNode:
    """Listens for devices and FTP clients and relays between them."""

    def __init__(self, settings: Settings, registry: Registry | None = None) -> None:
        self.settings = settings
        self.backend = relay.get_backend(settings.relay_backend)
        #: FTPS: the certificate, the policy; None without a certificate. ConfigError
        #: with one line for a pair that cannot be used.
        self.tls = NodeTls(settings) if settings.tls_certificate else None
        if self.tls is not None and self.backend.name != "rust":
            raise ConfigError("node.relay: the python relay cannot terminate TLS; use the rust relay "
                              "or remove tls.certificate")
        if settings.tls_device_port and self.tls is None:
            raise ConfigError("tls.device_port: needs tls.certificate and tls.key")
        #: The TLS device port's certificate: the same pair and session cache as FTPS;
        #: None when that port is off.
        self.device_tls: Any = self.tls.config if self.tls is not None and settings.tls_device_port else None
        self.tls_device_port = settings.tls_device_port
        self.registry = registry or Registry(settings.registry_path)
        self.throttle = Throttle(self.backend, settings)
        self.capacity = Capacity(settings)
        self.guard = Guard(settings, self.capacity)
        self.refusals = logs.Refusals(log)
        self.quota = QuotaBook(self)
        self.stats = Stats()
        self.table = DeviceTable()
        self.sessions: set[Session] = set()
        #: Keepalive timers of every command session.
        self.keepalives = Wheel()
        self.pending_listeners = 0
        #: Listeners held per source address: one source may hold only a share of the pool.
        self._listeners_by_source: Counter[str] = Counter()
        #: Set by :meth:`drain`: new FTP clients and command sessions are turned away.
        self.draining = False
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._listeners: list[socket.socket] = []
        self._commit_soon = False
        self._paused: set[asyncio.TimerHandle] = set()  # accepting resumes (after EMFILE)
        self._servers: list[asyncio.Server] = []
        self._control: Path | None = None  # the control socket's file, removed at close
        self._ids = itertools.count(1)
        self.ftp_port = settings.ftp_port
        self.device_port = settings.device_port
        self.stats_address: tuple[str, int] | None = None
        #: This node's place in the fleet; None outside a fleet.
        self.fleet: Membership | None = None
        #: The fleet's key bindings (cached); None outside a fleet.
        self.keys: FleetKeys | None = None
        self.implicit_port = 0

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Bind both listeners (and the stats and control sockets), start accepting."""
        s = self.settings
        devices = listen_on(s.listen, s.device_port, backlog=512)
        try:
            clients = listen_on(s.listen, s.ftp_port, backlog=512)
        except OSError:
            devices.close()
            raise
        self._listeners = [devices, clients]
        if self.tls is not None and s.tls_implicit_port:
            try:
                self._listeners.append(listen_on(s.listen, s.tls_implicit_port, backlog=512))
            except OSError:
                devices.close()
                clients.close()
                raise
            self.implicit_port = self._listeners[2].getsockname()[1]
        self.device_port = devices.getsockname()[1]
        self.ftp_port = clients.getsockname()[1]
        tls_devices = None
        if self.device_tls is not None:
            try:
                tls_devices = listen_on(s.listen, s.tls_device_port, backlog=512)
            except OSError:
                devices.close()
                clients.close()
                raise
            self._listeners.append(tls_devices)
            self.tls_device_port = tls_devices.getsockname()[1]
        try:
            if s.stats_listen:
                server = await serve_http(self, *s.stats_listen)
                self._servers.append(server)
                self.stats_address = server.sockets[0].getsockname()[:2]
            with contextlib.suppress(OSError):  # e.g. a state dir path too long for AF_UNIX
                self._servers.append(await admin.serve(self, admin.socket_path(s.state_dir)))
                self._control = admin.socket_path(s.state_dir)
            if s.fleet_bucket:
                await self._join_fleet()
        except (OSError, FleetError, ConfigError):
            await self.close()
            raise
        logs.setup_transfer_log(
            s.transfer_log if s.transfer_log else s.state_dir / "transfers.log", s.log_format
        )
        self._accept(devices, handle_device, "dev")
        self._accept(clients, handle_client, "ftp")
        if self.implicit_port:
            self._accept(self._listeners[2], handle_implicit, "ftps")
        if tls_devices is not None:
            self._accept(tls_devices, handle_tls_device, "dev")
            log.info("devices over TLS on port %d (%s)", self.tls_device_port,
                     ", ".join(self.device_tls.names) or "certificate without names")
        self.spawn(self.quota.run(), "quota-flush")
        self.spawn(sample_throughput(self), "throughput")
        self.spawn(self.refusals.run(), "refusals")
        self.spawn(memory.watch(self.table), "memory")
        self.stats.listening = True
        log.info(
            "listening on %s: FTP clients on port %d, devices on port %d, relay backend %s",
            bracketed(s.listen), self.ftp_port, self.device_port, self.backend.name,
        )
        log.info("%s", self.capacity.describe())
        if self.tls is not None:
            from ._rustrelay import RustBackend  # built: the TLS pair loaded through it

            implicit = f", implicit FTPS on port {self.implicit_port}" if self.implicit_port else ""
            log.info("TLS: %s; explicit FTPS (AUTH TLS) on port %d%s%s; %s", describe(self.tls.config),
                     self.ftp_port, implicit, ", required" if s.tls_require else "",
                     RustBackend.tls_status())

    def reload_tls(self) -> None:
        """Read the ``[tls]`` pair again for new handshakes, FTPS and the TLS device port
        (SIGHUP: a renewed certificate); a pair that does not load is logged and the old
        one stays."""
        if self.tls is not None:
            self.tls.reload()  # the same paths too: certbot renews in place

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
        # quotas, usage and overrides fleet-wide: usage/<period>/<device>/<host>, overrides/<device>
        self.quota.shared = SharedUsage(bucket, host)
        # device keys fleet-wide: keys/<device> (trust on first use anywhere binds everywhere)
        self.keys = FleetKeys(SharedKeys(bucket))
        self.spawn(self._publish_keys(), "fleet-keys")
        self.spawn(fleet.run(), "fleet-heartbeat")
        log.info("in the fleet of bucket %s as %s; servers: %s", bucket.name, host,
                 ", ".join(fleet.servers))

    async def _publish_keys(self) -> None:
        """Keys this registry bound before the node joined the fleet go to the bucket
        (created only if absent): the fleet's binding wins where it differs, and this
        registry follows it. From a thread; a bucket that fails only logs."""
        assert self.keys is not None
        shared = self.keys.shared

        def publish() -> dict[str, str | None]:
            changed: dict[str, str | None] = {}
            for record in self.registry.all():
                if not record.public_key:
                    continue
                fleet_key = shared.reconcile(record.android_id, record.public_key)
                if fleet_key != record.public_key:
                    changed[record.android_id] = fleet_key
            return changed

        try:
            changed = await asyncio.to_thread(publish)
        except (FleetError, RegistryError) as exc:
            log.warning("could not publish this node's device keys to the fleet: %s", exc)
            return
        for android_id, key in changed.items():  # the fleet's binding differs: follow it
            self.registry.unbind(android_id)
            if key is not None:
                self.registry.bind(android_id, key)
            logs.event(log, "device_key_from_fleet", device=android_id, key=fingerprint(key) if key else "-")

    async def prefix_for(self, android_id: str) -> str:
        """The device's prefix. A device the registry knows costs no query once seen;
        a first login allots one: here, or in a fleet by asking the bucket from a
        thread so the loop goes on (if S3 cannot be reached the device is told to try
        again, error 0)."""
        prefix = self.registry.lookup(android_id)
        if prefix is not None:
            return prefix
        if self.registry.shared is None:
            prefix = self.registry.allot(android_id)
            if not self._commit_soon:  # once per loop iteration, for all that came in it
                self._commit_soon = True
                asyncio.get_running_loop().call_soon(self._commit)
            return prefix
        return await self._ask_fleet(self.registry.prefix_for, android_id)

    def _commit(self) -> None:
        self._commit_soon = False
        with contextlib.suppress(RegistryError):  # recorded and logged once by the registry
            self.registry.commit()

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
        ask every device to ``reconnect`` when idle (docs/protocol.md), and give the clients
        and transfers already here up to ``timeout`` seconds.  True if they all ended."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        others = await self.fleet.leave() if self.fleet else []
        commands = [d.command for d in self.devices.values() if d.command is not None]
        log.info("draining: %d devices asked to reconnect%s, %d clients and transfers to finish",
                 len(commands), " elsewhere in the fleet" if others else "", self.busy)
        for command in commands:
            newserver = random.choice(others) if others else None
            command.notify({"action": "reconnect"} | ({"newserver": newserver} if newserver else {}))
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
        self.stats.listening = False
        if self.fleet:
            await self.fleet.leave()
        for server in self._servers:
            server.close()
        close_all([d.command for d in self.devices.values() if d.command is not None], "node stopping")
        self.keepalives.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        for handle in self._paused:
            handle.cancel()
        for listener in self._listeners:
            if listener.fileno() >= 0:
                loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self._control is not None:  # Python 3.11's unix servers leave their file
            with contextlib.suppress(OSError):
                self._control.unlink()
            self._control = None
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
        loaded = [d for d in self.devices.values() if d.overrides_loaded]  # the others: at
        if self.quota.shared is not None:  # their first transfer. The fleet's, from a thread
            self.spawn(self.quota.exchange(also=[d.android_id for d in loaded]), "fleet-reload")
        else:
            for device in loaded:
                self._load_overrides(device)
        self.throttle.apply(merged, list(self.devices.values()), list(self.sessions))
        capacity = Capacity(merged, self.capacity.nofile)  # caps derived anew from the settings
        self.capacity.command_sessions, self.capacity.pending = capacity.command_sessions, capacity.pending
        self.reload_tls()
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

    def _accept(self, listener: socket.socket, handler: Handler, kind: str) -> None:
        """Accept from a loop reader registered once (not one registration per
        connection): each connection gets a task of its own."""
        loop = asyncio.get_running_loop()
        fd = listener.fileno()

        def ready() -> None:
            for _ in range(64):  # a burst at most, then the loop's other work
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # EMFILE and friends: pause, keep the listener
                    self.refusals.add(f"accept on the {kind} port failed: {exc.strerror or exc}")
                    loop.remove_reader(fd)
                    self._paused.add(loop.call_later(0.1, resume))
                    return
                sock.setblocking(False)
                conn_id = f"{kind}{next(self._ids)}"
                self.spawn(self._guard(handler, sock, address, conn_id), conn_id)

        def resume() -> None:
            self._paused.clear()
            if listener.fileno() >= 0:
                loop.add_reader(fd, ready)

        loop.add_reader(fd, ready)

    async def _guard(self, handler: Handler, sock: socket.socket, address: tuple, conn_id: str) -> None:
        """Whatever a handler does, the socket is closed (unless the handler kept it: a
        command session owns it then) and the listener lives on."""
        logs.session_id.set(conn_id)
        kept = False
        try:
            kept = await handler(self, sock, address)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("connection handler failed")
        finally:
            if not kept:
                await close_gracefully(sock)

    # ---- devices ------------------------------------------------------------------

    @property
    def devices(self) -> dict[str, Device]:
        """The devices with any connection here, by device id."""
        return self.table.by_id

    @property
    def by_prefix(self) -> dict[str, Device]:
        return self.table.by_prefix

    def device(self, android_id: str, prefix: str) -> Device:
        """The device's record on this node, created on first use."""
        return self.table.get(android_id, prefix, self._new_device)

    def _new_device(self, device: Device) -> None:
        pass  # overrides and buckets wait for the device's first transfer (see Device)

    def load_overrides(self, device: Device) -> None:
        """The operator's quota and rates for ``device`` from the registry (once; again on
        SIGHUP)."""
        if not device.overrides_loaded:
            self._load_overrides(device)

    async def prepare_transfer(self, device: Device) -> None:
        """Before a data connection: the device's overrides, and in a fleet its fleet-wide
        usage and overrides, read at its first transfer here (a bounded wait; not at its
        login: a node's devices coming back at once would each cost S3 round trips)."""
        if not device.overrides_loaded:
            self._load_overrides(device)
            self.quota.read_soon(device)
        await self.quota.ready(device)

    def _load_overrides(self, device: Device) -> None:
        device.overrides_loaded = True
        try:
            record = self.registry.find(device.android_id)
        except RegistryError:  # logged once by the registry: the node's defaults meanwhile
            return
        if record:
            device.quota_bytes = record.quota_bytes
            device.upload_rate, device.download_rate = record.upload_rate, record.download_rate

    def connection(self, device: Device, kind: str) -> contextlib.AbstractContextManager[None]:
        """Count a control or data connection of ``device`` while it is set up and relayed."""
        cap = {
            "control": self.settings.max_control_per_device,
            "data": self.settings.max_data_per_device,
        }[kind]
        return holding(device, kind, cap, self.table)

    def online(self, prefix: str) -> Device | None:
        """The device with this prefix if its command session is open here."""
        return self.table.online_device(prefix)

    @property
    def command_sessions(self) -> int:
        return self.table.online

    def public_address_for(self, client: socket.socket) -> str:
        """The address a client should use to reach this node (for 227 replies)."""
        return self.settings.public_address or normalize_ip(client.getsockname()[0])

    @contextlib.contextmanager
    def listener(self, source: str) -> Iterator[socket.socket]:
        """A rendezvous or passive listener from the data port range, capped node-wide,
        and per ``source`` (the address that caused it) to an eighth of the pool."""
        cap = self.settings.max_pending_listeners
        if self.pending_listeners >= cap:
            raise Busy("too many pending listeners on this node")
        if self._listeners_by_source[source] >= max(1, cap // 8):
            raise Busy("too many pending listeners for one address")
        sock = listen_in_range(self.settings.listen, self.settings.data_ports)
        self.pending_listeners += 1
        self._listeners_by_source[source] += 1
        try:
            yield sock
        finally:
            self.pending_listeners -= 1
            self._listeners_by_source[source] -= 1
            if self._listeners_by_source[source] <= 0:
                del self._listeners_by_source[source]
            sock.close()

    def refuse(self, reason: str, detail: str = "", address: str = "") -> None:
        """Count a refusal, and log it: at once the first of its reason, then as a
        periodic summary with the addresses that caused most (logs.Refusals)."""
        self.stats.refuse(reason)
        self.refusals.add(reason, detail, address)

    # ---- sessions -----------------------------------------------------------------

    def open_session(self, kind: str, device: Device | None, peer: str, client_ip: str = "") -> Session:
        """Log and count a session; :meth:`close_session` ends it."""
        info = Session(logs.session_id.get(), kind, device, peer, client_ip=client_ip)
        if kind != "command":
            info.accounted = [0, 0]
        self.stats.opened[kind] += 1
        self.sessions.add(info)
        if device:
            device.sessions.add(info)
        # One INFO line per session, when it closes (as haproxy and nginx log): the open
        # line at DEBUG. Two lines per device login were a third of a reconnect storm's CPU.
        logs.event(log, "session_open", level=logging.DEBUG, id=info.id, kind=kind, prefix=info.prefix,
                   peer=peer)
        return info

    @contextlib.contextmanager
    def session(
        self, kind: str, device: Device | None, peer: str, client_ip: str = ""
    ) -> Iterator[Session]:
        """Log, count and account one session from open to close."""
        info = self.open_session(kind, device, peer, client_ip)
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
            self.close_session(info, outcome)

    def close_session(self, info: Session, outcome: str) -> None:
        up, down = info.counters()
        duration = time.monotonic() - info.opened
        self.stats.session_closed(info.kind, info.prefix, up, down, duration)  # ops hook: histograms
        self.sessions.discard(info)
        self.left()
        if info.kind != "command":
            self.stats.closed_bytes[0] += up
            self.stats.closed_bytes[1] += down
            self.quota.settle(info)
        logs.event(log, "session_close", id=info.id, kind=info.kind, prefix=info.prefix, peer=info.peer,
                   up=up, down=down, duration=round(duration, 3), reason=outcome)
        if info.kind == "data":
            direction = "upload" if up > down else "download" if down else "none"
            logs.log_transfer(
                session=info.id, prefix=info.prefix, client=info.peer, direction=direction,
                bytes=up + down, up=up, down=down, duration=f"{duration:.3f}",
                rate=round((up + down) / duration) if duration > 0 else 0, outcome=outcome,
            )
        if info.device:
            info.device.sessions.discard(info)
            self.table.forget_if_idle(info.device)
