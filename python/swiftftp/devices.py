"""The device listener: logins, command sessions and data connections (PROTOCOL.md).

Every device connection starts with a login; the next message decides what
the connection is: a command session, or a data connection in passive
(``data_pasv_listen``) or active (``data_port_connect``) mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from . import aio
from .channel import DeviceChannel
from .errors import ErrorCode, PeerClosed, ProtocolError
from .net import accept_first, dial, normalize_ip
from .node import Busy
from .protocol import action_of, error, field
from .registry import AccountExists

if TYPE_CHECKING:
    from .node import Device, ProxyNode

log = logging.getLogger("swiftftp.devices")

MAX_ANDROID_ID = 128
#: Reported as the quota of a device that has none: the largest integer every JSON reader keeps.
UNLIMITED_QUOTA = 2**53 - 1


def valid_android_id(android_id: str) -> bool:
    """Non-empty, not absurdly long, printable ASCII without spaces."""
    return 0 < len(android_id) <= MAX_ANDROID_ID and all(33 <= ord(c) < 127 for c in android_id)


async def login(node: ProxyNode, chan: DeviceChannel) -> tuple[str, str]:
    """Read the login (or the legacy create_account/authenticate) and answer it.

    Returns (android_id, prefix); raises ProtocolError after replying with
    the error, so the caller only has to close.
    """
    while True:
        message = await chan.recv()
        action = action_of(message)
        if action not in ("login", "authenticate", "create_account"):
            raise ProtocolError(ErrorCode.MALFORMED, f"expected login, got {action!r}")
        android_id = field(message, "android_id", str)
        if not valid_android_id(android_id):
            raise ProtocolError(ErrorCode.INVALID_DEVICE_ID, "invalid android_id")
        if action != "authenticate" and not node.registry.known(android_id):
            if not node.guard.new_device(normalize_ip(chan.peer[0])):
                node.refuse("too many new devices from one address", "{}:{}".format(*chan.peer))
                raise ProtocolError(ErrorCode.INTERNAL, "too many new devices from this address")
        if action == "create_account":  # deprecated: answers a secret, then a login follows
            try:
                secret = await node.create_account(android_id)
            except AccountExists:
                raise ProtocolError(ErrorCode.ACCOUNT_EXISTS, "account already exists") from None
            await chan.send({"secret": secret})
            continue
        if action == "authenticate":
            secret = field(message, "secret", str)
            if not node.registry.check_secret(android_id, secret):
                raise ProtocolError(ErrorCode.BAD_CREDENTIALS, "device id or secret not valid")
        else:
            field(message, "swiftp_version", str, required=False)
        prefix = await node.prefix_for(android_id)
        await chan.send({})
        return android_id, prefix


async def handle_device(node: ProxyNode, sock: socket.socket) -> None:
    """One connection on the device port, from login to close."""
    chan = DeviceChannel(sock, grace=node.settings.device_grace)
    peer = "{}:{}".format(*chan.peer)
    ip = normalize_ip(chan.peer[0])
    try:
        if not node.guard.admit_login(ip):
            node.refuse("too many pending device logins", peer)
            raise ProtocolError(ErrorCode.INTERNAL, "too many connections from this address")
        try:
            async with asyncio.timeout(node.settings.device_login_timeout):
                android_id, prefix = await login(node, chan)
                request = await chan.recv()
                action = action_of(request)
        finally:
            node.guard.login_done(ip)
        device = node.device(android_id, prefix)
        try:
            if action == "start_command_session":
                await CommandSession(node, device, chan, peer).run()
            elif action in ("data_pasv_listen", "data_port_connect"):
                if node.quota.over(device):
                    node.stats.quota_refusals += 1
                    node.refuse("over quota", device.prefix)
                    raise ProtocolError(ErrorCode.OVER_QUOTA, "the device is over its quota")
                with node.connection(device, "data"):
                    if action == "data_pasv_listen":
                        await passive_data(node, device, chan, peer)
                    else:
                        await active_data(node, device, chan, peer, request)
            else:
                raise ProtocolError(ErrorCode.MALFORMED, f"unexpected action {action!r}")
        except Busy as exc:
            node.refuse(str(exc), device.prefix)
            raise ProtocolError(ErrorCode.INTERNAL, str(exc)) from None
        finally:
            node.forget_if_idle(device)
    except ProtocolError as exc:
        log.info("device %s: %s", peer, exc)
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            async with asyncio.timeout(1):
                await chan.send(error(exc.code, exc.text))
                await chan.settle()
    except (PeerClosed, TimeoutError, OSError) as exc:
        log.info("device %s: %s", peer, exc or type(exc).__name__)
    # the caller closes the socket, gracefully: an error reply must not be lost to a RST


class CommandSession:
    """A device's long-lived command session: its presence on this node."""

    def __init__(self, node: ProxyNode, device: Device, chan: DeviceChannel, peer: str) -> None:
        self.node = node
        self.device = device
        self.chan = chan
        self.peer = peer
        self._task = asyncio.current_task()

    async def notify(self, message: dict[str, Any]) -> None:
        """Send the device a request (paced: never two in one device read)."""
        await self.chan.send(message)

    def close(self, reason: str) -> None:
        log.info("command session of %s closed: %s", self.device.prefix, reason)
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        device = self.device
        old = device.command
        if self.node.draining:
            raise Busy("this node is shutting down")
        if old is None and self.node.command_sessions >= self.node.settings.max_command_sessions:
            raise Busy("too many devices on this node")
        device.command = self
        if old is not None:
            old.close("replaced by a new login")  # the phone reconnected
        with self.node.session("command", device, self.peer) as info:
            info.counters = lambda: (self.chan.bytes_in, self.chan.bytes_out)
            keepalive = self.node.spawn(self._keepalive(), f"keepalive-{device.prefix}")
            try:
                await self.chan.send({"prefix": device.prefix})
                while True:
                    if not await self._serve(await self.chan.recv()):
                        return
            finally:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
                if device.command is self:
                    device.command = None

    async def _serve(self, request: dict[str, Any]) -> bool:
        """Answer one device request; False once the session should end."""
        try:
            action = action_of(request)
        except ProtocolError as exc:
            await self.chan.send(error(exc.code, exc.text))
            return True
        if action == "noop":
            await self.chan.send({})
        elif action == "check_quota":
            quota = self.node.quota
            limit = quota.limit(self.device) or UNLIMITED_QUOTA
            await self.chan.send({"quota": limit, "used": quota.used(self.device)})
        elif action == "finished":
            await self.chan.send({})
            await self.chan.settle()
            return False
        else:
            await self.chan.send(error(ErrorCode.MALFORMED, f"unknown action {action!r}"))
        return True

    async def _keepalive(self) -> None:
        """A ``noop`` after ``keepalive_interval`` seconds of silence either way."""
        interval = self.node.settings.keepalive_interval
        while True:
            quiet = time.monotonic() - max(self.chan.last_recv, self.chan.last_send)
            if quiet >= interval:
                try:
                    await self.notify({"action": "noop"})
                except OSError:
                    self.close("keepalive failed")
                    return
                quiet = 0
            await asyncio.sleep(interval - quiet)


async def passive_data(node: ProxyNode, device: Device, chan: DeviceChannel, peer: str) -> None:
    """``data_pasv_listen``: a port for the client, then ``data_pasv_accept``."""
    if not device.control_peers:
        raise ProtocolError(ErrorCode.PASV_TIMEOUT, "no control connection of this device here")
    with node.listener() as listener:
        await _passive(node, device, chan, peer, listener)


async def _passive(
    node: ProxyNode, device: Device, chan: DeviceChannel, peer: str, listener: socket.socket
) -> None:
    s = node.settings
    port = listener.getsockname()[1]

    async def from_control_peer(sock: socket.socket) -> bool | None:
        address = sock.getpeername()[0]
        if device.allows(address):
            return True
        log.warning("passive port %d of %s: refused stranger %s", port, device.prefix, address)
        return None

    accept = asyncio.ensure_future(accept_first(listener, from_control_peer, s.pasv_listen_timeout))
    accept.add_done_callback(lambda _: listener.close())  # one connection, then the port is gone
    client: socket.socket | None = None
    try:
        await chan.send({"port": port})
        async with asyncio.timeout(s.pasv_listen_timeout):
            request = await chan.recv()
        if action_of(request) != "data_pasv_accept":
            raise ProtocolError(ErrorCode.MALFORMED, "expected data_pasv_accept")
        try:
            async with asyncio.timeout(s.pasv_accept_timeout):
                client, _ = await accept
        except TimeoutError:
            raise ProtocolError(ErrorCode.PASV_TIMEOUT, "no client connected") from None
        await relay_data(node, device, chan, client, peer)
        client = None
    finally:
        accept.cancel()
        (outcome,) = await asyncio.gather(accept, return_exceptions=True)
        listener.close()
        if client is None and isinstance(outcome, tuple):
            outcome[0].close()
        if client is not None:
            client.close()


async def active_data(
    node: ProxyNode, device: Device, chan: DeviceChannel, peer: str, request: dict[str, Any]
) -> None:
    """``data_port_connect``: dial the client, only where RFC 2577 allows."""
    address = field(request, "address", str)
    port = field(request, "port", int)
    try:
        target = normalize_ip(address)
    except ValueError:
        raise ProtocolError(ErrorCode.CONNECT_FAILED, f"not an IP address: {address!r}") from None
    if not device.allows(target) or not 1024 <= port <= 65535:
        log.warning("bounce refused: %s asked for %s:%s", device.prefix, address, port)
        raise ProtocolError(ErrorCode.CONNECT_FAILED, "refused: not the client's address or port")
    try:
        client = await dial(target, port, node.settings.connect_timeout)
    except (OSError, TimeoutError) as exc:
        raise ProtocolError(ErrorCode.CONNECT_FAILED, f"connect failed: {exc}") from None
    try:
        await relay_data(node, device, chan, client, peer)
    finally:
        client.close()


async def relay_data(
    node: ProxyNode, device: Device, chan: DeviceChannel, client: socket.socket, peer: str
) -> None:
    """Answer ``{}``, let it reach the device on its own, then relay raw bytes."""
    await chan.send({})
    await chan.settle()  # the client's first bytes must not share the device's read with "{}"
    device_sock, early = chan.detach()
    try:
        if early:
            await aio.sendall(client, early)
    except OSError:
        device_sock.close()
        raise
    client_peer = "{}:{}".format(*client.getpeername()[:2])
    with node.session("data", device, client_peer) as info:
        info.buckets = node.throttle.session_buckets()
        up, down = node.throttle.chains(device, info.buckets)
        handle = node.backend.start(
            client, device_sock, up=up, down=down, idle_timeout=node.settings.idle_timeout
        )
        info.counters = handle.counters
        await handle
