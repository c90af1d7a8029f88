"""Settings of a proxy node: every port, timeout and limit in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_state_dir() -> Path:
    """Per-user state directory: ``$XDG_STATE_HOME/swiftftp`` (``~/.local/state/swiftftp``)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "swiftftp"


@dataclass
class Settings:
    """Everything a node needs to run; defaults are the original deployment's."""

    listen: str = "0.0.0.0"
    ftp_port: int = 2121
    device_port: int = 2222
    #: Address put into 227 replies; default: the local address of the client's control socket.
    public_address: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    #: Ports for rendezvous and passive listeners, inclusive; (0, 0) = any free port.
    data_ports: tuple[int, int] = (40000, 44999)
    relay_backend: str | None = None

    # Timeouts, seconds (PROTOCOL.md: 2 min client login, 10 s device login, 30 min silence).
    client_login_timeout: float = 120.0
    device_login_timeout: float = 10.0
    idle_timeout: float = 1800.0
    keepalive_interval: float = 50.0
    rendezvous_timeout: float = 10.0
    pasv_accept_timeout: float = 10.0
    #: How long a passive listener waits for a client and for data_pasv_accept at all.
    pasv_listen_timeout: float = 120.0
    connect_timeout: float = 10.0
    #: Pause after a device's TCP acknowledged a message before raw bytes may follow.
    device_grace: float = 0.03

    max_login_failures: int = 3
    #: Client bytes buffered while the device is being fetched.
    max_early_bytes: int = 65536

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"
