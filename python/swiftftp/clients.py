"""The FTP client listener: greeting, pre-login dialogue, rendezvous with the
device, then the relayed control connection with its rewriting.

Deadlines: ``timeouts.client_login`` from the client's connect until the device
answered ``230`` (the node's own dialogue, the rendezvous and the device's
login dialogue all count); ``timeouts.rendezvous`` for the device to take the
client (notify, accept, its login on the port); then ``timeouts.idle`` of
silence, where a data connection still moving bytes for this client counts as
activity; every write within ``timeouts.send``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator

from . import aio
from .channel import DeviceChannel
from .command import CommandSession
from .control import ControlRelay
from .devices import login, wrap_device_tls
from .errors import Busy, PeerClosed, ProtocolError
from .ftp import (
    GREETING,
    MAX_LINE,
    Close,
    ControlRewriter,
    Failure,
    Ftps,
    LineSplitter,
    Lookup,
    PreLogin,
    Reply,
    StartTls,
)
from .limits import Admission
from .net import bracketed, close_gracefully, normalize_ip
from .outbox import rendezvous_grace
from .protocol import error
from .relay import Backend, Relay
from .rendezvous import Rendezvous
from .state import Device, Node

log = logging.getLogger("swiftftp.clients")

SHUTTING_DOWN = "421 This node is shutting down; try again in a moment."


class ClientConnection:
    """An FTP client's control socket: line reads before login, bounded writes, and
    byte counts as the client sees them (quota accounting starts with the greeting)."""

    __slots__ = ("sock", "peer_ip", "send_timeout", "buffer", "counts", "local_ip", "tls")

    def __init__(self, sock: socket.socket, send_timeout: float, peer_ip: str) -> None:
        self.sock = sock
        self.peer_ip = peer_ip
        self.send_timeout = send_timeout
        self.buffer = b""  # received, not yet consumed as a line
        self.counts = [0, 0]  # received from the client (up), sent to it (down)
        #: The node's address on this connection (for 227 replies): after TLS starts,
        #: ``sock`` is the plaintext end of a socket pair, which has none.
        self.local_ip = normalize_ip(sock.getsockname()[0])
        #: The Rust relay terminating TLS on the client's socket (``start_tls``).
        self.tls: Relay | None = None

    def start_tls(self, backend: Backend, config: object, tag: bytes) -> None:
        """TLS from the next byte on (after ``234``, or at once for implicit FTPS): the
        Rust relay takes the client's socket, and lines come from its plaintext side.
        Bytes already read behind ``AUTH TLS`` (a pipelined ClientHello) go with it."""
        plain, self.tls = backend.wrap_tls(self.sock, config, tag=tag, initial=self.buffer)
        self.buffer = b""
        self.sock = plain

    async def end_tls(self, peer: str) -> None:
        """Close the plaintext side (close_notify to the client), and see the TLS relay
        end within a second (else cancel it)."""
        if self.tls is None:
            return
        await close_gracefully(self.sock)
        try:
            async with asyncio.timeout(1.0):
                await self.tls
        except TimeoutError:
            self.tls.cancel()  # closes the client's socket on the relay's worker
        except OSError as exc:
            log.info("client %s: TLS ended: %s", peer, exc)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this task was cancelled (not only the relay: it was, with it)

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
        await aio.sendall(self.sock, data, timeout=self.send_timeout)
        self.counts[1] += len(data)

    async def send_line(self, text: str) -> None:
        await self.send(text.encode() + b"\r\n")

    async def last_words(self, text: str) -> None:
        """A final reply before closing: a client that does not read gets no wait."""
        with contextlib.suppress(OSError, TimeoutError):
            await aio.sendall(self.sock, text.encode() + b"\r\n", timeout=1.0)


LOCKED_OUT = "421 Too many failed logins from your address; try again later."


async def handle_implicit(node: Node, sock: socket.socket, address: tuple) -> bool:
    """One client on the implicit FTPS port: TLS from the first byte, then as any client."""
    return await handle_client(node, sock, address, implicit=True)


async def handle_client(node: Node, sock: socket.socket, address: tuple, implicit: bool = False) -> bool:
    """One FTP client: answer it until it names an online device, then splice it there.
    The caller closes the socket afterwards (False: it is never kept)."""
    peer_ip, peer_port = address[:2]
    ip = normalize_ip(peer_ip)
    peer = f"{bracketed(ip)}:{peer_port}"
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client = ClientConnection(sock, node.settings.send_timeout, ip)
    admission = "shutting down" if node.draining else node.guard.admit(ip)
    if isinstance(admission, str):
        node.refuse(admission, peer, ip)
        await client.last_words({
            "locked out": LOCKED_OUT,
            "shutting down": SHUTTING_DOWN,
            "too many connections not logged in on this node": "421 This node is busy; try again later.",
        }.get(admission, "421 Too many connections from your address."))
        return False
    admission.watch(lambda: _locked_out(node, client.sock, peer, ip))
    ftps = node.tls.control(secured=implicit) if node.tls is not None else None
    try:
        if implicit and ftps is not None and node.tls is not None:
            client.start_tls(node.backend, node.tls.config, ftps.tag)  # before the greeting
        await _serve_client(node, client, peer, ip, admission, ftps)
    finally:
        admission.release()
        await client.end_tls(peer)
        node.left()
    return False


def _locked_out(node: Node, sock: socket.socket, peer: str, ip: str) -> None:
    """The address was locked out for guessing while this connection was still logging
    in: a last word (not waited for) and an end to it, wherever it is."""
    node.refuse("locked out", peer, ip)
    with contextlib.suppress(OSError):
        sock.send(LOCKED_OUT.encode() + b"\r\n")
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


async def _serve_client(
    node: Node, client: ClientConnection, peer: str, ip: str, admission: Admission, ftps: Ftps | None
) -> None:
    s = node.settings
    connected = time.monotonic()
    login_deadline = connected + s.client_login_timeout
    dialogue = PreLogin(s.max_login_failures, ftps)
    try:
        async with asyncio.timeout(s.client_login_timeout):
            await client.send_line(GREETING)
            found = await _pre_login(node, client, dialogue, peer, ip)
    except TimeoutError:
        [reply] = [e for e in dialogue.timed_out() if isinstance(e, Reply)]
        await client.last_words(reply.text)  # a client that does not read gets no wait
        return
    except (PeerClosed, OSError):
        return
    if found is None:
        return
    device, lookup = found
    group = node.guard.group(ip)
    try:
        with node.connection(device, "control"), _login_slot(device, group, s.max_control_per_device) as slot:
            try:
                asked = time.monotonic()
                chan = await rendezvous(node, device, ip, min(login_deadline - asked, s.rendezvous_timeout))
                node.stats.observe_rendezvous(time.monotonic() - asked)
            except (TimeoutError, OSError, ProtocolError, PeerClosed) as exc:
                reason = str(exc) or f"no login within {s.rendezvous_timeout:g} s"
                log.info("device %s did not take the connection: %s", device.prefix, reason)
                await _act(client, peer, dialogue.device_unavailable())
                return

            def logged_in() -> None:
                slot.release()
                admission.logged_in()

            first = lookup.user_line + client.buffer
            times = (connected, login_deadline)
            await control_relay(node, device, client, chan, first, peer, times, logged_in, ftps)
    except Busy as exc:
        node.refuse(str(exc), f"{device.prefix} from {peer}", ip)
        await client.last_words(f"421 {str(exc).capitalize()}; try again later.")


async def _pre_login(
    node: Node, client: ClientConnection, dialogue: PreLogin, peer: str, ip: str
) -> tuple[Device, Lookup] | None:
    """The node's own dialogue, until ``USER`` names an online device (None: closed)."""
    while True:
        events = dialogue.on_line(await client.readline())
        lookup = next((e for e in events if isinstance(e, Lookup)), None)
        if lookup:
            if node.draining:
                await _act(client, peer, [Reply(SHUTTING_DOWN), Close("node draining")])
                return None
            if not node.guard.may_guess(ip):  # before the lookup: a refused guess learns nothing
                node.refuse("node-wide guess budget spent", peer, ip)
                reply = "421 Too many failed logins on this node; try again later."
                await _act(client, peer, [Reply(reply), Close("guess budget")])
                return None
            device = node.table.online_device(lookup.prefix)
            if device is not None:
                return device, lookup
            events = dialogue.unknown_prefix(lookup.prefix)
        failure = next((e for e in events if isinstance(e, Failure)), None)
        if failure is not None:
            node.stats.login_failures += 1
            if node.guard.failure(ip, failure.guess):
                return None  # locked out: this connection was closed with the others
            await asyncio.sleep(node.settings.failure_delay)  # slows guessing down
        if await _act(client, peer, events):
            return None
        ftps = dialogue.ftps
        if node.tls is not None and ftps is not None and any(isinstance(e, StartTls) for e in events):
            ftps.secured = True
            client.start_tls(node.backend, node.tls.config, ftps.tag)


async def _act(client: ClientConnection, peer: str, events: list) -> bool:
    """Carry out the dialogue's events; True when the connection should close."""
    for event in events:
        if isinstance(event, Reply):
            with contextlib.suppress(OSError, TimeoutError):
                await client.send_line(event.text)
        elif isinstance(event, Failure):
            log.info("client %s: login failed: %s", peer, event.reason)
        elif isinstance(event, Close):
            log.info("client %s: closing: %s", peer, event.reason)
            return True
    return False


class LoginSlot:
    """A control connection of a device that has not logged in yet, counted against
    its client address's share of the device's control slots."""

    __slots__ = ("device", "ip", "held")

    def __init__(self, device: Device, ip: str) -> None:
        self.device = device
        self.ip = ip
        device.logging_in[ip] += 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.device.logging_in[self.ip] -= 1
            if self.device.logging_in[self.ip] <= 0:
                del self.device.logging_in[self.ip]


@contextlib.contextmanager
def _login_slot(device: Device, group: str, slots: int) -> Iterator[LoginSlot]:
    """Hold a login slot; :class:`Busy` when the address ``group`` already has half the
    device's slots logging in (connections that never send a password must not lock
    out the others)."""
    if device.logging_in[group] >= max(1, slots // 2):
        raise Busy("too many logins in progress from your address")
    slot = LoginSlot(device, group)
    try:
        yield slot
    finally:
        slot.release()


# ---- rendezvous ---------------------------------------------------------------------------


async def rendezvous(node: Node, device: Device, client_ip: str, timeout: float) -> DeviceChannel:
    """Ask the device to connect to a fresh port and wait until it has logged in there:
    notify, accept and login under one deadline, ``timeout`` seconds from now."""
    command = device.command
    if command is None:
        raise PeerClosed("device went offline")
    with node.listener(node.guard.group(client_ip)) as listener:
        waiting = command.rendezvous(listener.getsockname()[1])
        outcome = "abandoned"  # the client left first, or the node stops
        try:
            try:
                async with asyncio.timeout(timeout):
                    chan = await _take(node, device, listener, waiting, command)
            except TimeoutError:
                outcome = "timeout"
                raise
            outcome = "taken"
            return chan
        finally:
            command.rendezvous_over(waiting, outcome)


async def _take(
    node: Node, device: Device, listener: socket.socket, waiting: Rendezvous, command: CommandSession
) -> DeviceChannel:
    """Accept on the rendezvous port until the device has logged in there (who may try:
    :meth:`Rendezvous.admit`); a stranger is closed at once and never delays the device."""
    candidates: dict[asyncio.Task, socket.socket] = {}
    accept: asyncio.Future | None = None
    loop = asyncio.get_running_loop()
    try:
        while True:
            if accept is None:
                accept = asyncio.ensure_future(aio.accept(listener))
            done, _ = await asyncio.wait({accept, *candidates}, return_when=asyncio.FIRST_COMPLETED)
            if accept in done:
                sock, address = accept.result()
                accept = None
                if waiting.admit(node.guard.group(normalize_ip(address[0]))):
                    reaction = waiting.reaction(loop.time())
                    candidate = _candidate(node, device, sock, waiting, command, reaction)
                    candidates[asyncio.ensure_future(candidate)] = sock
                else:
                    stranger = normalize_ip(address[0])
                    detail = f"{stranger} on port {waiting.port} of {device.prefix}"
                    node.refuse("stranger on a rendezvous port", detail, stranger)
                    sock.close()
            for task in done & set(candidates):
                del candidates[task]
                waiting.candidate_left()
                chan = task.result()
                if chan is not None:
                    return chan
    finally:
        # Cancel, then wait: a task may still be registered on a socket until it has
        # run its cancellation, and closing the socket first would orphan that.
        pending = [t for t in (accept, *candidates) if t is not None]
        for task in pending:
            task.cancel()
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, tuple):  # an accepted connection nobody looked at
                result[0].close()
            elif isinstance(result, DeviceChannel):
                result.close()
        for sock in candidates.values():
            sock.close()


async def _candidate(
    node: Node, device: Device, sock: socket.socket, waiting: Rendezvous, command: CommandSession,
    reaction: float | None,
) -> DeviceChannel | None:
    """One connection from the device's address on a rendezvous port: the device
    logged in (its channel), or None (answered and closed). ``reaction``: seconds
    from writing control_connection_waiting to this connection (outbox.rendezvous_grace)."""
    s = node.settings
    grace = s.device_grace if reaction is None else rendezvous_grace(reaction, s.device_grace)
    if command.tls:  # a device on the TLS port takes its clients over TLS too
        sock = wrap_device_tls(node, sock)
    chan = DeviceChannel(sock, send_timeout=s.send_timeout, grace=grace)
    try:
        async with asyncio.timeout(s.device_login_timeout):
            await login(node, chan, expected=device.android_id)
        command.rendezvous_over(waiting, "taken")  # the next message may go
        return chan
    except ProtocolError as exc:
        log.info("rendezvous for %s: %s", device.prefix, exc)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(1):
                await chan.send(error(exc.code, exc.text))
    except (TimeoutError, OSError, PeerClosed) as exc:
        log.info("rendezvous for %s: candidate failed: %s", device.prefix, exc or type(exc).__name__)
    except BaseException:
        chan.close()
        raise
    chan.close()
    return None


# ---- the relayed control connection -------------------------------------------------------

#: The data ports of a control connection without TLS: none to claim (one shared empty
#: deque, not one per connection).
_NO_CLAIMS: deque[tuple] = deque(maxlen=0)


async def control_relay(
    node: Node,
    device: Device,
    conn: ClientConnection,
    chan: DeviceChannel,
    first: bytes,
    peer: str,
    login_times: tuple[float, float],
    logged_in: Callable[[], None],
    ftps: Ftps | None = None,
) -> None:
    """Relay the control connection, rewriting it on the way (:class:`ControlRewriter`).

    Bytes are counted on the client's side: what it sent, and what it was
    sent after rewriting.
    """
    s = node.settings
    connected, login_deadline = login_times
    await chan.settle()  # "{}" must reach the device alone, before the USER line
    device_sock, early = chan.detach()
    client = conn.sock
    client_ip = conn.peer_ip
    claims: deque[tuple] = deque() if node.tls is not None and ftps is not None else _NO_CLAIMS
    claim = node.tls.claimer(ftps, client_ip, claims) if claims is not _NO_CLAIMS else None
    public = s.public_address or conn.local_ip
    rewriter = ControlRewriter(client_ip, public, ftps, claim)
    failures = [0]
    relay: ControlRelay

    def deadline() -> float:
        """Read again at every check; never later than the idle deadline, which the
        login (230) may bring forward: ``logins`` then asks for a check."""
        if device.transferring_for(client_ip):
            idle = time.monotonic() + s.idle_timeout  # a transfer is activity too
        else:
            idle = relay.last + s.idle_timeout
        return idle if rewriter.logged_in else min(idle, login_deadline)

    done = [False]

    def logins() -> None:
        """Follow the device's answers to the login: 230 ends the login phase (its slot,
        its pre-login count); a 530 is a failed guess of a password."""
        if rewriter.logged_in and not done[0]:
            done[0] = True
            logged_in()
            node.stats.observe_login(time.monotonic() - connected)
            relay.check()
        while failures[0] < rewriter.failures:
            failures[0] += 1
            node.stats.login_failures += 1
            node.guard.failure(client_ip)  # a lockout closes this connection too

    to_device = LineSplitter(rewriter.command)
    to_client = LineSplitter(rewriter.reply)
    relay = ControlRelay(
        client, device_sock, to_device, to_client, deadline=deadline,
        send_timeout=s.send_timeout, counts=conn.counts, on_down=logins,
        answers=rewriter.take_answers,
    )
    device.control_peers[client_ip] += 1
    try:
        with node.session("control", device, peer, client_ip) as info:
            counts = conn.counts
            info.counters = lambda: (counts[0], counts[1])
            relay.start(to_device.feed(first), to_client.feed(early))
            logins()
            try:
                await relay.done
            except TimeoutError:
                if time.monotonic() >= deadline():
                    kind = "Idle" if rewriter.logged_in or time.monotonic() < login_deadline else "Login"
                    await conn.last_words(f"421 {kind} timeout, closing control connection.")
                raise
    except (OSError, TimeoutError):
        pass
    finally:
        relay.close()
        device_sock.close()
        if node.tls is not None and ftps is not None:
            node.tls.release(ftps, claims)
        device.control_peers[client_ip] -= 1
        if device.control_peers[client_ip] <= 0:
            del device.control_peers[client_ip]
