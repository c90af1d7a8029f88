"""FTPS at the node: the operator's certificate, and which control connection a
data connection belongs to.

TLS itself runs in the Rust relay (``swiftftp._splice``, rustls): ``wrap_tls``
on control connections (``AUTH TLS``, or implicit FTPS from the first byte),
``start(..., tls=...)`` on ``PROT P`` data connections. The device leg stays
plain. The Python relay cannot do TLS, so a node with a certificate needs the
Rust one (config.check_environment says so at start).

A data connection is matched to its control connection by the port the control
connection carried: the device's ``227`` (the node's passive port) or the
client's ``PORT``/``EPRT``. Both pass through the node's control relay before
the data connection can exist, so the match is exact, even for two control
connections from one address to one device.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .ftp import Ftps

log = logging.getLogger("swiftftp.tls")

#: Data ports remembered per control connection (pipelined PASVs, a client that
#: sets up ports it never uses): the oldest is forgotten past this.
MAX_CLAIMS = 8


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"tls.{key}: cannot read {path}: {exc.strerror or exc}") from None


def load_pair(settings: Any, config: Any = None) -> Any:
    """The TLS configuration for ``settings.tls_certificate``/``tls_key``; with
    ``config``, reload that one in place (SIGHUP: new handshakes get the new pair,
    sessions and tickets stay). :class:`ConfigError` with one line otherwise."""
    cert = _read(settings.tls_certificate, "certificate")
    key = _read(settings.tls_key, "key")
    try:
        from . import relay

        backend = relay.get_backend("rust")
    except ImportError as exc:
        raise ConfigError(f"tls.certificate: TLS needs the rust relay, which is not built: {exc}") from None
    try:
        if config is not None:
            config.reload(cert, key)
            return config
        return backend.tls_config(cert, key)
    except ValueError as exc:
        raise ConfigError(f"tls.certificate: {settings.tls_certificate} with {settings.tls_key}: {exc}") \
            from None


def describe(config: Any) -> str:
    """``names …, valid until …`` for the log."""
    until = dt.datetime.fromtimestamp(config.not_after, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"certificate for {', '.join(config.names) or '(no DNS names)'}, valid until {until}"


class NodeTls:
    """The node's FTPS side: the pair, the policy, and the data ports each
    ``PROT P`` control connection set up (see the module docs)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.config = load_pair(settings)
        self._claims: dict[tuple, Ftps] = {}

    def control(self, secured: bool = False) -> Ftps:
        """The FTPS state of a new control connection; ``secured`` for implicit FTPS.

        Implicit FTPS protects data connections from the start: no RFC covers
        it, and a client that chose it expects every connection encrypted; its
        clients (curl ``ftps://``, FileZilla) send PBSZ 0/PROT P anyway.
        """
        s = self.settings
        return Ftps(
            tag=os.urandom(16), require=s.tls_require, require_protection=s.tls_require_data_protection,
            secured=secured, protect=secured,
        )

    def reload(self) -> None:
        """SIGHUP: read the pair again (certbot renews it in place); a bad one is one
        line in the log and the old one stays."""
        try:
            load_pair(self.settings, self.config)
        except ConfigError as exc:
            log.error("TLS certificate not reloaded, keeping the old one: %s", exc)
            return
        log.info("TLS %s (reloaded)", describe(self.config))

    # ---- data connections ---------------------------------------------------------------

    def claimer(self, ftps: Ftps, client_ip: str, mine: deque[tuple]) -> Any:
        """The ``data_port`` callback of a control connection's rewriter: remembers each
        port it sets up in ``mine`` (forgotten with :meth:`release`)."""

        def claim(kind: str, port: int) -> None:
            key = ("pasv", port) if kind == "pasv" else ("port", client_ip, port)
            if len(mine) >= MAX_CLAIMS:
                old = mine.popleft()
                if self._claims.get(old) is ftps:
                    del self._claims[old]
            self._claims[key] = ftps
            mine.append(key)

        return claim

    def release(self, ftps: Ftps, mine: deque[tuple]) -> None:
        """The control connection ended: its ports lead nowhere now (unless a later
        connection was given the same port meanwhile)."""
        while mine:
            key = mine.popleft()
            if self._claims.get(key) is ftps:
                del self._claims[key]

    def for_passive(self, port: int) -> Ftps | None:
        """The control connection whose 227 named this passive port."""
        return self._claims.get(("pasv", port))

    def for_active(self, client_ip: str, port: int) -> Ftps | None:
        """The control connection whose PORT/EPRT named this address and port."""
        return self._claims.get(("port", client_ip, port))

    def data_options(self, ftps: Ftps | None) -> dict[str, Any]:
        """``backend.start`` keywords for a data connection of ``ftps`` (none: plain)."""
        if ftps is None or not ftps.protect:
            return {}
        return {
            "tls": self.config,
            "tls_tag": ftps.tag,
            "require_tag": ftps.tag if self.settings.tls_require_session_reuse else None,
        }
