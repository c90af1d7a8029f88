"""The device registry: device id → prefix, persisted in SQLite.

The first login of an ``android_id`` allots it a prefix of five random
lowercase letters; later logins get the same one, so the URL its user
bookmarked keeps working.
"""

from __future__ import annotations

import secrets
import sqlite3
import string
import threading
import time
from pathlib import Path

PREFIX_LENGTH = 5
_ALPHABET = string.ascii_lowercase


class AccountExists(Exception):
    """``create_account`` for a device id the registry already knows."""


class Registry:
    """SQLite-backed device registry; safe to share between threads."""

    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                """CREATE TABLE IF NOT EXISTS devices (
                    android_id TEXT PRIMARY KEY,
                    prefix TEXT NOT NULL UNIQUE,
                    secret TEXT,
                    created REAL NOT NULL,
                    last_seen REAL NOT NULL
                )"""
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def prefix_for(self, android_id: str) -> str:
        """The device's prefix, allotting a new unique one on its first login."""
        now = time.time()
        with self._lock:
            row = self._db.execute(
                "SELECT prefix FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
            if row:
                self._db.execute(
                    "UPDATE devices SET last_seen = ? WHERE android_id = ?", (now, android_id)
                )
                return row[0]
            return self._insert(android_id, None, now)

    def _insert(self, android_id: str, secret: str | None, now: float) -> str:
        for attempt in range(100):
            # Five letters give 11.9 M prefixes; grow only if the space is crowded.
            length = PREFIX_LENGTH + attempt // 20
            prefix = "".join(secrets.choice(_ALPHABET) for _ in range(length))
            try:
                self._db.execute(
                    "INSERT INTO devices (android_id, prefix, secret, created, last_seen)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (android_id, prefix, secret, now, now),
                )
            except sqlite3.IntegrityError:
                continue
            return prefix
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
        with self._lock:
            known = self._db.execute(
                "SELECT 1 FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
            if known:
                raise AccountExists(android_id)
            self._insert(android_id, secret, time.time())
        return secret

    def check_secret(self, android_id: str, secret: str) -> bool:
        """Legacy ``authenticate``: does the secret match the one ``create_account`` gave?"""
        with self._lock:
            row = self._db.execute(
                "SELECT secret FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
        return bool(row and row[0] and secrets.compare_digest(row[0], secret))
