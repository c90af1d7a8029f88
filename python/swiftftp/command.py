"""A device's command session: its presence on the node, held without a task.

Once a device has logged in and sent ``start_command_session``, the connection
stays open for as long as the device runs, and is idle almost all that time.
So it is driven by callbacks (a loop reader, a :class:`~swiftftp.timers.Wheel`
slot for the keepalive, a loop timer only while the :class:`~swiftftp.outbox.Outbox`
holds something back), not by a task per device.

Every wait is bounded:

* a message the device's TCP does not acknowledge within ``timeouts.send``
  seconds, or a keepalive ``noop`` still unacknowledged at the next one, closes
  the session (the device is gone; it reconnects when it comes back);
* ``rendezvous.MAX_FAILURES`` rendezvous in a row that the device was told of and
  did not take close it too: a device whose TCP still answers but which no
  longer does its part should reconnect rather than keep its users waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Any

from .channel import unacknowledged
from .errors import ErrorCode, ProtocolError
from .net import bracketed, close_gracefully
from .outbox import Outbox
from .protocol import JsonStreamDecoder, action_of, encode, error
from .rendezvous import MAX_FAILURES, Rendezvous

if TYPE_CHECKING:
    from .state import Device, Node, Session

log = logging.getLogger("swiftftp.devices")

#: Reported as the quota of a device that has none: the largest integer every JSON reader keeps.
UNLIMITED_QUOTA = 2**53 - 1

#: How often a device on the TLS device port (swiftftp-agent) sends ``noop`` at least;
#: its command session is closed after three times that (or three keepalives) of silence.
DEVICE_NOOP_INTERVAL = 45.0

_REPLY_OK = encode({})
_NOOP = encode({"action": "noop"})


class CommandSession:
    """One device's command session (see the module docs)."""

    __slots__ = (
        "node", "device", "sock", "peer", "ip", "group", "info", "outbox", "bytes_in", "bytes_out",
        "last_recv", "last_send", "_decoder", "_loop", "_timer", "_wbuf", "_closed", "_closing",
        "key", "token", "tls",
    )

    def __init__(
        self, node: Node, device: Device, sock: socket.socket, peer: str, *, paced: bool, early: bytes = b"",
        ip: str, key: str | None = None, token: str | None = None, tls: bool = False,
    ) -> None:
        self.node = node
        #: The key the device proved at login (None: a device without a key).
        self.key = key
        #: What the session's rendezvous and data connections show instead of a
        #: signature (docs/protocol.md, "Device proof of identity"); None without a key.
        self.token = token
        #: The device came through the TLS device port: its rendezvous are TLS too.
        self.tls = tls
        self.device = device
        self.sock = sock
        self.peer = peer
        #: The device's address: only it may take a rendezvous port.
        self.ip = ip
        self.group = node.guard.group(self.ip)
        self.outbox = Outbox(paced, node.settings.device_grace)
        self._decoder = JsonStreamDecoder()
        self._decoder.feed(early)
        self._loop = asyncio.get_running_loop()
        self.bytes_in = len(early)
        self.bytes_out = 0
        self.last_recv = self.last_send = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._wbuf = b""
        self._closed = False
        self._closing = ""  # the reason of a graceful close waiting for the outbox
        self.info: Session | None = None

    # ---- what the node asks of it ------------------------------------------------------

    def start(self) -> None:
        """Become the device's command session: answer ``{"prefix"}`` and listen."""
        node, device = self.node, self.device
        old = node.table.set_command(device, self)
        if old is not None:
            log.info("command session of %s replaced by a new login from %s",
                     device.prefix, bracketed(self.ip))
            # told first (an agent says so; two of them sharing an id would evict each other)
            old.notify({"action": "message", "reason": "replaced",
                        "text": f"this device id logged in again from {bracketed(self.ip)}; "
                                "this session is replaced"})
            old.close("replaced by a new login", graceful=True)
        self.info = node.open_session("command", device, self.peer)
        self.info.counters = lambda: (self.bytes_in, self.bytes_out)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        reply: dict[str, Any] = {"prefix": device.prefix}
        if self.token is not None:
            reply["token"] = self.token
        self.outbox.reply(encode(reply))
        self._pump()
        node.keepalives.add(self, self.last_recv + node.settings.keepalive_interval)
        if self.bytes_in:
            self._serve_buffered()

    def notify(self, message: dict[str, Any]) -> None:
        """Send the device an unsolicited message, when the pacing rules allow."""
        if not self._closed:
            self.outbox.notify(encode(message))
            self._pump()

    def rendezvous(self, port: int) -> Rendezvous:
        """Ask the device to connect to ``port`` (``control_connection_waiting``)."""
        rendezvous = Rendezvous(port, self.group)
        if self._closed:
            rendezvous.over("abandoned", 0)
        else:
            message = encode({"action": "control_connection_waiting", "port": port})
            self.outbox.notify(message, rendezvous)
            self._pump()
        return rendezvous

    def rendezvous_over(self, rendezvous: Rendezvous, outcome: str) -> None:
        """The device logged in on the port (``taken``), or the rendezvous ended
        without it (``timeout``, ``abandoned``): see :class:`Rendezvous`."""
        if rendezvous.done:
            return
        device = self.device
        device.rendezvous_failures = rendezvous.over(outcome, device.rendezvous_failures)
        self.outbox.release(rendezvous)
        if device.rendezvous_failures >= MAX_FAILURES:
            device.rendezvous_failures = 0
            self.close(f"the device did not take {MAX_FAILURES} clients in a row")
            return
        self._pump()

    def close(self, reason: str, outcome: str = "ok", *, graceful: bool = False) -> None:
        """End the session; with ``graceful``, what is queued is written first."""
        if self._closed:
            return
        if graceful and (len(self.outbox) or self._wbuf):
            self._closing = reason  # _pump closes once written (bounded by timeouts.send)
            self._pump()
            return
        self._closed = True
        node, device = self.node, self.device
        self._loop.remove_reader(self.sock.fileno())
        if self._wbuf:
            self._loop.remove_writer(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        node.keepalives.remove(self)
        if device.command is self:
            node.table.set_command(device, None)
        if self.info is not None:
            log.debug("command session of %s closed: %s", device.prefix, reason)  # INFO: session close
            node.close_session(self.info, outcome)
        node.table.forget_if_idle(device)
        if graceful:
            node.spawn(close_gracefully(self.sock), f"close-{device.prefix}")
        else:
            self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- the keepalive (called by the node's wheel) ----------------------------------------

    def tick(self, now: float) -> float | None:
        """A ``noop`` after ``keepalive`` seconds of silence either way; a device that has
        not acknowledged the previous one meanwhile is gone."""
        if self._closed:
            return None
        interval = self.node.settings.keepalive_interval
        silence = 3 * max(interval, DEVICE_NOOP_INTERVAL)
        if self.tls and now - self.last_recv > silence:
            # Over TLS the socket's peer is the relay, whose acknowledgements say nothing
            # of the device's: a device there (the agent) must be heard from instead.
            self.close(f"nothing from the device for {silence:g} s", "timeout")
            return None
        quiet_since = max(self.last_recv, self.last_send)
        if now - quiet_since < interval:
            return quiet_since + interval
        try:
            unacked = unacknowledged(self.sock)
        except OSError:
            unacked = 1
        if unacked:
            self.close(f"no acknowledgement from the device for {interval:g} s", "timeout")
            return None
        if not len(self.outbox):
            self.outbox.notify(_NOOP)
            self._pump()
        return now + interval

    # ---- reading ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            self._read()
        except Exception:  # a bug must not leave a reader registered on a broken session
            log.exception("command session of %s failed", self.device.prefix)
            self.close("internal error", "error")

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc}", type(exc).__name__)
            return
        if not data:
            self.close("device closed the connection")
            return
        self.bytes_in += len(data)
        self.last_recv = self._loop.time()
        self._decoder.feed(data)
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        try:
            while not self._closed and (message := self._decoder.pop()) is not None:
                self._serve(message)
        except ProtocolError as exc:  # the stream cannot be resynchronised: answer, then close
            log.info("command session of %s: %s", self.device.prefix, exc)
            self.outbox.reply(encode(error(exc.code, exc.text)))
            self.close(str(exc), "ProtocolError", graceful=True)

    def _serve(self, request: dict[str, Any]) -> None:
        """Answer one device request."""
        try:
            action = action_of(request)
        except ProtocolError as exc:
            self.outbox.reply(encode(error(exc.code, exc.text)))
            self._pump()
            return
        if action == "noop":
            self.outbox.reply(_REPLY_OK)
        elif action == "check_quota":
            quota = self.node.quota
            limit = quota.limit(self.device) or UNLIMITED_QUOTA
            self.outbox.reply(encode({"quota": limit, "used": quota.used(self.device)}))
        elif action == "finished":
            self.outbox.reply(_REPLY_OK)
            self.close("the device logged out", graceful=True)
            return
        else:
            self.outbox.reply(encode(error(ErrorCode.MALFORMED, f"unknown action {action!r}")))
        self._pump()

    # ---- writing ----------------------------------------------------------------------

    def _unacked(self) -> int:
        try:
            return unacknowledged(self.sock)
        except OSError:
            return 0

    def _pump(self) -> None:
        """Write what the outbox allows now; come back when it says."""
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._loop.time()
        since = self.outbox.blocked_since()
        limit = self.node.settings.send_timeout
        if since is not None and now - since > limit and self._unacked():
            self.close(f"no acknowledgement from the device for {limit:g} s", "timeout")
            return
        if not self._wbuf:
            items, wake = self.outbox.writable(now, self._unacked)
            if items:
                self._write(b"".join(data for data, _ in items))
        else:
            wake = now + 0.1  # see _on_writable
        if self._closed:
            return
        if self._closing and not len(self.outbox) and not self._wbuf:
            reason, self._closing = self._closing, ""
            self.close(reason, graceful=True)
            return
        if wake is not None:
            self._timer = self._loop.call_at(wake, self._pump)

    def _write(self, data: bytes) -> None:
        self.last_send = self._loop.time()
        self.bytes_out += len(data)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close(f"write failed: {exc}", type(exc).__name__)
            return
        if sent < len(data):  # the device stopped reading: hold the rest until it does
            self._wbuf = data[sent:]
            self._loop.add_writer(self.sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"write failed: {exc}", type(exc).__name__)
            return
        self._wbuf = self._wbuf[sent:]
        if not self._wbuf:
            self._loop.remove_writer(self.sock.fileno())
            self._pump()


def close_all(sessions: list[CommandSession], reason: str) -> None:
    """Close these sessions at once (the node stops)."""
    for session in sessions:
        with contextlib.suppress(OSError):
            session.close(reason, "cancelled")
