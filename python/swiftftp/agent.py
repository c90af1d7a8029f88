"""The device agent: publishes a stock FTP server (vsftpd, pyftpdlib…) through a proxy.

It dials the proxy like a phone would (a persisted device id, login, command
session) and, for every client the proxy announces, bridges the proxied
control connection to the local FTP server.  What the server and the client
say about data connections is rewritten so every data connection goes through
the proxy too:

* the server's ``227``/``229`` become ``data_pasv_listen`` on the proxy (the
  client is told the proxy's port), and ``data_pasv_accept`` once the client
  asks for the transfer;
* the client's ``PORT``/``EPRT`` become a local listener for the server plus
  ``data_port_connect`` on the proxy when the server connects to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, aio, relay
from .channel import DeviceChannel
from .errors import PeerClosed
from .ftp import LineSplitter, parse_port_argument, split_command
from .net import bracketed, dial, listen_on, normalize_ip, split_server

log = logging.getLogger("swiftftp.agent")

#: Every write to the proxy or the local server: a peer that takes nothing for this long is dropped.
SEND_TIMEOUT = 30.0
TRANSFER_VERBS = {"RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD"}
_227 = re.compile(rb"(\d+),(\d+),(\d+),(\d+),(\d+),(\d+)")
_229 = re.compile(rb"\((.)\1\1(\d+)\1\)")


def read_server_list(url: str, timeout: float) -> list[str]:
    """The fleet's server list: one ``host`` or ``host:port`` per line."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read(1 << 20).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


class AgentError(Exception):
    """The proxy refused or broke a request."""


def load_device_id(state_dir: Path) -> str:
    """The agent's device id, made up once and kept, so its prefix stays the same."""
    path = state_dir / "agent-device-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        device_id = "agent-" + uuid.uuid4().hex[:16]
        path.write_text(device_id + "\n")
        return device_id


@dataclass
class AgentSettings:
    proxy_host: str
    proxy_port: int
    ftp_host: str
    ftp_port: int
    state_dir: Path
    client_port: int = 2121
    user: str = "anonymous"
    connect_timeout: float = 10.0
    keepalive: float = 45.0
    relay_backend: str | None = None
    #: The fleet's server list (an http(s) URL, one host[:port] per line), read before
    #: each connection; the proxy_host/proxy_port above are then only the start.
    servers_url: str | None = None


class Agent:
    """One published FTP server; ``run()`` keeps it online until cancelled."""

    def __init__(
        self, settings: AgentSettings, on_ready: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.device_id = load_device_id(settings.state_dir)
        self.on_ready = on_ready or (lambda url: print(url, flush=True))
        self.backend = relay.get_backend(settings.relay_backend)
        self.prefix: str | None = None
        self.proxy_host = settings.proxy_host
        self.proxy_port = settings.proxy_port
        self.proxy_ip: str | None = None
        self._tasks: set[asyncio.Task] = set()
        self._reconnect_to: str | None = None
        self._preferred: str | None = None  # prefer_server from the proxy

    def spawn(self, coro: Any, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        """Stay connected, reconnecting with exponential backoff (1 s … 60 s)."""
        backoff = 1.0
        redirected = False
        try:
            while True:
                if self.settings.servers_url and not redirected:
                    await self._pick_node(self.settings.servers_url)
                redirected = False
                started = time.monotonic()
                try:
                    await self._command_session()
                except (OSError, TimeoutError, AgentError, PeerClosed) as exc:
                    log.warning("command session to %s:%d ended: %s",
                                self.proxy_host, self.proxy_port, exc)
                if self._reconnect_to:
                    self.proxy_host, self.proxy_port = split_server(self._reconnect_to, self.proxy_port)
                    self._reconnect_to, redirected, backoff = None, True, 1.0
                    continue
                if time.monotonic() - started > 60:
                    backoff = 1.0
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, 60.0)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _pick_node(self, url: str) -> None:
        """A node from the fleet's server list: the one the proxy said it prefers if it
        is listed, else one at random.  If the list cannot be read, the node stays."""
        try:
            hosts = await asyncio.to_thread(read_server_list, url, self.settings.connect_timeout)
        except (OSError, ValueError) as exc:
            log.warning("server list %s: %s", url, exc)
            return
        if not hosts:
            log.warning("server list %s is empty", url)
            return
        choice = self._preferred if self._preferred in hosts else random.choice(hosts)
        self.proxy_host, self.proxy_port = split_server(choice, self.settings.proxy_port)

    async def _connect(self, port: int | None = None) -> DeviceChannel:
        """A logged-in connection to the proxy's device port (or ``port``)."""
        chan, _ = await self._open(port)
        return chan

    async def _open(
        self, port: int | None = None, request: dict[str, Any] | None = None
    ) -> tuple[DeviceChannel, dict[str, Any] | None]:
        """A logged-in connection, and the reply to ``request`` if one is given: the
        request goes in the same write as the login (the node reads a stream), which
        saves a round trip per data connection."""
        sock = await dial(self.proxy_host, port or self.proxy_port, self.settings.connect_timeout)
        # The node's side needs no pacing either: this agent decodes a byte stream.
        chan = DeviceChannel(sock, paced=False, send_timeout=self.settings.connect_timeout)
        login = {"action": "login", "android_id": self.device_id,
                 "swiftp_version": f"swiftftp-agent/{__version__}",
                 # we decode concatenated objects: the node may write without pacing
                 "json_stream": True}
        try:
            await chan.send(login, *([request] if request else []))
            await self._reply(chan)
            reply = await self._reply(chan) if request else None
        except BaseException:
            chan.close()
            raise
        return chan, reply

    async def _reply(self, chan: DeviceChannel) -> dict[str, Any]:
        async with asyncio.timeout(self.settings.connect_timeout):
            reply = await chan.recv()
        if "error_code" in reply:
            raise AgentError(f"proxy error {reply['error_code']}: {reply.get('error_string')}")
        return reply

    async def _command_session(self) -> None:
        chan = await self._connect()
        try:
            self.proxy_ip = normalize_ip(chan.peer[0])
            await chan.send({"action": "start_command_session"})
            self.prefix = (await self._reply(chan))["prefix"]
            user = f"{self.prefix}_{self.settings.user}"
            if self.settings.user == "anonymous":
                user += ":"  # an empty password given, so lftp does not stop to ask for one
            self.on_ready(f"ftp://{user}@{bracketed(self.proxy_host)}:{self.settings.client_port}/")
            # both end by raising: the proxy fell silent, closed, or asked us to move
            await aio.run_all(self._listen(chan), self._keepalive(chan))
        finally:
            chan.close()

    async def _listen(self, chan: DeviceChannel) -> None:
        while self._handle(await chan.recv()):
            pass
        raise AgentError(f"reconnecting to {self._reconnect_to}")

    def _handle(self, message: dict[str, Any]) -> bool:
        """React to one message on the command session; False to reconnect."""
        action = message.get("action")
        if action == "control_connection_waiting":
            port = message.get("port")
            if isinstance(port, int):
                self.spawn(self._control(port), f"agent-control-{port}")
        elif action == "message":
            log.warning("message from the proxy: %s", message.get("text"))
        elif action == "prefer_server":
            log.info("proxy prefers %s", message.get("host"))
            if isinstance(message.get("host"), str):
                self._preferred = message["host"]
        elif action == "reconnect":
            self._reconnect_to = message.get("newserver") or f"{self.proxy_host}:{self.proxy_port}"
            log.warning("proxy asks to reconnect to %s", self._reconnect_to)
            return False
        elif "error_code" in message:
            log.warning("proxy error %s: %s", message["error_code"], message.get("error_string"))
        return True

    async def _keepalive(self, chan: DeviceChannel) -> None:
        interval = self.settings.keepalive
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() - chan.last_recv > 3 * interval:
                raise PeerClosed(f"proxy silent for {3 * interval:.0f} s")
            await chan.send({"action": "noop"})

    async def _control(self, port: int) -> None:
        """Take one client: connect to the announced port and bridge it to the FTP server
        (dialled meanwhile: the two round trips overlap)."""
        local = asyncio.ensure_future(
            dial(self.settings.ftp_host, self.settings.ftp_port, self.settings.connect_timeout)
        )
        try:
            chan = await self._connect(port)
        except (OSError, TimeoutError, AgentError, PeerClosed) as exc:
            log.warning("rendezvous on port %d failed: %s", port, exc)
            local.cancel()
            outcome = (await asyncio.gather(local, return_exceptions=True))[0]
            if isinstance(outcome, socket.socket):
                outcome.close()
            return
        proxy_sock, early = chan.detach()
        try:
            server = await local
        except (OSError, TimeoutError) as exc:
            log.warning("local FTP server unreachable: %s", exc or type(exc).__name__)
            with contextlib.suppress(OSError):
                proxy_sock.sendall(b"421 The FTP server behind this device is not running.\r\n")
            proxy_sock.close()
            return
        bridge = ControlBridge(self, proxy_sock, server)
        try:
            await bridge.run(early)
        except (OSError, TimeoutError, PeerClosed) as exc:
            log.info("control connection ended: %s", exc)
        finally:
            bridge.close()


class ControlBridge:
    """One client's control connection between the proxy and the local FTP server."""

    def __init__(self, agent: Agent, proxy: socket.socket, server: socket.socket) -> None:
        self.agent = agent
        self.proxy = proxy
        self.server = server
        self.server_ip = normalize_ip(server.getsockname()[0])
        self.passive: tuple[DeviceChannel, socket.socket] | None = None
        self.active: asyncio.Task | None = None

    def close(self) -> None:
        self._drop_passive()
        if self.active:
            self.active.cancel()
        self.proxy.close()
        self.server.close()

    def _drop_passive(self) -> None:
        if self.passive:
            chan, data = self.passive
            chan.close()
            data.close()
            self.passive = None

    async def run(self, early: bytes) -> None:
        await self._read_banner()
        await aio.run_all(
            self._pump(self.proxy, self.server, early, self._from_client),
            self._pump(self.server, self.proxy, b"", self._from_server),
        )

    async def _read_banner(self) -> None:
        """The proxy greeted the client already; the server's 220 is not passed on."""
        buf = b""
        async with asyncio.timeout(self.agent.settings.connect_timeout):
            while True:
                data = await aio.recv(self.server, 4096)
                if not data:
                    raise PeerClosed("FTP server closed before its greeting")
                buf += data
                # the last line of a (possibly multi-line) reply is "220 text"
                lines = buf.split(b"\n")
                if any(line.startswith(b"220 ") for line in lines[:-1]):
                    return

    async def _pump(self, src: socket.socket, dst: socket.socket, first: bytes, rewrite) -> None:
        """Copy lines from ``src`` to ``dst`` through the async ``rewrite``."""
        lines = LineSplitter()
        data = first
        while True:
            for line in lines.split(data):
                if out := await rewrite(line):
                    await aio.sendall(dst, out, timeout=SEND_TIMEOUT)
            data = await aio.recv(src, 65536)
            if not data:
                if tail := lines.flush():
                    await aio.sendall(dst, tail, timeout=SEND_TIMEOUT)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return

    # ---- client → server -----------------------------------------------------------

    async def _from_client(self, line: bytes) -> bytes:
        verb, arg = split_command(line)
        if verb in ("PORT", "EPRT"):
            return await self._active(verb, arg, line)
        if verb in ("PASV", "EPSV"):
            self._drop_passive()
        if verb in TRANSFER_VERBS and self.passive:
            chan, data = self.passive
            self.passive = None
            self.agent.spawn(self._pasv_accept(chan, data), "agent-pasv-accept")
        return line

    async def _active(self, verb: str, arg: bytes, line: bytes) -> bytes:
        try:
            address, port = parse_port_argument(verb, arg)
        except ValueError:
            return line  # let the server answer the syntax error
        if self.active:
            self.active.cancel()
        listener = listen_on(self.server_ip, 0, backlog=1)
        lport = listener.getsockname()[1]
        self.active = self.agent.spawn(
            self._port_connect(listener, address, port), "agent-port-connect"
        )
        if ":" in self.server_ip:
            return f"EPRT |2|{self.server_ip}|{lport}|\r\n".encode()
        h = self.server_ip.replace(".", ",")
        return f"PORT {h},{lport >> 8},{lport & 255}\r\n".encode()

    async def _port_connect(self, listener: socket.socket, address: str, port: int) -> None:
        """The server connects to our listener: dial the client through the proxy."""
        try:
            async with asyncio.timeout(300):
                server_data, _ = await aio.accept(listener)
        except TimeoutError:
            return
        finally:
            listener.close()
        try:
            chan, _ = await self.agent._open(
                request={"action": "data_port_connect", "address": address, "port": port}
            )
        except (OSError, TimeoutError, AgentError, PeerClosed) as exc:
            log.warning("active data connection to %s:%d failed: %s", address, port, exc)
            server_data.close()
            return
        await self._splice(chan, server_data)

    # ---- server → client -----------------------------------------------------------

    async def _from_server(self, line: bytes) -> bytes:
        if line.startswith(b"227 "):
            m = _227.search(line)
            if m:
                host = ".".join(x.decode() for x in m.groups()[:4])
                port = int(m[5]) * 256 + int(m[6])
                return await self._passive(host, port, extended=False)
        elif line.startswith(b"229 "):
            m = _229.search(line)
            if m:
                return await self._passive(self.server_ip, int(m[2]), extended=True)
        return line

    async def _passive(self, host: str, port: int, extended: bool) -> bytes:
        """The server opened a passive port: open one on the proxy and name that instead
        (the server's port is dialled meanwhile: the two round trips overlap)."""
        self._drop_passive()
        agent = self.agent
        local = asyncio.ensure_future(dial(host, port, agent.settings.connect_timeout))
        chan: DeviceChannel | None = None
        try:
            chan, reply = await agent._open(request={"action": "data_pasv_listen"})
            assert reply is not None
            proxy_port = reply["port"]
            data = await local
        except (AgentError, OSError, TimeoutError, PeerClosed, KeyError) as exc:
            if chan is not None:
                chan.close()
            local.cancel()
            outcome = (await asyncio.gather(local, return_exceptions=True))[0]
            if isinstance(outcome, socket.socket):
                outcome.close()
            if isinstance(exc, AgentError):  # e.g. error 15: tell the client why
                log.warning("passive listen refused: %s", exc)
                return f"425 Cannot open a data connection: {exc}.\r\n".encode()
            log.warning("passive setup failed: %s", exc or type(exc).__name__)
            return b"425 Cannot open a passive data connection.\r\n"
        self.passive = (chan, data)
        if extended:
            return f"229 Entering Extended Passive Mode (|||{proxy_port}|)\r\n".encode()
        ip = agent.proxy_ip or "0.0.0.0"
        if ":" in ip:
            ip = "0.0.0.0"  # the proxy rewrites the address anyway
        h = ip.replace(".", ",")
        return f"227 Entering Passive Mode ({h},{proxy_port >> 8},{proxy_port & 255}).\r\n".encode()

    async def _pasv_accept(self, chan: DeviceChannel, data: socket.socket) -> None:
        try:
            await chan.send({"action": "data_pasv_accept"})
            await self.agent._reply(chan)
        except (OSError, TimeoutError, AgentError, PeerClosed) as exc:
            log.warning("passive accept failed: %s", exc)
            chan.close()
            data.close()
            return
        await self._splice(chan, data)

    async def _splice(self, chan: DeviceChannel, server_data: socket.socket) -> None:
        proxy_data, early = chan.detach()
        try:
            if early:
                await aio.sendall(server_data, early, timeout=SEND_TIMEOUT)
        except OSError:
            proxy_data.close()
            server_data.close()
            return
        with contextlib.suppress(OSError, TimeoutError):
            await self.agent.backend.start(proxy_data, server_data, idle_timeout=1800)

