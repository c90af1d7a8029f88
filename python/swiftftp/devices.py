"""The device listener: logins, and what each connection becomes (docs/protocol.md).

Every device connection starts with a login; the next message decides what
the connection is: a command session (:mod:`swiftftp.command`, held without a
task once open), or a data connection in passive (``data_pasv_listen``) or
active (``data_port_connect``) mode, relayed once set up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass

from . import aio, logs
from .channel import DeviceChannel
from .command import CommandSession
from .errors import Busy, ErrorCode, PeerClosed, ProtocolError
from .ftp import Ftps
from .identity import b64, fingerprint, new_challenge, new_token, parse_public_key, same_token, verify
from .net import accept_first, bracketed, close_gracefully, dial, normalize_ip
from .protocol import action_of, error, field
from .registry import AccountExists
from .state import Device, Node

log = logging.getLogger("swiftftp.devices")

MAX_ANDROID_ID = 128


_ANDROID_ID = re.compile(rf"[!-~]{{1,{MAX_ANDROID_ID}}}")


def valid_android_id(android_id: str) -> bool:
    """Non-empty, not absurdly long, printable ASCII without spaces."""
    return _ANDROID_ID.fullmatch(android_id) is not None


@dataclass(frozen=True, slots=True)
class Login:
    """A device's login as the node accepted it."""

    android_id: str
    prefix: str
    #: The device decodes a byte stream of objects (``"json_stream": true``): no pacing.
    stream: bool
    #: The key this login proved the device holds (a challenge it signed, or its
    #: command session's token); None for a device without a key.
    key: str | None = None


async def login(node: Node, chan: DeviceChannel, expected: str | None = None) -> Login:
    """Read the login (or the legacy create_account/authenticate) and answer it.

    With ``expected`` (a rendezvous port) only that device id may log in.
    Raises ProtocolError for the caller to answer, then close.
    """
    while True:
        message = await chan.recv()
        action = action_of(message)
        if action not in ("login", "authenticate", "create_account"):
            raise ProtocolError(ErrorCode.MALFORMED, f"expected login, got {action!r}")
        android_id = field(message, "android_id", str)
        if not valid_android_id(android_id):
            raise ProtocolError(ErrorCode.INVALID_DEVICE_ID, "invalid android_id")
        if expected is not None and android_id != expected:
            raise ProtocolError(ErrorCode.BAD_CREDENTIALS, "not the device expected here")
        stream = message.get("json_stream") is True
        key, signed = await prove(node, chan, message, android_id)
        if action != "authenticate" and node.registry.lookup(android_id, seen=False) is None:
            ip, port = chan.peer
            ip = normalize_ip(ip)
            if not node.guard.new_device(ip):
                node.refuse("too many new devices from one address", f"{bracketed(ip)}:{port}", ip)
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
        if signed and key is not None and node.registry.key_of(android_id) is None:  # first use
            await _bind(node, chan, android_id, key, prefix)
        chan.paced = not stream
        await chan.send({})
        return Login(android_id, prefix, stream, key)


async def _bind(node: Node, chan: DeviceChannel, android_id: str, key: str, prefix: str) -> None:
    """Bind the key a first login proved: here, and in a fleet first in the bucket
    (``keys/<id>``, created only if absent), so that another key bound on another
    node refuses this login like a local one. A bucket that does not answer binds
    nothing (the login goes on, unbound, as a login without a key would)."""
    if node.keys is not None:
        fleet_key = await node.keys.bind(android_id, key)
        if fleet_key is None:
            log.warning("device %s: key not bound: the fleet's bucket did not answer", prefix)
            return
        if fleet_key != key:
            await refuse_identity(node, chan, android_id, "this device id is bound to another key")
    if not node.registry.bind(android_id, key):  # another key was bound meanwhile
        await refuse_identity(node, chan, android_id, "this device id is bound to another key")
    logs.event(log, "device_bound", prefix=prefix, peer=_where(chan))


def _normalised(offered: str | None) -> str | None:
    """The login's ``key`` as :func:`parse_public_key` makes it; None if absent or bad
    (a bad one is answered later)."""
    try:
        return parse_public_key(offered) if offered is not None else None
    except ValueError:
        return None


def _where(chan: DeviceChannel) -> str:
    ip, port = chan.peer
    return f"{bracketed(normalize_ip(ip))}:{port}"


async def prove(node: Node, chan: DeviceChannel, message: dict, android_id: str) -> tuple[str | None, bool]:
    """Check the login's proof of identity (docs/protocol.md, "Device proof of identity"):
    the key it proved (None for a device id without a key that offers none), and whether
    it signed a challenge just now (only that binds a key: a token shown after an
    operator's ``devices unbind`` must not bind the old key again).

    * ``token``: the token of the device's command session open on this node (the
      rendezvous and data connections of that session: no round trip);
    * ``key``: the node sends ``{"challenge"}``, the device answers ``login_proof``
      with its signature. An unbound id is bound to the key later in :func:`login`,
      once it has a prefix;
    * neither: accepted only for an id that is not bound.

    A login that fails is refused with error 16, counted against its address like a
    failed FTP login, and answered after ``failure_delay``."""
    token = field(message, "token", str, required=False)
    offered = field(message, "key", str, required=False)
    bound = node.registry.key_of(android_id)
    if token is not None:
        device = node.table.by_id.get(android_id)
        command = device.command if device is not None else None
        if command is None or not same_token(token, command.token):
            await refuse_identity(node, chan, android_id,
                                  "session token not valid (no command session of this device here)")
        assert command is not None
        return command.key, False
    ip = normalize_ip(chan.peer[0])
    if node.keys is not None:  # a fleet: the bucket's binding counts, read where it may matter
        locked = node.guard.locked(node.guard.group(ip))  # then no read for a key it failed before
        if bound is None:
            bound = await node.keys.key_of(android_id, _normalised(offered), reread=not locked)
        elif _normalised(offered) != bound and not locked:  # to be refused: unless changed fleet-wide
            bound = await _reconcile(node, android_id, bound)
    if offered is None and bound is None:
        return None, False  # a device without a key (every field device): today's behaviour
    if node.guard.locked(node.guard.group(ip)):
        node.refuse("locked out", _where(chan), ip)
        raise ProtocolError(ErrorCode.IDENTITY, "too many failed logins from this address; try again later")
    if offered is None:
        await refuse_identity(node, chan, android_id,
                              "this device id is bound to a key: the login must prove it holds it")
    assert offered is not None
    try:
        key = parse_public_key(offered)
    except ValueError as exc:
        raise ProtocolError(ErrorCode.MALFORMED,
                            f"field 'key' must be an Ed25519 public key in base64: {exc}") from None
    if bound is not None and key != bound:
        await refuse_identity(node, chan, android_id, "this device id is bound to another key")
    challenge = new_challenge()
    await chan.send({"challenge": b64(challenge)})
    answer = await chan.recv()
    if answer.get("action") != "login_proof":
        raise ProtocolError(ErrorCode.MALFORMED, "expected login_proof")
    if not verify(key, android_id, challenge, field(answer, "signature", str)):
        await refuse_identity(node, chan, android_id, "signature not valid")
    return key, True


async def _reconcile(node: Node, android_id: str, local: str) -> str | None:
    """A login did not prove the key this node's registry binds to the id: the fleet
    decides (an operator may have unbound it, and a new key been bound, through
    another node); this registry follows the bucket. The key to prove, or None."""
    assert node.keys is not None
    fleet_key = await node.keys.reconcile(android_id, local)
    if fleet_key != local:
        node.registry.unbind(android_id)
        if fleet_key is not None:
            node.registry.bind(android_id, fleet_key)
        logs.event(log, "device_key_from_fleet", device=android_id,
                   key=fingerprint(fleet_key) if fleet_key else "-")
    return fleet_key


async def refuse_identity(node: Node, chan: DeviceChannel, android_id: str, reason: str) -> None:
    """Count a login that did not prove the device's identity against its address (the
    guess lockout), pause ``failure_delay``, and raise error 16."""
    ip = normalize_ip(chan.peer[0])
    node.stats.login_failures += 1
    prefix = node.registry.lookup(android_id, seen=False) or "-"
    node.refuse("device identity not proven", f"{prefix} from {_where(chan)}: {reason}", ip)
    node.guard.failure(ip, guess=False)
    await asyncio.sleep(node.settings.failure_delay)
    raise ProtocolError(ErrorCode.IDENTITY, f"device identity not proven: {reason}")


async def handle_tls_device(node: Node, sock: socket.socket, address: tuple) -> bool:
    """One connection on the TLS device port (``[tls] device_port``): TLS ends in the
    relay (:meth:`~swiftftp.relay.Backend.wrap_tls`), and the plaintext is a device
    connection like any other (:func:`handle_device`). Always True: ``sock`` belongs to
    the relay now, and the plaintext end is closed here or by its command session."""
    plain = wrap_device_tls(node, sock, address)
    kept = False
    try:
        kept = await handle_device(node, plain, address, tls=True)
    finally:
        if not kept:
            await close_gracefully(plain)
    return True


def wrap_device_tls(node: Node, sock: socket.socket, address: tuple | None = None) -> socket.socket:
    """End a device's TLS in the relay (the node's ``[tls]`` certificate); the plaintext
    socket. The TLS session is watched by a task of the node's until it ends."""
    assert node.device_tls is not None
    if address is None:
        address = sock.getpeername()
    peer = f"{bracketed(normalize_ip(address[0]))}:{address[1]}"
    plain, relay = node.backend.wrap_tls(sock, node.device_tls,
                                         handshake_timeout=node.settings.device_login_timeout)
    node.spawn(_tls_ended(relay, peer), f"tls-{logs.session_id.get()}")
    return plain


async def _tls_ended(relay: Awaitable[object], peer: str) -> None:
    """Wait for a device's TLS session to end; a failed handshake is logged here."""
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await relay
        except (OSError, TimeoutError) as exc:
            log.info("device %s: TLS: %s", peer, exc or type(exc).__name__)


async def handle_device(node: Node, sock: socket.socket, address: tuple, *, tls: bool = False) -> bool:
    """One connection on the device port, from login to close; True if the socket was
    kept (a command session now owns it), else the caller closes it. ``tls``: it came
    through the TLS device port (``sock`` carries the plaintext)."""
    s = node.settings
    chan = DeviceChannel(sock, send_timeout=s.send_timeout, grace=s.device_grace, peer=address[:2])
    ip = normalize_ip(address[0])
    peer = f"{bracketed(ip)}:{address[1]}"
    try:
        admission = node.guard.admit_login(ip, node.table.addresses)
        if isinstance(admission, str):
            node.refuse(admission, peer, ip)
            text = "this node is busy" if "node" in admission else "too many connections from this address"
            raise ProtocolError(ErrorCode.INTERNAL, text)
        try:
            async with asyncio.timeout(s.device_login_timeout):
                who = await login(node, chan)
                request = await chan.recv()
                action = action_of(request)
        finally:
            admission.release()
        device = node.device(who.android_id, who.prefix)
        try:
            if action == "start_command_session":
                start_command_session(node, device, chan, peer, who, ip, tls=tls)
                return True
            if action in ("data_pasv_listen", "data_port_connect"):
                await node.prepare_transfer(device)
                if node.quota.over(device):
                    node.stats.quota_refusals += 1
                    node.refuse("over quota", device.prefix, ip)
                    raise ProtocolError(ErrorCode.OVER_QUOTA, "the device is over its quota")
                with node.connection(device, "data"):
                    if action == "data_pasv_listen":
                        await passive_data(node, device, chan, peer)
                    else:
                        await active_data(node, device, chan, peer, request)
            else:
                raise ProtocolError(ErrorCode.MALFORMED, f"unexpected action {action!r}")
        except Busy as exc:
            node.refuse(str(exc), device.prefix, ip)
            raise ProtocolError(ErrorCode.INTERNAL, str(exc)) from None
        finally:
            node.table.forget_if_idle(device)
    except ProtocolError as exc:
        log.info("device %s: %s", peer, exc)
        if chan.sock is not None:
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await chan.send(error(exc.code, exc.text))
    except (PeerClosed, TimeoutError, OSError) as exc:
        log.info("device %s: %s", peer, exc or type(exc).__name__)
    # the caller closes the socket, gracefully (an error reply must not be lost to a RST),
    # unless it was handed over to a relay: then it is already detached
    return False


def start_command_session(
    node: Node, device: Device, chan: DeviceChannel, peer: str, who: Login, ip: str, *, tls: bool = False
) -> None:
    """Hand the connection over to a :class:`CommandSession` (no task of its own). A
    device that proved a key gets a token for its session's other connections."""
    if node.draining:
        raise Busy("this node is shutting down")
    if device.command is None and node.table.online >= node.guard.capacity.command_sessions:
        raise Busy("too many devices on this node")
    sock, early = chan.detach()
    token = new_token() if who.key is not None else None
    CommandSession(node, device, sock, peer, paced=not who.stream, early=early, ip=ip,
                   key=who.key, token=token, tls=tls).start()


async def passive_data(node: Node, device: Device, chan: DeviceChannel, peer: str) -> None:
    """``data_pasv_listen``: a port for the client, then ``data_pasv_accept``."""
    if not device.control_peers:
        raise ProtocolError(ErrorCode.PASV_TIMEOUT, "no control connection of this device here")
    with node.listener(node.guard.group(normalize_ip(chan.peer[0]))) as listener:
        await _passive(node, device, chan, peer, listener)


async def _passive(
    node: Node, device: Device, chan: DeviceChannel, peer: str, listener: socket.socket
) -> None:
    s = node.settings
    port = listener.getsockname()[1]

    async def from_control_peer(sock: socket.socket) -> bool | None:
        address = sock.getpeername()[0]
        if device.allows(address):
            return True
        node.refuse("stranger on a passive port", f"{address} on port {port} of {device.prefix}",
                    normalize_ip(address))
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
        asked = time.monotonic()
        try:
            async with asyncio.timeout(s.pasv_accept_timeout):
                client, _ = await accept
        except TimeoutError:
            reason = f"no client connected within {s.pasv_accept_timeout:g} s"
            failed_transfer(device, "-", reason, asked)
            raise ProtocolError(ErrorCode.PASV_TIMEOUT, "no client connected") from None
        ftps = node.tls.for_passive(port) if node.tls is not None else None
        await relay_data(node, device, chan, client, peer, ftps)
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
    node: Node, device: Device, chan: DeviceChannel, peer: str, request: dict
) -> None:
    """``data_port_connect``: dial the client, only where RFC 2577 allows."""
    asked = time.monotonic()
    address = field(request, "address", str)
    port = field(request, "port", int)
    try:
        target = normalize_ip(address)
    except ValueError:
        failed_transfer(device, "-", f"not an IP address: {address!r}", asked)
        raise ProtocolError(ErrorCode.CONNECT_FAILED, f"not an IP address: {address!r}") from None
    where = f"{bracketed(target)}:{port}"
    if not device.allows(target) or not 1024 <= port <= 65535:
        node.refuse("bounce attempt", f"{device.prefix} asked for {where}", device.prefix)
        failed_transfer(device, where, "refused: not the client's address or port", asked, warn=False)
        raise ProtocolError(ErrorCode.CONNECT_FAILED, "refused: not the client's address or port")
    try:
        client = await dial(target, port, node.settings.connect_timeout)
    except (OSError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        failed_transfer(device, where, f"connect failed: {reason}", asked)
        raise ProtocolError(ErrorCode.CONNECT_FAILED, f"connect failed: {reason}") from None
    ftps = node.tls.for_active(target, port) if node.tls is not None else None
    try:
        await relay_data(node, device, chan, client, peer, ftps)
    finally:
        client.close()


def failed_transfer(device: Device, client: str, reason: str, since: float, *, warn: bool = True) -> None:
    """A data connection the device asked for that never carried a byte (the node could
    not reach the client, or no client came): a WARNING with the reason, and an
    ``outcome=failed`` line in the transfer log."""
    if warn:
        to = f" to {client}" if client != "-" else ""
        log.warning("data connection of %s%s failed: %s", device.prefix, to, reason)
    duration = time.monotonic() - since
    logs.log_transfer(
        session=logs.session_id.get(), prefix=device.prefix, client=client, direction="none",
        bytes=0, up=0, down=0, duration=f"{duration:.3f}", rate=0, outcome="failed", reason=reason,
    )


async def relay_data(
    node: Node, device: Device, chan: DeviceChannel, client: socket.socket, peer: str,
    ftps: Ftps | None = None,
) -> None:
    """Answer ``{}``, let the device read it on its own, then relay raw bytes; TLS on
    the client's leg when its control connection (``ftps``) said ``PROT P``."""
    await chan.send({})
    await chan.settle()  # the client's first bytes must not share the device's read with "{}"
    device_sock, early = chan.detach()
    tls = node.tls.data_options(ftps) if node.tls is not None else {}
    if early and tls:
        # Bytes a device sent before it read "{}" would reach a TLS client in clear;
        # no device does that (they wait for the answer to their request).
        device_sock.close()
        raise ProtocolError(ErrorCode.MALFORMED, "data before the answer to data_pasv_accept")
    try:
        if early:
            await aio.sendall(client, early, timeout=node.settings.send_timeout)
    except (OSError, TimeoutError):
        device_sock.close()
        raise
    client_ip, client_port = client.getpeername()[:2]
    client_ip = normalize_ip(client_ip)
    with node.session("data", device, f"{client_ip}:{client_port}", client_ip) as info:
        info.buckets = node.throttle.session_buckets()
        up, down = node.throttle.chains(device, info.buckets)
        handle = node.backend.start(
            client, device_sock, up=up, down=down, idle_timeout=node.settings.idle_timeout, **tls
        )
        info.counters = handle.counters
        try:
            await handle
        except PermissionError:  # the client did not resume its control connection's session
            node.refuse("TLS data connection not resuming its control session",
                        f"{client_ip} for {device.prefix}", client_ip)
            raise
        finally:
            if tls and (facts := handle.tls_info()):
                log.info("data session id=%s TLS %s %s %s, resumed %s", info.id, facts.get("path"),
                         facts.get("version"), facts.get("cipher"), facts.get("resumed"))
