"""The device registry: device id → prefix, persisted in SQLite.

The first login of an ``android_id`` allots it a prefix of five random
lowercase letters; later logins get the same one, so the URL its user
bookmarked keeps working.  In a fleet the allotting is shared by every node
(:class:`swiftftp.fleet.SharedPrefixes`) and SQLite keeps this node's copy,
with its quotas, rate overrides and usage.
"""

from __future__ import annotations

import secrets
import sqlite3
import string
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fleet import SharedPrefixes

PREFIX_LENGTH = 5
_ALPHABET = string.ascii_lowercase


def _candidate(attempt: int) -> str:
    """A random prefix; five letters give 11.9 M, longer only if the space is crowded."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_LENGTH + attempt // 20))


class AccountExists(Exception):
    """``create_account`` for a device id the registry already knows."""


#: Device id → prefix pairs kept in memory (a prefix never changes once allotted).
CACHE_SIZE = 200_000


class Registry:
    """SQLite-backed device registry; safe to share between threads.

    A device's prefix is read from SQLite once and then kept in memory, and
    ``last_seen`` is written in batches (:meth:`flush_seen`): a login then costs
    no query. Measured with the agent's 1-byte RETR through a node, which logs
    a data connection in for every transfer (benches/test_latency.py): a
    SELECT and an UPDATE per login were ≈ 0.15 ms of the node's ≈ 1 ms.
    """

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        #: The fleet's prefix map; None: this registry allots prefixes alone.
        self.shared: SharedPrefixes | None = None
        self._prefixes: dict[str, str] = {}
        self._seen: dict[str, float] = {}  # last_seen not yet written
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """CREATE TABLE IF NOT EXISTS devices (
                    android_id TEXT PRIMARY KEY,
                    prefix TEXT NOT NULL UNIQUE,
                    secret TEXT,
                    created REAL NOT NULL,
                    last_seen REAL NOT NULL,
                    quota_bytes INTEGER,     -- NULL: the node's [quota] bytes
                    upload_rate INTEGER,     -- NULL: the node's [limits] device rates
                    download_rate INTEGER
                );
                CREATE TABLE IF NOT EXISTS usage (
                    android_id TEXT NOT NULL,
                    period TEXT NOT NULL,
                    bytes INTEGER NOT NULL,
                    PRIMARY KEY (android_id, period)
                );"""
            )

    def close(self) -> None:
        self.commit()
        self.flush_seen()
        with self._lock:
            self._db.close()

    def _remember(self, android_id: str, prefix: str) -> str:
        if len(self._prefixes) >= CACHE_SIZE:
            del self._prefixes[next(iter(self._prefixes))]  # the oldest entry
        self._prefixes[android_id] = prefix
        return prefix

    def known(self, android_id: str) -> bool:
        return self.lookup(android_id, seen=False) is not None

    def lookup(self, android_id: str, seen: bool = True) -> str | None:
        """The device's prefix, or None if it has none yet; from memory, else one SELECT.
        With ``seen``, its ``last_seen`` is now (written with the next batch)."""
        prefix = self._prefixes.get(android_id)
        if prefix is None:
            with self._lock:
                row = self._db.execute(
                    "SELECT prefix FROM devices WHERE android_id = ?", (android_id,)
                ).fetchone()
            if row is None:
                return None
            prefix = self._remember(android_id, row[0])
        if seen:
            self._seen[android_id] = time.time()
        return prefix

    def allot(self, android_id: str) -> str:
        """A new device's prefix (this registry allots it alone: no fleet), after a
        :meth:`lookup` found none: one INSERT, in a transaction that :meth:`commit`
        ends. New devices logging in together share one commit: an autocommitted
        INSERT cost 111 µs here, most of it the commit, a quarter of a first login's
        CPU. The caller commits before the device can learn its prefix."""
        with self._lock:
            if not self._db.in_transaction:
                self._db.execute("BEGIN")
            return self._remember(android_id, self._insert(android_id, None, time.time()))

    def commit(self) -> None:
        """Commit what :meth:`allot` wrote."""
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")

    def flush_seen(self) -> None:
        """Write the ``last_seen`` of the devices seen since the last call."""
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")  # what allot() wrote first
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "UPDATE devices SET last_seen = ? WHERE android_id = ?",
                    [(when, android_id) for android_id, when in seen.items()],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def prefix_for(self, android_id: str) -> str:
        """The device's prefix, allotting a new unique one on its first login.

        In a fleet the first login on this node asks the bucket (a network round
        trip: call it from a thread then); later ones are answered here.
        """
        now = time.time()
        prefix = self._prefixes.get(android_id)
        if prefix is not None:
            self._seen[android_id] = now
            return prefix
        with self._lock:
            row = self._db.execute(
                "SELECT prefix FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
            if row:
                self._seen[android_id] = now
                return self._remember(android_id, row[0])
            if self.shared is None:
                return self._remember(android_id, self._insert(android_id, None, now))
        prefix = self.shared.prefix_for(android_id, _candidate)  # not under the lock
        with self._lock:
            return self._remember(android_id, self._insert(android_id, None, now, prefix))

    def _insert(self, android_id: str, secret: str | None, now: float, prefix: str | None = None) -> str:
        """Add the device with ``prefix`` (the fleet's), or with a free one of our own."""
        for attempt in range(1 if prefix else 100):
            chosen = prefix or _candidate(attempt)
            try:
                self._db.execute(
                    "INSERT INTO devices (android_id, prefix, secret, created, last_seen)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (android_id, chosen, secret, now, now),
                )
            except sqlite3.IntegrityError:
                row = self._db.execute(
                    "SELECT prefix FROM devices WHERE android_id = ?", (android_id,)
                ).fetchone()
                if row:  # a concurrent first login of the same device got here first
                    return row[0]
                if prefix:
                    raise RuntimeError(
                        f"the fleet gave {android_id!r} prefix {prefix!r}, which this node's"
                        " registry has for another device (registered before joining the fleet?)"
                    ) from None
                continue
            return chosen
        raise RuntimeError("could not allot a unique prefix")

    def android_id_for(self, prefix: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT android_id FROM devices WHERE prefix = ?", (prefix,)
            ).fetchone()
        return row[0] if row else None

    def create_account(self, android_id: str) -> str:
        """Legacy ``create_account``: a new device with a secret; :class:`AccountExists` if known."""
        secret = secrets.token_hex(16)
        if self.known(android_id):
            raise AccountExists(android_id)
        prefix = self.shared.prefix_for(android_id, _candidate) if self.shared else None
        with self._lock:
            if self._db.execute("SELECT 1 FROM devices WHERE android_id = ?", (android_id,)).fetchone():
                raise AccountExists(android_id)
            self._insert(android_id, secret, time.time(), prefix)
        return secret

    def check_secret(self, android_id: str, secret: str) -> bool:
        """Legacy ``authenticate``: does the secret match the one ``create_account`` gave?"""
        with self._lock:
            row = self._db.execute(
                "SELECT secret FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
        return bool(row and row[0] and secrets.compare_digest(row[0], secret))

    # ---- operators' overrides and quota usage ------------------------------------------

    def find(self, key: str) -> DeviceRecord | None:
        """A device by prefix or by device id."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM devices WHERE prefix = ? OR android_id = ?",
                (key.lower(), key),
            ).fetchone()
        return DeviceRecord(*row) if row else None

    def all(self) -> list[DeviceRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY prefix").fetchall()
        return [DeviceRecord(*row) for row in rows]

    def set_quota(self, android_id: str, quota_bytes: int | None) -> None:
        """Per-device quota override; None returns the device to the node's default."""
        with self._lock:
            self._db.execute(
                "UPDATE devices SET quota_bytes = ? WHERE android_id = ?", (quota_bytes, android_id)
            )

    def set_rates(self, android_id: str, upload: int | None, download: int | None) -> None:
        """Per-device rate override in bytes/s (None: the node's default)."""
        with self._lock:
            self._db.execute(
                "UPDATE devices SET upload_rate = ?, download_rate = ? WHERE android_id = ?",
                (upload, download, android_id),
            )

    def usage(self, android_id: str, period: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT bytes FROM usage WHERE android_id = ? AND period = ?", (android_id, period)
            ).fetchone()
        return row[0] if row else 0

    def add_usage(self, period: str, amounts: dict[str, int]) -> None:
        """Add bytes to devices' usage in one transaction (increments, so another
        process may reset a device's usage meanwhile without being overwritten)."""
        with self._lock:
            if self._db.in_transaction:
                self._db.execute("COMMIT")  # what allot() wrote first
            self._db.execute("BEGIN")
            try:
                for android_id, amount in amounts.items():
                    self._db.execute(
                        "INSERT INTO usage (android_id, period, bytes) VALUES (?, ?, ?)"
                        " ON CONFLICT (android_id, period) DO UPDATE SET bytes = bytes + excluded.bytes",
                        (android_id, period, amount),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def reset_usage(self, android_id: str, period: str) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM usage WHERE android_id = ? AND period = ?", (android_id, period)
            )


_COLUMNS = "android_id, prefix, created, last_seen, quota_bytes, upload_rate, download_rate"


@dataclass(frozen=True)
class DeviceRecord:
    """One row of the registry, as operators see it."""

    android_id: str
    prefix: str
    created: float
    last_seen: float
    quota_bytes: int | None
    upload_rate: int | None
    download_rate: int | None
