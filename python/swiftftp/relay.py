"""The data plane: one interface, two backends.

A relay moves bytes between two connected sockets until both directions have
ended, preserving half-close (EOF on one side becomes ``shutdown(SHUT_WR)`` on
the other once everything before it is delivered).  Ownership of the sockets
passes to the relay; it closes them when it finishes.

    backend = relay.get_backend()           # "rust" when the extension imports
    bucket = backend.bucket(rate=1_000_000, burst=64_000)
    handle = backend.start(client, device, up=[bucket], down=[], idle_timeout=1800)
    up, down = handle.counters()            # live, at any time
    bucket.set_rate(2_000_000)              # takes effect at once
    result = await handle                   # RelayResult(up=..., down=...)

``a → b`` is *up* and ``b → a`` is *down*.  Each direction passes through a
chain of token buckets (session, device, node); a bucket with rate 0 is
unlimited.  Awaiting raises ``OSError`` (``TimeoutError`` after
``idle_timeout`` seconds without a byte either way, ``ConnectionResetError``…)
when the relay ends abnormally; ``cancel()`` closes both sockets and makes the
await raise ``asyncio.CancelledError``.  Cancelling the task that awaits the
handle cancels the relay.  ``counters()`` stays valid after the end.

FTPS (Rust backend only; the Python backend raises ``NotImplementedError``
for any of this).  TLS is terminated at the node with the operator's
certificate; the device side stays plain:

    config = backend.tls_config(cert_pem, key_pem)   # ValueError: one line why
    config.reload(cert_pem, key_pem)                 # SIGHUP; running sessions keep theirs
    plain, ctl = backend.wrap_tls(sock, config, tag=b"ctl12", initial=pending)
    # ... the control dialogue goes on over `plain`, a socket of plaintext ...
    handle = backend.start(client_data, device_data, tls=config,
                           require_tag=b"ctl12")     # PROT P data connection
    handle.tls_path                                  # "rustls" or "ktls"

A data connection started with ``require_tag`` must resume the TLS session
of the control connection wrapped with that ``tag`` (what vsftpd's
``require_ssl_reuse`` asks of clients), else it fails with
``PermissionError("TLS session not resumed from the control connection")``.
Handshake failures raise ``OSError`` (errno ``EPROTO``) with rustls's reason,
a handshake not done within ``handshake_timeout`` (10 s) ``TimeoutError``.
Counters and buckets count plaintext. Where the kernel has TLS (the ``tls``
ULP), sessions hand their keys to it after the handshake and splice as plain
relays do; ``RustBackend.tls_status()`` says which, for the start-up log.

``SWIFTFTP_RELAY=python`` forces the pure-Python backend; otherwise the Rust
extension is used when it imports.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Generator, Sequence
from typing import Any, NamedTuple, Protocol


class RelayResult(NamedTuple):
    """Final byte counts of a relay that ended with both directions closed."""

    up: int
    down: int


class Bucket(Protocol):
    """A token bucket; ``rate`` in bytes/s (0 = unlimited), ``burst`` in bytes."""

    @property
    def rate(self) -> float: ...

    @property
    def burst(self) -> float: ...

    def set_rate(self, rate: float, burst: float | None = None) -> None: ...


class Relay(Protocol):
    """A running relay: awaitable, cancellable, observable."""

    def __await__(self) -> Generator[Any, None, RelayResult]: ...

    def cancel(self) -> None: ...

    def done(self) -> bool: ...

    def counters(self) -> tuple[int, int]: ...


class Backend(Protocol):
    """What both relay backends provide."""

    name: str

    def bucket(self, rate: float = 0, burst: float | None = None) -> Bucket: ...

    def start(
        self,
        a: socket.socket,
        b: socket.socket,
        *,
        up: Sequence[Bucket] = (),
        down: Sequence[Bucket] = (),
        idle_timeout: float | None = None,
        tls: Any = None,
        tls_tag: bytes | None = None,
        require_tag: bytes | None = None,
        handshake_timeout: float = 10.0,
    ) -> Relay: ...

    def tls_config(self, cert_pem: bytes, key_pem: bytes) -> Any: ...

    def wrap_tls(
        self,
        sock: socket.socket,
        config: Any,
        tag: bytes | None = None,
        initial: bytes = b"",
        idle_timeout: float | None = None,
        *,
        handshake_timeout: float = 10.0,
    ) -> tuple[socket.socket, Relay]: ...

    def totals(self) -> tuple[int, int]: ...


def default_burst(rate: float) -> float:
    """Burst used when none is given: 50 ms worth of rate, at least 16 KiB."""
    return max(rate * 0.05, 16384.0)


_backends: dict[str, Backend] = {}


def available() -> list[str]:
    """Names of the backends that can run here."""
    names = ["python"]
    try:
        from . import _rustrelay  # noqa: F401
    except ImportError:
        return names
    return ["rust", *names]


def backend() -> str:
    """Name of the backend used by default: ``rust`` or ``python``."""
    wanted = os.environ.get("SWIFTFTP_RELAY", "").strip().lower()
    if wanted == "python":
        return "python"
    if wanted == "rust":
        return "rust"
    return available()[0]


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name`` (default: :func:`backend`)."""
    name = name or backend()
    if name not in _backends:
        if name == "python":
            from ._pyrelay import PythonBackend

            _backends[name] = PythonBackend()
        elif name == "rust":
            from ._rustrelay import RustBackend

            _backends[name] = RustBackend()
        else:
            raise ValueError(f"unknown relay backend {name!r} (rust, python)")
    return _backends[name]
