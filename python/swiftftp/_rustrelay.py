"""The Rust relay backend: ``swiftftp._splice`` behind the relay interface.

Bytes move on the extension's worker threads (splice(2) through pipes, epoll,
no GIL); this module only connects a finished session to asyncio. Each event
loop gets one :class:`_Waiter`: an eventfd the workers bump after storing a
session's outcome, watched with ``loop.add_reader``. Draining it resolves the
matching futures on the loop's own thread, so workers never take the GIL and
the loop never blocks. Importing this module raises ImportError when the
extension is not built (``relay.available()`` relies on it).

TLS (FTPS) is terminated here too, on the same workers: ``start(...,
tls=config)`` for data connections (side ``a`` is the TLS client) and
``wrap_tls`` for control connections (the plaintext comes out of a socket
pair, so the control-connection code keeps reading lines from a socket).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import weakref
from collections.abc import Generator, Sequence
from typing import Any

from . import _splice
from .relay import RelayResult

Bucket = _splice.Bucket
TlsConfig = _splice.TlsConfig


class RustRelay:
    """One relay running on a worker thread, awaitable from its event loop."""

    def __init__(self, session: _splice.Session, loop: asyncio.AbstractEventLoop) -> None:
        self._session = session
        self._future: asyncio.Future[RelayResult] = loop.create_future()
        self._future.add_done_callback(self._on_done)

    def __await__(self) -> Generator[Any, None, RelayResult]:
        return self._future.__await__()

    def cancel(self) -> None:
        """Close both sockets; awaiting raises ``asyncio.CancelledError``."""
        if self._future.cancel():
            self._session.cancel()

    def done(self) -> bool:
        return self._future.done()

    def counters(self) -> tuple[int, int]:
        """Bytes delivered so far, (up, down); live, and valid after the end."""
        return self._session.counters()

    @property
    def tls_path(self) -> str | None:
        """``"rustls"`` (TLS in user space), ``"ktls"`` (kernel TLS, then splice),
        ``"handshake"`` while the handshake runs; None for a plain relay."""
        return self._session.tls_path

    def tls_info(self) -> dict[str, Any] | None:
        """TLS facts (path, version, cipher, resumed, resumed_tag, sni, note); None if plain."""
        return self._session.tls_info()

    def _on_done(self, future: asyncio.Future[RelayResult]) -> None:
        # The awaiting task was cancelled (which cancels this future): stop the relay.
        if future.cancelled():
            self._session.cancel()

    def _settle(self) -> None:
        """The worker finished the session: resolve the future from its outcome."""
        if self._future.done():
            return
        # An exception object that was never raised: no traceback holding our frames.
        exc = self._session.exception()
        if exc is not None:
            self._future.set_exception(exc)
            return
        result = self._session.result()
        if result is None:
            self._future.cancel()
        else:
            self._future.set_result(RelayResult(*result))

    def __repr__(self) -> str:
        up, down = self.counters()
        state = "done" if self.done() else "running"
        return f"<RustRelay #{self._session.id} {state} up={up} down={down}>"


class _Waiter:
    """Completion notices of one event loop (see the module docs).

    Lives while the loop has relays running: the last notice closes it, so an
    idle loop (or a closed one) holds no eventfd.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.notifier = _splice.Notifier()
        self.fd = self.notifier.fileno()
        self.pending: dict[int, RustRelay] = {}
        # No reference to the loop here: the loop → waiter map is weak on the loop.
        loop.add_reader(self.fd, self._drain)

    def _drain(self) -> None:
        for sid in self.notifier.drain():
            relay = self.pending.pop(sid, None)
            if relay is not None:
                relay._settle()
        if not self.pending:
            loop = asyncio.get_running_loop()
            with _waiters_lock:
                if _waiters.get(loop) is self:
                    del _waiters[loop]
            self.close(loop)

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Stop watching and close the eventfd (not left to the garbage collector)."""
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.fd)
        self.notifier.close()


_waiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waiter] = weakref.WeakKeyDictionary()
# Loops in several threads (the proxy's and an agent's, in tests) share the map.
_waiters_lock = threading.Lock()


def _waiter(loop: asyncio.AbstractEventLoop) -> _Waiter:
    with _waiters_lock:
        waiter = _waiters.get(loop)
        if waiter is None:
            # Forget loops closed with relays still running.
            for old in [old for old in _waiters if old.is_closed()]:
                _waiters.pop(old).close(None)
            waiter = _waiters[loop] = _Waiter(loop)
        return waiter


class RustBackend:
    """The Rust backend (see :mod:`swiftftp.relay` for the interface).

    ``workers`` and ``pipe_size`` configure the process-wide engine when it
    starts (defaults: ``SWIFTFTP_RELAY_WORKERS`` or one per CPU, and
    ``SWIFTFTP_RELAY_PIPE_SIZE`` or 256 KiB); the engine starts on first use.
    """

    name = "rust"

    def __init__(self, workers: int | None = None, pipe_size: int | None = None) -> None:
        # Start the worker threads now, not on the first relay: a process's
        # resources (threads, epoll fds) are then constant from here on.
        self.workers, self.pipe_size = _splice.init(workers, pipe_size)

    def bucket(self, rate: float = 0, burst: float | None = None) -> _splice.Bucket:
        return _splice.Bucket(rate, burst)

    def start(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        up: Sequence[Any] = (),
        down: Sequence[Any] = (),
        idle_timeout: float | None = None,
        tls: _splice.TlsConfig | None = None,
        tls_tag: bytes | None = None,
        require_tag: bytes | None = None,
        handshake_timeout: float = 10.0,
    ) -> RustRelay:
        """Relay ``a`` ↔ ``b``. With ``tls``, ``a`` is an FTPS client's data
        connection: TLS ends here (see :mod:`swiftftp.relay`)."""
        loop = asyncio.get_running_loop()
        up, down = list(up), list(down)
        for bucket in (*up, *down):
            if not isinstance(bucket, _splice.Bucket):
                raise TypeError(f"not a rust relay bucket: {bucket!r} (use backend.bucket())")
        if tls is not None and not isinstance(tls, _splice.TlsConfig):
            raise TypeError(f"not a TLS configuration: {tls!r} (use backend.tls_config())")
        waiter = _waiter(loop)
        # From here on the fds belong to the extension, which closes them.
        session = _splice.start(
            a.detach(),
            b.detach(),
            waiter.notifier,
            up,
            down,
            idle_timeout=idle_timeout,
            tls=tls,
            tls_tag=tls_tag,
            require_tag=require_tag,
            handshake_timeout=handshake_timeout,
        )
        return self._track(session, loop, waiter)

    def tls_config(self, cert_pem: bytes, key_pem: bytes) -> _splice.TlsConfig:
        """The node's certificate chain and key (PEM); ValueError with one line
        if they are unusable. ``reload()`` swaps them (SIGHUP)."""
        return _splice.TlsConfig(cert_pem, key_pem)

    def wrap_tls(
        self,
        sock: socket.socket,
        config: _splice.TlsConfig,
        tag: bytes | None = None,
        initial: bytes = b"",
        idle_timeout: float | None = None,
        *,
        handshake_timeout: float = 10.0,
    ) -> tuple[socket.socket, RustRelay]:
        """Terminate TLS on a control connection (``AUTH TLS``, or implicit FTPS).

        ``sock`` passes to the relay; the returned socket carries its
        plaintext (same blocking mode as ``sock``) and belongs to the caller.
        ``initial``: bytes already read from ``sock`` that belong to the TLS
        stream (a ClientHello pipelined behind ``AUTH TLS``). ``tag`` marks
        the TLS session so that data connections can be required to resume
        it (``start(..., require_tag=tag)``). Closing the returned socket
        sends close_notify and closes the connection; the client's
        close_notify or EOF is EOF on it.
        """
        if not isinstance(config, _splice.TlsConfig):
            raise TypeError(f"not a TLS configuration: {config!r} (use backend.tls_config())")
        loop = asyncio.get_running_loop()
        blocking = sock.getblocking()
        waiter = _waiter(loop)
        fd, session = _splice.wrap_tls(
            sock.detach(),
            waiter.notifier,
            config,
            tag=tag,
            initial=bytes(initial),
            idle_timeout=idle_timeout,
            handshake_timeout=handshake_timeout,
        )
        plain = socket.socket(fileno=fd)
        plain.setblocking(blocking)
        return plain, self._track(session, loop, waiter)

    @staticmethod
    def _track(session: _splice.Session, loop: asyncio.AbstractEventLoop, waiter: _Waiter) -> RustRelay:
        relay = RustRelay(session, loop)
        waiter.pending[session.id] = relay
        return relay

    @staticmethod
    def ktls_available() -> bool:
        """True when TLS sessions hand their records to kernel TLS (then splice)."""
        return _splice.ktls_available()

    @staticmethod
    def tls_status() -> str:
        """One line for the start-up log: crypto provider and kernel TLS or not, and why."""
        return f"TLS {_splice.tls_provider()}; {_splice.ktls_status()}"

    def totals(self) -> tuple[int, int]:
        return _splice.totals()

    def running(self) -> int:
        """Sessions on the worker threads now, over every loop."""
        return _splice.running()
