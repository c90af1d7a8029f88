"""The device agent: publishes a stock FTP server (vsftpd, proftpd, pure-ftpd,
pyftpdlib…) through a proxy.

It dials the proxy like a phone would (a persisted device id, login, command
session) and, for every client the proxy announces, bridges the proxied
control connection to the local FTP server.  What the server and the client
say about data connections is rewritten so every data connection goes through
the proxy too:

* the server's ``227``/``229`` become ``data_pasv_listen`` on the proxy (the
  client is told the proxy's port, in the form it asked for), and
  ``data_pasv_accept`` once the client asks for the transfer;
* the client's ``PORT``/``EPRT`` become a local listener for the server plus
  ``data_port_connect`` on the proxy when the server connects to it.

The final reply to a transfer command (``226``, ``426``…) reaches the client
only once the data connection through the proxy exists, or has failed: then
the client gets ``425`` with the reason instead.  An active-mode client
waits for the proxy to connect to it and reads its control connection at the
same time; a server that sends its ``226`` straight after a small file
(pure-ftpd does) would otherwise beat the proxy's connection to the client,
and the client gives up on the transfer.

The agent keeps its device id in its own state directory, which it locks:
a second agent on the same directory refuses to start.  It does not publish
its URL before the FTP server greets it.

Identity: it keeps an Ed25519 key beside its device id (made at its first
start), presents it at the command session's login and signs the node's
challenge; its other connections show the token the command session got
(docs/protocol.md, "Device proof of identity").  With ``tls`` it dials the node
over TLS and verifies the node's certificate (:func:`dial_tls`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import socket
import ssl
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, aio, relay
from .channel import DeviceChannel
from .errors import PeerClosed, SwiftFTPError
from .ftp import LineSplitter, parse_port_argument, split_command
from .identity import DeviceKey, fingerprint, load_or_create_key, unb64
from .net import accept_first, bracketed, close_gracefully, dial, listen_on, normalize_ip, split_server

log = logging.getLogger("swiftftp.agent")

#: Every write to the proxy or the local server: a peer that takes nothing for this long is dropped.
SEND_TIMEOUT = 30.0
#: The longest the final reply to a transfer waits for its data connection through the
#: proxy (the proxy gives up sooner: its ``connect`` and ``pasv_accept`` timeouts).
DATA_SETUP_TIMEOUT = 60.0
#: How long an active-mode listener waits for the FTP server to connect to it.
ACTIVE_ACCEPT_TIMEOUT = 120.0
#: A multi-line reply is held whole (up to this much) before it is passed on.
MAX_REPLY = 64 * 1024
TRANSFER_VERBS = frozenset({"RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD"})
ID_FILE = "agent-device-id"
LOCK_FILE = "agent.lock"
#: After the proxy replaced the session (the same id logged in elsewhere), wait at least
#: this long before logging in again, so that two agents sharing an id do not evict
#: each other every second.
REPLACED_DELAY = 60.0
#: Replaced again within this many seconds: say plainly that two agents share the id.
REPLACED_WINDOW = 600.0

_REPLY = re.compile(rb"^(\d{3})([ -])")
# RFC 959 / 1123: six numbers, with or without the parentheses; exactly one such group.
_227 = re.compile(rb"(?<![\d,])(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})(?![\d,])")
# RFC 2428: (<d><d><d><port><d>), d one printable ASCII character (33-126).
_229 = re.compile(rb"\(([\x21-\x7e])\1\1(\d{1,5})\1\)")

_NET_ERRORS = (OSError, TimeoutError, SwiftFTPError)


def default_state_dir() -> Path:
    """The agent's own state directory: ``$XDG_STATE_HOME/swiftftp-agent``
    (``~/.local/state/swiftftp-agent``), not the node's."""
    home = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(os.environ.get("XDG_STATE_HOME") or home) / "swiftftp-agent"


def read_server_list(url: str, timeout: float) -> list[str]:
    """The fleet's server list: one ``host`` or ``host:port`` per line."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read(1 << 20).decode()
    return [line.strip() for line in text.splitlines() if line.strip()]


class AgentError(SwiftFTPError):
    """The proxy refused or broke a request."""


class StateDirLocked(AgentError):
    """Another agent holds the state directory; the message is one line for the operator."""


def load_device_id(state_dir: Path) -> str:
    """The agent's device id, made up once and kept, so its prefix stays the same."""
    path = state_dir / ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        state_dir.mkdir(parents=True, exist_ok=True)
        device_id = "agent-" + uuid.uuid4().hex[:16]
        path.write_text(device_id + "\n")
        return device_id


def legacy_state_dir() -> Path:
    """Where earlier agents kept their device id by default: the node's state
    directory (``$XDG_STATE_HOME/swiftftp``)."""
    return default_state_dir().with_name("swiftftp")


def adopt_device_id(state_dir: Path, old_dir: Path) -> bool:
    """Move ``old_dir``'s device id into ``state_dir`` if it has none yet, so an agent
    upgraded to its own state directory keeps its prefix. True if it moved."""
    new, old = state_dir / ID_FILE, old_dir / ID_FILE
    if new.exists() or not old.is_file():
        return False
    state_dir.mkdir(parents=True, exist_ok=True)
    os.replace(old, new)  # moved, not copied: two copies of an id are two agents evicting each other
    log.info("device id moved from %s to %s (the agent's own state directory)", old, new)
    return True


class StateLock:
    """An exclusive ``flock`` on ``<state_dir>/agent.lock`` for as long as the agent runs:
    two agents on one state directory would log in with the same device id and
    keep replacing each other's session on the proxy."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating the directory), or raise :class:`StateDirLocked`."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StateDirLocked(f"cannot use the state directory {self.state_dir}: "
                                 f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirLocked(
                f"another swiftftp-agent{who} is running on the state directory {self.state_dir}; "
                "give each agent its own --state-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let go (the file stays: removing it would race with a new agent taking it)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def describe(exc: BaseException, timeout: float | None = None) -> str:
    """One short phrase for a network failure: ``connection refused``, ``no answer
    within 10 s``, or the error's own text."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the node's TLS certificate does not verify: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, OSError) and exc.errno is not None and not isinstance(exc, PeerClosed):
        text = os.strerror(exc.errno) if exc.errno in errno.errorcode else str(exc)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def endpoint(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"{bracketed(host)}:{port}"


@dataclass
class AgentSettings:
    proxy_host: str
    proxy_port: int
    ftp_host: str
    ftp_port: int
    state_dir: Path = field(default_factory=default_state_dir)
    client_port: int = 2121
    user: str = "anonymous"
    connect_timeout: float = 10.0
    keepalive: float = 45.0
    relay_backend: str | None = None
    #: The fleet's server list (an http(s) URL, one host[:port] per line), read before
    #: each connection; the proxy_host/proxy_port above are then only the start.
    servers_url: str | None = None
    #: Longest pause between two probes of an FTP server that is not there (they start at 1 s).
    probe_max: float = 30.0
    #: Least pause before logging in again after the proxy replaced the session.
    replaced_delay: float = REPLACED_DELAY
    #: An older default state directory whose device id is taken over (moved) when
    #: ``state_dir`` has none: set when ``state_dir`` is the default.
    legacy_state_dir: Path | None = None
    #: Dial the node over TLS, verifying its certificate with this context (None: plain).
    tls: ssl.SSLContext | None = None


class Agent:
    """One published FTP server; ``run()`` keeps it online until cancelled."""

    def __init__(
        self, settings: AgentSettings, on_ready: Callable[[str], None] | None = None
    ) -> None:
        self.settings = settings
        self.device_id: str | None = None  # read from the state directory once it is locked
        self.on_ready = on_ready or (lambda url: print(url, flush=True))
        self.backend = relay.get_backend(settings.relay_backend)
        self.prefix: str | None = None
        self.proxy_host = settings.proxy_host
        self.proxy_port = settings.proxy_port
        self.proxy_ip: str | None = None
        self.ftp = endpoint(settings.ftp_host, settings.ftp_port)
        self._tasks: set[asyncio.Task] = set()
        self._reconnect_to: str | None = None
        self._preferred: str | None = None  # prefer_server from the proxy
        self._lock = StateLock(settings.state_dir)
        #: The proxy's notice that this session was replaced (the same id logged in elsewhere).
        self._replaced: str | None = None
        self._replaced_at: list[float] = []
        #: The device key (read from the state directory once it is locked).
        self.key: DeviceKey | None = None
        #: The command session's token: its other connections show it instead of a signature.
        self._token: str | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Start a task the agent owns (cancelled when ``run()`` ends)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        """Lock the state directory, wait for the FTP server, then stay connected to the
        proxy, reconnecting with exponential backoff (1 s … 60 s).

        Raises :class:`StateDirLocked` at once if another agent holds the directory."""
        self._lock.acquire()
        try:
            if self.settings.legacy_state_dir is not None:
                with contextlib.suppress(OSError):  # unreadable: a new id, as before
                    adopt_device_id(self.settings.state_dir, self.settings.legacy_state_dir)
            self.device_id = load_device_id(self.settings.state_dir)
            self.key, made = load_or_create_key(self.settings.state_dir)
            if made:
                log.info("made a device key %s in %s; back it up with the device id (the node binds "
                         "the id to it)", fingerprint(self.key.public), self.settings.state_dir)
            await self._serve()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._lock.release()

    async def _serve(self) -> None:
        backoff = 1.0
        redirected = False
        while True:
            if self.settings.servers_url and not redirected:
                await self._pick_node(self.settings.servers_url)
            redirected = False
            await self.wait_for_server()
            started = time.monotonic()
            self._replaced = None
            try:
                await self._command_session()
            except _NET_ERRORS as exc:
                self._session_ended(exc)
            if self._reconnect_to:
                self.proxy_host, self.proxy_port = split_server(self._reconnect_to, self.proxy_port)
                self._reconnect_to, redirected, backoff = None, True, 1.0
                continue
            if time.monotonic() - started > 60:
                backoff = 1.0
            delay = backoff * random.uniform(0.8, 1.2)
            if self._replaced:
                delay = max(delay, self.settings.replaced_delay)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, 60.0)

    def _session_ended(self, exc: BaseException) -> None:
        where = endpoint(self.proxy_host, self.proxy_port)
        if self._replaced:
            now = time.monotonic()
            self._replaced_at = [t for t in self._replaced_at if now - t < REPLACED_WINDOW] + [now]
            if len(self._replaced_at) > 1:
                log.error(
                    "the proxy replaced this agent's session %d times in %d min: another agent is "
                    "logging in with the same device id %s (a copy of %s?); give each agent its own "
                    "state directory", len(self._replaced_at), REPLACED_WINDOW // 60,
                    self.device_id, self.settings.state_dir / ID_FILE,
                )
            log.warning("command session to %s ended: replaced by a new login of device id %s; "
                        "logging in again in %g s", where, self.device_id, self.settings.replaced_delay)
        elif isinstance(exc, PeerClosed):
            log.warning("command session to %s ended: the proxy closed the connection", where)
        else:
            log.warning("command session to %s ended: %s", where,
                        describe(exc, self.settings.connect_timeout))

    async def wait_for_server(self) -> None:
        """Return once the FTP server greets a connection; until then probe it with
        backoff (1 s doubling to ``probe_max``), saying once that it is not there."""
        delay, said = 1.0, ""
        while True:
            try:
                greeting = await self.probe()
            except _NET_ERRORS as exc:
                reason = describe(exc, self.settings.connect_timeout)
                if reason != said:
                    log.warning("no FTP server at %s (%s); not publishing it until it answers "
                                "(retrying every %g s at most)", self.ftp, reason, self.settings.probe_max)
                    said = reason
                else:
                    log.debug("still no FTP server at %s (%s)", self.ftp, reason)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.probe_max)
                continue
            if not greeting.startswith("220"):
                log.warning("the FTP server at %s greets with %r", self.ftp, greeting)
            elif said:
                log.info("the FTP server at %s answers now", self.ftp)
            return

    async def probe(self) -> str:
        """Connect to the FTP server, read its greeting's last line, say QUIT."""
        s = self.settings
        sock = await dial(s.ftp_host, s.ftp_port, s.connect_timeout)
        try:
            async with asyncio.timeout(s.connect_timeout):
                line = await read_reply(sock)
            with contextlib.suppress(OSError, TimeoutError):
                await aio.sendall(sock, b"QUIT\r\n", timeout=1)
        except BaseException:
            sock.close()
            raise
        await close_gracefully(sock)
        return line

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
        self, port: int | None = None, request: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> tuple[DeviceChannel, dict[str, Any] | None]:
        """A logged-in connection, and the reply to ``request`` if one is given (within
        ``timeout``, default ``connect_timeout``): the request goes in the same write as
        the login (the node reads a stream), which saves a round trip per data connection."""
        assert self.device_id is not None, "run() reads the device id"
        sock, peer = await self._dial(port or self.proxy_port)
        # The node's side needs no pacing either: this agent decodes a byte stream.
        chan = DeviceChannel(sock, paced=False, send_timeout=self.settings.connect_timeout, peer=peer)
        login: dict[str, Any] = {
            "action": "login", "android_id": self.device_id,
            "swiftp_version": f"swiftftp-agent/{__version__}",
            # we decode concatenated objects: the node may write without pacing
            "json_stream": True,
        }
        token = self._token
        if token is not None:  # one of the command session's connections: no round trip
            login["token"] = token
        elif self.key is not None:
            login["key"] = self.key.public
        try:
            if token is not None or self.key is None:
                await chan.send(login, *([request] if request else []))
                await self._reply(chan)
            else:  # the node may ask for a signature first: the request waits for it
                await chan.send(login)
                await self._answer_challenge(chan, await self._reply(chan))
                if request:
                    await chan.send(request)
            reply = await self._reply(chan, timeout) if request else None
        except BaseException:
            chan.close()
            raise
        return chan, reply

    async def _answer_challenge(self, chan: DeviceChannel, reply: dict[str, Any]) -> None:
        """Sign the node's ``challenge`` (if it sent one: a node of an earlier version
        answers ``{}`` at once) and read the login's final reply."""
        challenge = reply.get("challenge")
        if challenge is None:
            return
        assert self.key is not None and self.device_id is not None
        try:
            raw = unb64(challenge, 32)
        except (ValueError, TypeError, AttributeError):
            raise AgentError(f"the proxy sent a challenge that does not read: {challenge!r}") from None
        await chan.send({"action": "login_proof", "signature": self.key.sign(self.device_id, raw)})
        await self._reply(chan)

    async def _dial(self, port: int) -> tuple[socket.socket, tuple[str, int]]:
        """A connection to the node's ``port``, over TLS with ``--tls``: the socket to
        speak plaintext on, and the node's (address, port)."""
        s = self.settings
        if s.tls is None:
            sock = await dial(self.proxy_host, port, s.connect_timeout)
            return sock, sock.getpeername()[:2]
        return await dial_tls(self.proxy_host, port, s.tls, s.connect_timeout, self.spawn)

    async def _reply(self, chan: DeviceChannel, timeout: float | None = None) -> dict[str, Any]:
        async with asyncio.timeout(timeout or self.settings.connect_timeout):
            reply = await chan.recv()
        if "error_code" in reply:
            raise AgentError(f"proxy error {reply['error_code']}: {reply.get('error_string')}")
        return reply

    async def _command_session(self) -> None:
        chan = await self._connect()
        try:
            self.proxy_ip = normalize_ip(chan.peer[0])
            await chan.send({"action": "start_command_session"})
            started = await self._reply(chan)
            self.prefix = started["prefix"]
            token = started.get("token")
            self._token = token if isinstance(token, str) else None
            user = f"{self.prefix}_{self.settings.user}"
            if self.settings.user == "anonymous":
                user += ":"  # an empty password given, so lftp does not stop to ask for one
            log.info("publishing %s as prefix %s on %s", self.ftp, self.prefix,
                     endpoint(self.proxy_host, self.proxy_port))
            self.on_ready(f"ftp://{user}@{bracketed(self.proxy_host)}:{self.settings.client_port}/")
            # both end by raising: the proxy fell silent, closed, or asked us to move
            await aio.run_all(self._listen(chan), self._keepalive(chan))
        finally:
            self._token = None  # it ends with its session
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
            if message.get("reason") == "replaced":
                self._replaced = str(message.get("text"))
                log.warning("the proxy replaced this session: %s", self._replaced)
            else:
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
        s = self.settings
        label = f"client on port {port}"
        local = asyncio.ensure_future(dial(s.ftp_host, s.ftp_port, s.connect_timeout))
        try:
            chan = await self._connect(port)
        except BaseException as exc:
            local.cancel()
            outcome = (await asyncio.gather(local, return_exceptions=True))[0]
            if isinstance(outcome, socket.socket):
                outcome.close()
            if not isinstance(exc, _NET_ERRORS):
                raise
            log.warning("%s: rendezvous failed: %s", label, describe(exc, s.connect_timeout))
            return
        proxy_sock, early = chan.detach()
        try:
            server = await local
        except _NET_ERRORS as exc:
            log.warning("%s: no FTP server at %s (%s); the client gets 421", label, self.ftp,
                        describe(exc, s.connect_timeout))
            await self._turn_away(proxy_sock, "421 The FTP server behind this device is not running.")
            return
        except BaseException:
            proxy_sock.close()
            raise
        bridge = ControlBridge(self, proxy_sock, server, label)
        try:
            await bridge.run(early)
        except ServerRefused as exc:
            log.warning("%s: %s; the client gets %s", label, exc, exc.reply[:3])
            await self._turn_away(proxy_sock, exc.reply)
        except _NET_ERRORS as exc:
            log.info("%s: control connection ended: %s", label, describe(exc, s.connect_timeout))
        finally:
            bridge.close()

    @staticmethod
    async def _turn_away(sock: socket.socket, reply: str) -> None:
        """Give the client a last reply and close without losing it to a reset."""
        with contextlib.suppress(OSError, TimeoutError):
            await aio.sendall(sock, reply.encode() + b"\r\n", timeout=5)
        await close_gracefully(sock)


async def dial_tls(
    host: str, port: int, context: ssl.SSLContext, timeout: float,
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task],
) -> tuple[socket.socket, tuple[str, int]]:
    """Dial the node over TLS, verifying its certificate (``context``) for ``host``.

    The rest of the agent speaks to plain sockets (and relays them with splice), so
    the TLS stream is pumped to one end of a socket pair by a task ``spawn`` owns,
    and the other end is returned, with the node's (address, port). TLS runs in
    memory BIOs over the raw socket (:class:`TlsPump`), not in the event loop's own
    TLS transport: uvloop's (0.21) drops the last records that arrive together with
    the node's close_notify, which truncated uploads (measured: 1 MiB STOR arrived
    as 0.86 MiB)."""
    raw = await dial(host, port, timeout)
    try:
        peer = raw.getpeername()[:2]
        pump = TlsPump(raw, context, host)
        async with asyncio.timeout(timeout):
            await pump.handshake()
    except BaseException:
        raw.close()
        raise
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    spawn(pump.run(theirs), "agent-tls")
    return ours, peer


class TlsPump:
    """A TLS client over a non-blocking socket with memory BIOs, pumping plaintext to
    and from a local socket. Half-close both ways: the local side's EOF sends
    close_notify and shuts the socket for writing; the node's close_notify (or EOF) is
    an EOF on the local side."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.raw = raw
        self._incoming_bio = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._incoming_bio, self._outgoing, server_hostname=host)
        self._lock = asyncio.Lock()  # one flush at a time: records leave in the order made

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
        await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            data = self._outgoing.read()
            if data:
                await aio.sendall(self.raw, data, timeout=SEND_TIMEOUT)

    async def _fill(self) -> bool:
        """Feed what the socket has to the TLS object; False at the node's EOF."""
        data = await aio.recv(self.raw, 65536)
        if not data:
            self._incoming_bio.write_eof()
            return False
        self._incoming_bio.write(data)
        return True

    async def run(self, plain: socket.socket) -> None:
        """Pump until both directions are done, then close both sockets."""
        downward = asyncio.ensure_future(self._down(plain))
        try:
            with contextlib.suppress(*_NET_ERRORS):
                await self._up(plain)
            with contextlib.suppress(*_NET_ERRORS):
                async with asyncio.timeout(SEND_TIMEOUT):
                    await asyncio.shield(downward)
        finally:
            downward.cancel()
            await asyncio.gather(downward, return_exceptions=True)
            self.raw.close()
            plain.close()

    async def _down(self, plain: socket.socket) -> None:  # node → agent
        try:
            while True:
                try:
                    data = self.tls.read(65536)
                except ssl.SSLWantReadError:
                    await self._flush()  # a read may have made records to send (key updates)
                    await self._fill()
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return  # close_notify (or the connection closed without it)
                if not data:
                    return
                await aio.sendall(plain, data, timeout=SEND_TIMEOUT)
        finally:
            with contextlib.suppress(OSError):
                plain.shutdown(socket.SHUT_WR)

    async def _up(self, plain: socket.socket) -> None:  # agent → node
        while data := await aio.recv(plain, 65536):
            self.tls.write(data)
            await self._flush()
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()  # close_notify; the node's comes later, through _down
        await self._flush()
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_WR)


async def read_reply(sock: socket.socket, limit: int = MAX_REPLY) -> str:
    """Read one (possibly multi-line) FTP reply; its last line, without CRLF."""
    buf = b""
    while True:
        lines = buf.split(b"\n")
        for line in lines[:-1]:
            if _REPLY.match(line) and line[3:4] == b" ":
                return line.rstrip(b"\r").decode("latin-1")
        if len(buf) > limit:
            raise PeerClosed("the FTP server's greeting is too long")
        data = await aio.recv(sock, 4096)
        if not data:
            raise PeerClosed("the FTP server closed the connection before its greeting")
        buf += data


class ServerRefused(SwiftFTPError):
    """The FTP server did not greet a client's connection with 220 (``421 Too many
    users``, or it closed): the message is for the log, ``reply`` for the client."""

    def __init__(self, message: str, reply: str) -> None:
        super().__init__(message)
        self.reply = reply


def parse_227(reply: bytes) -> tuple[str, int] | None:
    """(address, port) of a ``227`` reply (RFC 959: ``h1,h2,h3,h4,p1,p2``, every
    number 0-255, exactly one such group, a port of 1 or more); None otherwise."""
    groups = _227.findall(reply[4:])
    if len(groups) != 1:
        return None
    numbers = [int(x) for x in groups[0]]
    port = numbers[4] * 256 + numbers[5]
    if any(n > 255 for n in numbers) or port == 0:
        return None
    return ".".join(map(str, numbers[:4])), port


def parse_229(reply: bytes) -> int | None:
    """The port of a ``229`` reply (RFC 2428: ``(<d><d><d>port<d>)``); None otherwise."""
    found = _229.findall(reply[4:])
    if len(found) != 1:
        return None
    port = int(found[0][1])
    return port if 0 < port < 65536 else None


def parse_active(verb: str, arg: bytes) -> tuple[str, int]:
    """(address, port) of a client's ``PORT``/``EPRT`` argument, by
    :func:`swiftftp.ftp.parse_port_argument`, with a port from 1 to 65535;
    ``ValueError`` for anything else."""
    address, port = parse_port_argument(verb, arg)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return address, port


class DataLink:
    """One transfer's data connection through the proxy.

    ``started``: the FTP server's end exists (passive: from the start; active: once
    the server has connected to the agent's listener).  ``outcome``: None once the
    proxy holds the client's end (it dialled the client, or the client connected to
    its passive port), else the reason it failed.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task | None = None

    def succeed(self) -> None:
        if not self.outcome.done():
            self.outcome.set_result(None)

    def fail(self, reason: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(reason)


@dataclass
class Pending:
    """A command passed to the server (or answered by the agent) whose final reply is due."""

    verb: str
    #: The transfer's data connection, for a transfer command.
    link: DataLink | None = None
    #: The agent's own reply (the command never reached the server).
    local: bytes | None = None


async def _first(*waits: Awaitable[Any], timeout: float) -> None:
    """Return when the first of ``waits`` is done, or after ``timeout`` seconds."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ControlBridge:
    """One client's control connection between the proxy and the local FTP server.

    Replies are matched to commands in order (RFC 959: one final reply each), so the
    bridge knows which reply ends a transfer, and where the replies it gives itself
    (``501`` to a malformed ``PORT``) go.
    """

    def __init__(self, agent: Agent, proxy: socket.socket, server: socket.socket, label: str) -> None:
        self.agent = agent
        self.proxy = proxy
        self.server = server
        self.label = label
        #: The agent's end of the control connection: where active-mode listeners go.
        self.local_ip = normalize_ip(server.getsockname()[0])
        #: The server's address: passive data connections go there, whatever a 227 says.
        self.server_ip = normalize_ip(server.getpeername()[0])
        self.passive: tuple[DeviceChannel, socket.socket] | None = None
        self.active: DataLink | None = None
        self.pending: deque[Pending] = deque()
        self._links: set[DataLink] = set()
        self._reply_code: bytes | None = None  # of the multi-line reply being read
        self._reply_lines: list[bytes] = []
        self._write_lock = asyncio.Lock()

    def close(self) -> None:
        self._drop_passive()
        for link in list(self._links):
            if link.task is not None and not link.outcome.done():
                link.task.cancel()
        self.proxy.close()
        self.server.close()

    def _drop_passive(self) -> None:
        if self.passive:
            chan, data = self.passive
            chan.close()
            data.close()
            self.passive = None

    async def run(self, early: bytes) -> None:
        """Bridge until both sides are done; :class:`ServerRefused` if the server does
        not greet with 220."""
        timeout = self.agent.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                greeting = await read_reply(self.server)
        except _NET_ERRORS as exc:
            raise ServerRefused(f"{self.agent.ftp} did not greet: {describe(exc, timeout)}",
                                "421 The FTP server behind this device did not answer.") from None
        if not greeting.startswith("220"):  # the proxy greeted the client already: only a 220 is dropped
            code = greeting[:3] if greeting[:1] in "45" else "421"
            raise ServerRefused(f"{self.agent.ftp} refused the connection: {greeting}",
                                f"{code} {greeting[4:] or 'The FTP server refused the connection.'}")
        await aio.run_all(self._client_pump(early), self._server_pump())

    async def _send_client(self, data: bytes) -> None:
        if data:
            async with self._write_lock:
                await aio.sendall(self.proxy, data, timeout=SEND_TIMEOUT)

    async def _client_pump(self, first: bytes) -> None:
        lines = LineSplitter()
        data = first
        while True:
            for line in lines.split(data):
                if out := await self._from_client(line):
                    await aio.sendall(self.server, out, timeout=SEND_TIMEOUT)
            data = await aio.recv(self.proxy, 65536)
            if not data:
                if tail := lines.flush():
                    await aio.sendall(self.server, tail, timeout=SEND_TIMEOUT)
                with contextlib.suppress(OSError):
                    self.server.shutdown(socket.SHUT_WR)
                return

    async def _server_pump(self) -> None:
        lines = LineSplitter()
        while True:
            data = await aio.recv(self.server, 65536)
            if not data:
                rest = b"".join(self._reply_lines) + lines.flush()
                self._reply_lines, self._reply_code = [], None
                await self._send_client(rest)
                with contextlib.suppress(OSError):
                    self.proxy.shutdown(socket.SHUT_WR)
                return
            for line in lines.split(data):
                await self._from_server(line)

    # ---- client → server -----------------------------------------------------------

    async def _from_client(self, line: bytes) -> bytes:
        """The line the server gets for a client's line (empty: the agent answered it)."""
        if not line.endswith(b"\n"):
            return line  # a fragment of an over-long line: passed on as it is
        verb, arg = split_command(line)
        if verb in ("PORT", "EPRT"):
            return await self._active(verb, arg)
        entry = Pending(verb)
        if verb in ("PASV", "EPSV"):
            self._drop_passive()
            if self.active is not None:
                self._forget_active()
            if verb == "PASV" and ":" in self.server_ip:
                line = b"EPSV\r\n"  # PASV cannot name an IPv6 address; the client still gets a 227
        elif verb in TRANSFER_VERBS:
            if self.passive:
                chan, data = self.passive
                self.passive = None
                entry.link = self._link("passive")
                entry.link.started.set()
                entry.link.task = self.agent.spawn(self._pasv_accept(entry.link, chan, data),
                                                   "agent-pasv-accept")
            elif self.active is not None:
                entry.link, self.active = self.active, None  # one transfer per PORT
                reason = entry.link.outcome.result() if entry.link.outcome.done() else None
                if reason is not None:
                    # a server that connects at PORT (pyftpdlib) would wait for another data
                    # connection after its 150 and never answer: the client is told now
                    await self._answer(verb, f"425 Cannot open the data connection: {reason}.\r\n".encode())
                    return b""
        self.pending.append(entry)
        return line

    async def _answer(self, verb: str, reply: bytes) -> None:
        """Answer a client's command without the server, in its place among the replies."""
        entry = Pending(verb, local=reply)
        self.pending.append(entry)
        if self.pending[0] is entry:  # nothing is due before it
            await self._send_client(reply)
            self.pending.popleft()

    def _link(self, mode: str) -> DataLink:
        link = DataLink(mode)
        self._links.add(link)
        link.outcome.add_done_callback(lambda _: self._links.discard(link))
        return link

    def _forget_active(self) -> None:
        link, self.active = self.active, None
        if link is not None and link.task is not None:
            link.task.cancel()

    async def _active(self, verb: str, arg: bytes) -> bytes:
        try:
            address, port = parse_active(verb, arg)
        except ValueError:
            await self._answer(verb, f"501 Syntax error in {verb} arguments.\r\n".encode())
            return b""
        self._drop_passive()
        self._forget_active()
        try:
            listener = listen_on(self.local_ip, 0, backlog=1)
        except OSError as exc:
            log.warning("%s: cannot listen for the FTP server's data connection: %s",
                        self.label, describe(exc))
            await self._answer(verb, b"425 Cannot open a data connection.\r\n")
            return b""
        lport = listener.getsockname()[1]
        link = self.active = self._link("active")
        link.task = self.agent.spawn(self._port_connect(link, listener, address, port),
                                     "agent-port-connect")
        self.pending.append(Pending(verb))
        if ":" in self.local_ip:
            return f"EPRT |2|{self.local_ip}|{lport}|\r\n".encode()
        h = self.local_ip.replace(".", ",")
        return f"PORT {h},{lport >> 8},{lport & 255}\r\n".encode()

    async def _port_connect(self, link: DataLink, listener: socket.socket, address: str, port: int) -> None:
        """The server connects to our listener: dial the client through the proxy."""
        client = endpoint(address, port)

        async def from_server(sock: socket.socket) -> bool | None:
            return True if normalize_ip(sock.getpeername()[0]) == self.server_ip else None

        try:
            try:
                server_data, _ = await accept_first(listener, from_server, ACTIVE_ACCEPT_TIMEOUT)
            except TimeoutError:
                link.fail(f"the FTP server did not connect within {ACTIVE_ACCEPT_TIMEOUT:g} s")
                return
            finally:
                listener.close()
            link.started.set()
            try:
                chan, _ = await self.agent._open(
                    request={"action": "data_port_connect", "address": address, "port": port}
                )
            except _NET_ERRORS as exc:
                reason = describe(exc, self.agent.settings.connect_timeout)
                log.warning("%s: active data connection to %s failed: %s", self.label, client, reason)
                server_data.close()
                link.fail(reason)
                return
            except BaseException:  # cancelled: the client left
                server_data.close()
                raise
            link.succeed()
            await self._splice(chan, server_data)
        finally:
            link.fail("the data connection was abandoned")

    # ---- server → client -----------------------------------------------------------

    async def _from_server(self, line: bytes) -> None:
        """Take one line from the server; a whole reply goes on to the client at once."""
        if self._reply_code is not None:  # inside a multi-line reply
            if line[:3] == self._reply_code and line[3:4] == b" ":
                text = b"".join(self._reply_lines) + line
                code, self._reply_code, self._reply_lines = self._reply_code, None, []
                await self._reply(code, text)
                return
            self._reply_lines.append(line)
            if sum(map(len, self._reply_lines)) > MAX_REPLY:  # pass on, keep looking for the end
                held, self._reply_lines = self._reply_lines, []
                await self._send_client(b"".join(held))
            return
        m = _REPLY.match(line)
        if not m:
            await self._send_client(line)  # not a reply line: passed on as it is
        elif m[2] == b"-":
            self._reply_code, self._reply_lines = m[1], [line]
        else:
            await self._reply(m[1], line)

    async def _reply(self, code: bytes, text: bytes) -> None:
        """A whole reply: passed on, rewritten, or held until its transfer's data
        connection exists; then the agent's own replies that were waiting for it."""
        if code.startswith(b"1"):  # preliminary (150): the final reply is still to come
            await self._send_client(text)
            return
        entry = self.pending[0] if self.pending and self.pending[0].local is None else None
        if entry is not None and entry.verb in ("PASV", "EPSV") and code in (b"227", b"229"):
            text = await self._passive(entry.verb, code, text)
        elif entry is not None and entry.link is not None:
            text = await self._settle(entry.link, code, text)
        await self._send_client(text)
        if entry is not None:
            self.pending.popleft()
        while self.pending and (local := self.pending[0].local) is not None:
            await self._send_client(local)
            self.pending.popleft()

    async def _settle(self, link: DataLink, code: bytes, text: bytes) -> bytes:
        """The final reply to a transfer command, once its data connection through the
        proxy exists: the server's own, or 425 with the reason it failed."""
        timeout = self.agent.settings.connect_timeout
        if not link.started.is_set():
            if not code.startswith(b"2"):
                return text  # the server gave up before it connected: its reply stands
            # a 2xx means the server did connect; the accept may just not have run yet
            await _first(link.started.wait(), asyncio.shield(link.outcome), timeout=timeout)
            if not link.started.is_set():
                return text
        try:
            async with asyncio.timeout(DATA_SETUP_TIMEOUT):
                reason = await asyncio.shield(link.outcome)
        except TimeoutError:
            reason = f"no data connection through the proxy within {DATA_SETUP_TIMEOUT:g} s"
            if link.task is not None:
                link.task.cancel()
        if reason is None:
            return text
        log.warning("%s: %s answered %s, the client gets 425: %s", self.label,
                    self.agent.ftp, code.decode(), reason)
        return f"425 Cannot open the data connection: {reason}.\r\n".encode()

    async def _passive(self, verb: str, code: bytes, text: bytes) -> bytes:
        """The server opened a passive port: open one on the proxy and name that instead,
        in the form the client asked for (the server's port is dialled meanwhile: the
        two round trips overlap).  The address in a 227 is not used: the data connection
        goes to the server's own address (as curl does), so a server that announces its
        public address (vsftpd's ``pasv_address``) still works."""
        self._drop_passive()
        if code == b"227":
            parsed = parse_227(text.splitlines()[-1])
            port = parsed[1] if parsed else None
        else:
            port = parse_229(text.splitlines()[-1])
        if port is None:
            log.warning("%s: %s sent a passive reply that does not parse: %r", self.label,
                        self.agent.ftp, text[:200])
            return b"501 The FTP server's passive reply could not be understood.\r\n"
        agent = self.agent
        local = asyncio.ensure_future(dial(self.server_ip, port, agent.settings.connect_timeout))
        chan: DeviceChannel | None = None
        try:
            chan, reply = await agent._open(request={"action": "data_pasv_listen"})
            assert reply is not None
            proxy_port = int(reply["port"])
            data = await local
        except BaseException as exc:
            if chan is not None:
                chan.close()
            local.cancel()
            outcome = (await asyncio.gather(local, return_exceptions=True))[0]
            if isinstance(outcome, socket.socket):
                outcome.close()
            if not isinstance(exc, (*_NET_ERRORS, KeyError, ValueError)):
                raise  # cancelled: the client left
            if isinstance(exc, AgentError):  # e.g. error 15: tell the client why
                log.warning("%s: passive listen refused: %s", self.label, exc)
                return f"425 Cannot open a data connection: {exc}.\r\n".encode()
            log.warning("%s: passive setup failed: %s", self.label,
                        describe(exc, agent.settings.connect_timeout))
            return b"425 Cannot open a passive data connection.\r\n"
        self.passive = (chan, data)
        if verb == "EPSV":
            return f"229 Entering Extended Passive Mode (|||{proxy_port}|)\r\n".encode()
        ip = agent.proxy_ip or "0.0.0.0"
        if ":" in ip:
            ip = "0.0.0.0"  # the proxy rewrites the address anyway
        h = ip.replace(".", ",")
        return f"227 Entering Passive Mode ({h},{proxy_port >> 8},{proxy_port & 255}).\r\n".encode()

    async def _pasv_accept(self, link: DataLink, chan: DeviceChannel, data: socket.socket) -> None:
        try:
            try:
                await chan.send({"action": "data_pasv_accept"})
                await self.agent._reply(chan, DATA_SETUP_TIMEOUT)
            except BaseException as exc:
                chan.close()
                data.close()
                if not isinstance(exc, _NET_ERRORS):
                    raise  # cancelled: the client left
                reason = describe(exc, DATA_SETUP_TIMEOUT)
                log.warning("%s: passive data connection failed: %s", self.label, reason)
                link.fail(reason)
                return
            link.succeed()
            await self._splice(chan, data)
        finally:
            link.fail("the data connection was abandoned")

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
