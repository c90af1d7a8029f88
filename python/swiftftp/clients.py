"""The FTP client listener: greeting, pre-login dialogue, rendezvous with the
device, then the relayed control connection with its rewriting."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import TYPE_CHECKING

from . import aio
from .channel import DeviceChannel
from .devices import login
from .errors import ErrorCode, PeerClosed, ProtocolError
from .ftp import (
    GREETING,
    MAX_LINE,
    Close,
    ControlRewriter,
    Failure,
    LineSplitter,
    Lookup,
    PreLogin,
    Reply,
)
from .net import accept_first, normalize_ip
from .node import Busy
from .protocol import error

if TYPE_CHECKING:
    from .node import Device, ProxyNode

log = logging.getLogger("swiftftp.clients")

SHUTTING_DOWN = "421 This node is shutting down; try again in a moment."


class ClientConnection:
    """An FTP client's control socket: line reads before login, and byte counts
    as the client sees them (quota accounting starts with the greeting)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""  # received, not yet consumed as a line
        self.counts = [0, 0]  # received from the client (up), sent to it (down)

    async def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n")) < 0:
            if len(self.buffer) > MAX_LINE:
                line, self.buffer = self.buffer, b""
                return line  # PreLogin refuses it as too long
            data = await aio.recv(self.sock, 4096)
            if not data:
                raise PeerClosed("client closed the connection")
            self.counts[0] += len(data)
            self.buffer += data
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        return line

    async def send(self, data: bytes) -> None:
        await aio.sendall(self.sock, data)
        self.counts[1] += len(data)

    async def send_line(self, text: str) -> None:
        await self.send(text.encode() + b"\r\n")


async def handle_client(node: ProxyNode, sock: socket.socket) -> None:
    """One FTP client: answer it until it names an online device, then splice it there."""
    peer_ip, peer_port = sock.getpeername()[:2]
    peer = f"{peer_ip}:{peer_port}"
    ip = normalize_ip(peer_ip)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    refusal = "shutting down" if node.draining else node.guard.admit(ip)
    if refusal:
        node.refuse(refusal, peer)
        text = {
            "locked out": "421 Too many failed logins from your address; try again later.",
            "shutting down": SHUTTING_DOWN,
        }.get(refusal, "421 Too many connections from your address.")
        with contextlib.suppress(OSError):
            await aio.sendall(sock, text.encode() + b"\r\n")
        return
    try:
        await _serve_client(node, ClientConnection(sock), peer, ip)
    finally:
        node.guard.release(ip)
        node.left()


async def _serve_client(node: ProxyNode, client: ClientConnection, peer: str, ip: str) -> None:
    dialogue = PreLogin(node.settings.max_login_failures)
    try:
        await client.send_line(GREETING)
        async with asyncio.timeout(node.settings.client_login_timeout) as deadline:
            while True:
                events = dialogue.on_line(await client.readline())
                lookup = next((e for e in events if isinstance(e, Lookup)), None)
                if lookup:
                    if node.draining:
                        await _act(client, peer, [Reply(SHUTTING_DOWN), Close("node draining")])
                        return
                    device = node.online(lookup.prefix)
                    if device is not None:
                        deadline.reschedule(None)
                        break
                    events = dialogue.unknown_prefix(lookup.prefix)
                if any(isinstance(e, Failure) for e in events):
                    if node.guard.failure(ip):
                        node.refuse("prefix guessing lockout", peer)
                        events = [*events, Close("locked out")]
                    node.stats.login_failures += 1
                    await asyncio.sleep(node.settings.failure_delay)  # slows guessing down
                if await _act(client, peer, events):
                    return
    except TimeoutError:
        await _act(client, peer, dialogue.timed_out())
        return
    except (PeerClosed, OSError):
        return
    try:
        with node.connection(device, "control"):
            try:
                chan = await rendezvous(node, device)
            except (TimeoutError, OSError, ProtocolError, PeerClosed) as exc:
                log.info("device %s did not take the connection: %s", device.prefix, exc)
                await _act(client, peer, dialogue.device_unavailable())
                return
            await control_relay(node, device, client, chan, lookup.user_line + client.buffer, peer)
    except Busy as exc:
        node.refuse(str(exc), f"{device.prefix} from {peer}")
        await _act(client, peer, [Reply(f"421 {str(exc).capitalize()}; try again later."), Close("busy")])


async def _act(client: ClientConnection, peer: str, events: list) -> bool:
    """Carry out the dialogue's events; True when the connection should close."""
    for event in events:
        if isinstance(event, Reply):
            with contextlib.suppress(OSError):
                await client.send_line(event.text)
        elif isinstance(event, Failure):
            log.info("client %s: login failed: %s", peer, event.reason)
        elif isinstance(event, Close):
            log.info("client %s: closing: %s", peer, event.reason)
            return True
    return False


async def rendezvous(node: ProxyNode, device: Device) -> DeviceChannel:
    """Ask the device to connect to a fresh port and wait until it has logged in there."""
    s = node.settings
    command = device.command
    if command is None:
        raise PeerClosed("device went offline")
    async def logged_in(sock: socket.socket) -> DeviceChannel | None:
        chan = DeviceChannel(sock, grace=s.device_grace)
        try:
            android_id, _ = await login(node, chan)
        except ProtocolError as exc:
            with contextlib.suppress(OSError):
                await chan.send(error(exc.code, exc.text))
            return None
        if android_id != device.android_id:
            log.warning("rendezvous for %s: a different device logged in", device.prefix)
            with contextlib.suppress(OSError):
                await chan.send(error(ErrorCode.BAD_CREDENTIALS, "not the device expected here"))
            return None
        return chan

    with node.listener() as listener:
        await command.notify(
            {"action": "control_connection_waiting", "port": listener.getsockname()[1]}
        )
        _, chan = await accept_first(listener, logged_in, s.rendezvous_timeout)
    return chan


async def control_relay(
    node: ProxyNode,
    device: Device,
    conn: ClientConnection,
    chan: DeviceChannel,
    first: bytes,
    peer: str,
) -> None:
    """Relay the control connection, rewriting it on the way (:class:`ControlRewriter`).

    Bytes are counted on the client's side: what it sent, and what it was
    sent after rewriting.
    """
    await chan.settle()  # "{}" must reach the device alone, before the USER line
    device_sock, early = chan.detach()
    client = conn.sock
    client_ip = normalize_ip(client.getpeername()[0])
    public = node.public_address_for(client)
    counts = conn.counts
    last = [time.monotonic()]
    rewriter = ControlRewriter(client_ip, public)
    to_device = LineSplitter(rewriter.command)
    to_client = LineSplitter(rewriter.reply)

    async def upstream() -> None:
        while data := await aio.recv(client, 65536):
            last[0] = time.monotonic()
            counts[0] += len(data)
            if out := to_device.feed(data):
                await aio.sendall(device_sock, out)
        await _finish(to_device, device_sock)

    async def downstream() -> None:
        while data := await aio.recv(device_sock, 65536):
            last[0] = time.monotonic()
            if out := to_client.feed(data):
                await conn.send(out)
        await _finish(to_client, client)

    device.control_peers[client_ip] += 1
    try:
        with node.session("control", device, peer) as info:
            info.counters = lambda: (counts[0], counts[1])
            await aio.sendall(device_sock, to_device.feed(first))
            if early:
                await conn.send(to_client.feed(early))
            idle = node.settings.idle_timeout
            await aio.run_all(upstream(), downstream(), deadline=lambda: last[0] + idle)
    except (OSError, TimeoutError):
        pass
    finally:
        device_sock.close()
        device.control_peers[client_ip] -= 1
        if device.control_peers[client_ip] <= 0:
            del device.control_peers[client_ip]


async def _finish(lines: LineSplitter, dst: socket.socket) -> None:
    """EOF from one side: pass on any unterminated tail, then the EOF itself."""
    if tail := lines.flush():
        await aio.sendall(dst, tail)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)
