"""systemd's readiness protocol (sd_notify(3)), by hand: one datagram of
``KEY=VALUE`` lines to the socket named by ``$NOTIFY_SOCKET``.

``Type=notify`` units learn that the node listens (``READY=1``), reloads
(``RELOADING=1`` with ``MONOTONIC_USEC``, then ``READY=1``) and stops
(``STOPPING=1``), and show ``STATUS=`` in ``systemctl status``.  Outside systemd
(no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def _address(name: str) -> str | bytes | None:
    """The socket address in ``$NOTIFY_SOCKET``: a path, or ``@name`` for the abstract
    namespace (a leading NUL byte)."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other kinds: not used by the node's units


def notify(*lines: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``lines`` (``READY=1``, ``STATUS=…``) as one message; True if it was sent.
    Failures are swallowed: telling systemd is never worth stopping the node for."""
    name = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    address = _address(name) if name else None
    if address is None or not lines:
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, for ``MONOTONIC_USEC=`` with ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def ready(status: str) -> bool:
    """The node serves: ``READY=1`` and a status line."""
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    """A reload starts (SIGHUP); :func:`ready` ends it."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the configuration")


def stopping(status: str) -> bool:
    """The node winds down (drain, or stop)."""
    return notify("STOPPING=1", f"STATUS={status}")


def status(text: str) -> bool:
    """Just a new status line."""
    return notify(f"STATUS={text}")
