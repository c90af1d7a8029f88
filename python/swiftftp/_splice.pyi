"""The Rust data plane (rust/src): splice(2)/epoll relay workers, token buckets.

Used through :mod:`swiftftp._rustrelay`; see :mod:`swiftftp.relay` for the
interface and its semantics.
"""

from collections.abc import Iterable

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
) -> Session:
    """Relay between the connected sockets with fds ``a`` and ``b``.

    Ownership of both fds passes to the extension at once (even if this
    raises); ``a → b`` is up. ``notifier`` is told the session id when it ends.
    """

def init(workers: int | None = None, pipe_size: int | None = None) -> tuple[int, int]:
    """Start the worker threads now; returns (workers, pipe_size) in use."""

def totals() -> tuple[int, int]:
    """Bytes moved by every session of this process, (up, down)."""

def running() -> int:
    """Sessions running now on the worker threads."""

def default_burst(rate: float) -> float:
    """50 ms worth of ``rate``, at least 16 KiB (as ``relay.default_burst``)."""

def version() -> str: ...
