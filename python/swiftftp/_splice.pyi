"""The Rust data plane (rust/src): splice(2)/epoll relay workers, token buckets,
and TLS termination for FTPS (rustls; kernel TLS where the kernel has it).

Used through :mod:`swiftftp._rustrelay`; see :mod:`swiftftp.relay` for the
interface and its semantics.
"""

from collections.abc import Iterable
from typing import Any

class TlsConfig:
    """The node's TLS server side: certificate chain (end-entity first) and
    private key, PEM; the crypto provider (``tls_provider()``); one session
    cache (bounded, 16384 entries) and one ticketer shared by every session
    using this object, so data connections can resume their control
    connection's session (TLS 1.2 session ids and tickets, TLS 1.3 tickets).

    Raises ValueError with one line: no certificate, bad PEM, no key, the key
    not matching the certificate, the certificate expired or not yet valid.
    The server picks AES-128-GCM first (faster than the AES-256 that OpenSSL
    clients list first).
    """

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes) -> None: ...
    def reload(self, cert_chain_pem: bytes, key_pem: bytes) -> None:
        """Swap the pair for new handshakes, atomically; running sessions keep
        theirs and the session cache and ticket keys stay. A bad pair raises
        ValueError and the old one stays."""
    @property
    def not_after(self) -> int:
        """End of validity, epoch seconds."""
    @property
    def not_before(self) -> int:
        """Start of validity, epoch seconds."""
    @property
    def names(self) -> list[str]:
        """subjectAltName DNS names."""

class Bucket:
    """A token bucket: ``rate`` bytes/s (0 = unlimited), ``burst`` bytes.

    May sit in the chains of many sessions at once; ``set_rate`` applies at
    once, also to sessions sleeping for tokens. ``burst`` None or 0 means
    ``default_burst(rate)``.
    """

    def __init__(self, rate: float = 0, burst: float | None = None) -> None: ...
    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> float: ...
    @property
    def tokens(self) -> float:
        """Tokens available now (negative while sessions wait for tokens)."""
    def set_rate(self, rate: float, burst: float | None = None) -> None: ...

class Notifier:
    """Completion notices for one event loop (an eventfd plus a queue of ids)."""

    def __init__(self) -> None: ...
    def fileno(self) -> int:
        """The eventfd to watch for reading; owned by the notifier."""
    def drain(self) -> list[int]:
        """Ids of the sessions finished since the last call."""
    def close(self) -> None:
        """Close the eventfd now; sessions still running will not notify."""

class Session:
    """A relay session running on a worker thread."""

    @property
    def id(self) -> int: ...
    def counters(self) -> tuple[int, int]:
        """Bytes delivered so far, (up, down)."""
    def cancel(self) -> None:
        """Close both sockets (asynchronously, on the worker)."""
    def done(self) -> bool:
        """True once the sockets are closed and the outcome stored."""
    @property
    def tls_path(self) -> str | None:
        """None for a plain session; for TLS: ``"handshake"`` until it is done,
        then ``"rustls"`` (records in user space) or ``"ktls"`` (kernel TLS,
        then splice like a plain session)."""
    def tls_info(self) -> dict[str, Any] | None:
        """None for a plain session; else ``path``, ``version`` ("TLSv1_3"),
        ``cipher``, ``resumed``, ``resumed_tag`` (bytes), ``sni``, ``note``
        (why kernel TLS was not used, where it is available)."""
    def exception(self) -> OSError | None:
        """The error it ended with, as an exception object never raised (no
        traceback); None if it did not fail or is still running."""
    def result(self) -> tuple[int, int] | None:
        """Final (up, down); None if cancelled; raises the OSError it ended
        with (``TimeoutError`` when idle); RuntimeError while running."""

def start(
    a: int,
    b: int,
    notifier: Notifier,
    up: Iterable[Bucket] | None = None,
    down: Iterable[Bucket] | None = None,
    idle_timeout: float | None = None,
    *,
    tls: TlsConfig | None = None,
    tls_tag: bytes | None = None,
    require_tag: bytes | None = None,
    handshake_timeout: float = 10.0,
) -> Session:
    """Relay between the connected sockets with fds ``a`` and ``b``.

    Ownership of both fds passes to the extension at once (even if this
    raises); ``a → b`` is up. ``notifier`` is told the session id when it ends.

    With ``tls``, ``a`` is a TLS client and we are the server: the handshake
    (failing with ``TimeoutError`` after ``handshake_timeout`` s, or OSError
    EPROTO with rustls's reason), then plaintext both ways with the same
    buckets, counters (plaintext bytes), idle timeout, cancel and notice as a
    plain session. Half-close: a's close_notify (or bare EOF) becomes
    ``shutdown(SHUT_WR)`` on b once all was delivered; b's EOF becomes
    close_notify then ``shutdown(SHUT_WR)`` on a. ``tls_tag`` (≤ 1024 bytes)
    is stored with the sessions this connection issues. ``require_tag``: the
    handshake must resume a session stored with that tag, else
    ``PermissionError("TLS session not resumed from the control connection")``.
    Where kernel TLS is available and takes the suite, the keys go to the
    kernel after the handshake and the session splices (``tls_path``).
    """

def wrap_tls(
    fd: int,
    notifier: Notifier,
    tls: TlsConfig,
    *,
    tag: bytes | None = None,
    initial: bytes | None = None,
    idle_timeout: float | None = None,
    handshake_timeout: float = 10.0,
) -> tuple[int, Session]:
    """Terminate TLS on the connected socket ``fd`` (a control connection).

    Ownership of ``fd`` passes to the extension at once. Returns the fd of
    one end of a new AF_UNIX socket pair (the caller owns it) that carries
    the plaintext, and the session relaying it (up = client → that socket).
    ``initial``: bytes already read from ``fd`` that belong to the TLS stream.
    ``tag``: stored with this connection's TLS sessions (see ``start``'s
    ``require_tag``). Closing the returned socket sends close_notify and
    shuts the connection; the client's close_notify or EOF is EOF on it.
    """

def ktls_available() -> bool:
    """True when TLS sessions can use kernel TLS (the ``tls`` ULP): detected
    once per process from /proc/sys/net/ipv4/tcp_available_ulp, or by loading
    the module with a throwaway ``TCP_ULP`` setsockopt. ``SWIFTFTP_KTLS=0``
    turns it off."""

def ktls_status() -> str:
    """One line for the log: kernel TLS used, or why not."""

def tls_provider() -> str:
    """The crypto provider built in: ``"aws-lc-rs"`` (default) or ``"ring"``."""

def init(workers: int | None = None, pipe_size: int | None = None) -> tuple[int, int]:
    """Start the worker threads now; returns (workers, pipe_size) in use."""

def totals() -> tuple[int, int]:
    """Bytes moved by every session of this process, (up, down)."""

def running() -> int:
    """Sessions running now on the worker threads."""

def default_burst(rate: float) -> float:
    """50 ms worth of ``rate``, at least 16 KiB (as ``relay.default_burst``)."""

def version() -> str: ...
