"""The device registry: device id → prefix, persisted in SQLite.

The first login of an ``android_id`` allots it a prefix of five random
lowercase letters; later logins get the same one, so the URL its user
bookmarked keeps working.  In a fleet the allotting is shared by every node
(:class:`swiftftp.fleet.SharedPrefixes`) and SQLite keeps this node's copy,
with its quotas, rate overrides and usage (the fleet's figures are in the bucket:
:class:`swiftftp.fleet.SharedUsage`).

Integrity (a lost registry gives every device a new prefix and breaks every
bookmarked URL, so it is never re-allotted silently):

* At start the file is checked: a regular, readable file, an SQLite header,
  ``PRAGMA quick_check`` (given :data:`CHECK_SECONDS` at most).  Any problem is a
  :class:`~swiftftp.errors.RegistryError` whose text is one line naming the file.
* ``registry.devices`` beside it (the *sidecar*) holds the number of devices the
  registry held when last counted (at start, on every new device, at close).  A
  registry that is missing or holds no device while the sidecar says it held some
  is refused, with what to do: restore it from a backup, or remove the sidecar to
  start afresh.
* While running, an SQLite error other than a busy database (damage, I/O errors,
  a full disk, a read-only file) is recorded in :attr:`Registry.error`, logged once
  at ERROR, and raised as :class:`~swiftftp.errors.RegistryError`; devices whose
  prefix is cached go on being served.  :meth:`Registry.verify` looks at the file
  from a connection of its own (replaced, removed, damaged pages).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import stat
import string
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import logs
from .errors import RegistryError

if TYPE_CHECKING:
    from .fleet import SharedPrefixes

log = logging.getLogger("swiftftp.registry")

PREFIX_LENGTH = 5
_ALPHABET = string.ascii_lowercase
#: What every SQLite 3 database file starts with.
SQLITE_HEADER = b"SQLite format 3\x00"
#: Longest the integrity check at start may take; a larger registry starts unchecked (logged).
CHECK_SECONDS = 10.0
#: Longest a check of a running node's registry (:meth:`Registry.verify`) may take.
VERIFY_SECONDS = 2.0
#: The sidecar's name, in the registry's directory.
SIDECAR = "registry.devices"
#: SQLite result codes that say "try again", not "broken".
_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED}
#: ... and those that say the file is damaged.
_DAMAGED = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


def _candidate(attempt: int) -> str:
    """A random prefix; five letters give 11.9 M, longer only if the space is crowded."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_LENGTH + attempt // 20))


class AccountExists(Exception):
    """``create_account`` for a device id the registry already knows."""


#: Device id → prefix pairs kept in memory (a prefix never changes once allotted).
CACHE_SIZE = 200_000


def _reason(exc: BaseException) -> str:
    """An error as a short phrase: the OS's words for an OSError, SQLite's otherwise."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_sidecar(path: Path) -> int | None:
    """The device count a sidecar holds; None without one (or if it does not read)."""
    try:
        first = path.read_text(encoding="ascii", errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def _quick_check(db: sqlite3.Connection, seconds: float) -> str | None:
    """SQLite's own verdict on the database (``PRAGMA quick_check``: every page and
    record read, without the index cross-check of ``integrity_check``): None when it is
    sound, the first problems otherwise, ``"unchecked"`` past ``seconds``."""
    deadline = time.monotonic() + seconds
    db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = db.execute("PRAGMA quick_check(3)").fetchall()
    except sqlite3.OperationalError as exc:
        if time.monotonic() > deadline and "interrupt" in str(exc):
            return "unchecked"
        raise
    finally:
        db.set_progress_handler(None, 0)
    found = [str(row[0]) for row in rows]
    if found == ["ok"]:
        return None
    text = "; ".join(line.strip() for row in found for line in row.splitlines() if line.strip())
    return text if len(text) <= 300 else text[:297] + "..."



class Registry:
    """SQLite-backed device registry; safe to share between threads.

    A device's prefix is read from SQLite once and then kept in memory, and
    ``last_seen`` is written in batches (:meth:`flush_seen`): a login then costs
    no query. Measured with the agent's 1-byte RETR through a node, which logs
    a data connection in for every transfer (benches/test_latency.py): a
    SELECT and an UPDATE per login were ≈ 0.15 ms of the node's ≈ 1 ms.

    Opening checks the file (see the module's notes) and raises
    :class:`~swiftftp.errors.RegistryError` with one line; every method raises it
    for an SQLite error (never ``sqlite3`` errors).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._memory = self.path == ":memory:"
        #: The first damage or I/O error met while running (None: none): /stats, /readyz.
        self.error: str | None = None
        self._error_lock = threading.Lock()
        self._lock = threading.Lock()
        #: The fleet's prefix map; None: this registry allots prefixes alone.
        self.shared: SharedPrefixes | None = None
        self._prefixes: dict[str, str] = {}
        #: Bound keys of the devices in ``_prefixes`` (only those that have one).
        self._keys: dict[str, str] = {}
        self._seen: dict[str, float] = {}  # last_seen not yet written
        self._count = 0  # devices in the registry
        self._sidecar = None if self._memory else Path(self.path).with_name(SIDECAR)
        self._sidecar_failed = False
        self._count_noted = True  # the sidecar says self._count (else: flush_seen writes it)
        self._identity: tuple[int, int] | None = None  # the file's (device, inode)
        self._verified = 0.0  # time.monotonic() of the last verify()
        existed = self._inspect()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.path}: cannot open it: {_reason(exc)}") from None
        try:
            self._open(existed)
        except BaseException:
            self._db.close()
            raise

    # ---- opening ----------------------------------------------------------------------

    def _inspect(self) -> bool:
        """Check the file before SQLite opens it (and would create it); True if it exists."""
        if self._memory:
            return False
        path = Path(self.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"registry {path}: cannot create {path.parent}: {_reason(exc)}") from None
        try:
            info = path.stat()
        except FileNotFoundError:
            self._refuse_empty("is missing")
            return False
        except OSError as exc:
            raise RegistryError(f"registry {path}: {_reason(exc)}") from None
        if not stat.S_ISREG(info.st_mode):
            raise RegistryError(f"registry {path}: not a regular file")
        try:
            with path.open("rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise RegistryError(f"registry {path}: cannot read it: {_reason(exc)}") from None
        if head and head != SQLITE_HEADER:
            raise RegistryError(
                f"registry {path}: not an SQLite database (damaged, or another file); "
                "restore it from a backup"
            )
        return True

    def _refuse_empty(self, what: str) -> None:
        """Refuse a registry that ``what`` (is missing, holds no devices) while the sidecar
        says it held devices."""
        held = read_sidecar(self._sidecar) if self._sidecar else None
        if held:
            raise RegistryError(
                f"registry {self.path} {what}, but {self._sidecar} says it held {held} devices: "
                f"restore the registry from a backup, or remove {self._sidecar} to start afresh "
                "(every device then gets a new prefix)"
            )

    def _open(self, existed: bool) -> None:
        db = self._db
        try:
            if existed:
                problem = _quick_check(db, CHECK_SECONDS)
                if problem == "unchecked":
                    logs.event(log, "registry_check_skipped", level=logging.WARNING, path=self.path,
                               reason=f"PRAGMA quick_check took over {CHECK_SECONDS:g} s")
                elif problem:
                    raise RegistryError(f"registry {self.path}: damaged ({problem}); "
                                        "restore it from a backup")
                tables = db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'devices'").fetchone()
                self._count = db.execute("SELECT count(*) FROM devices").fetchone()[0] if tables[0] else 0
                if not self._count:
                    self._refuse_empty("holds no devices")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(
                """CREATE TABLE IF NOT EXISTS devices (
                    android_id TEXT PRIMARY KEY,
                    prefix TEXT NOT NULL UNIQUE,
                    secret TEXT,
                    created REAL NOT NULL,
                    last_seen REAL NOT NULL,
                    quota_bytes INTEGER,     -- NULL: the node's [quota] bytes
                    upload_rate INTEGER,     -- NULL: the node's [limits] device rates
                    download_rate INTEGER,
                    public_key TEXT,         -- NULL: not bound (identity.py); base64 Ed25519
                    key_bound REAL           -- when it was bound
                );
                CREATE TABLE IF NOT EXISTS usage (
                    android_id TEXT NOT NULL,
                    period TEXT NOT NULL,
                    bytes INTEGER NOT NULL,
                    PRIMARY KEY (android_id, period)
                );"""
            )
            self._migrate(db)
        except sqlite3.Error as exc:
            damaged = getattr(exc, "sqlite_errorcode", None) in _DAMAGED
            hint = "; restore it from a backup" if damaged else ""
            raise RegistryError(f"registry {self.path}: {_reason(exc)}{hint}") from None
        if not self._memory:
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
            if self._count and read_sidecar(self._sidecar) != self._count:
                self._note_count()

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a registry made by an earlier version up to this schema (columns added
        since: each with NULL for the rows already there, which means what it meant)."""
        have = {row[1] for row in db.execute("PRAGMA table_info(devices)")}
        for column, kind in _ADDED_COLUMNS:
            if column not in have:
                db.execute(f"ALTER TABLE devices ADD COLUMN {column} {kind}")
                logs.event(log, "registry_migrated", column=column)

    def _note_count(self) -> None:
        """Write the device count to the sidecar (atomically; a failure is logged once)."""
        if self._sidecar is None:
            return
        temporary = self._sidecar.with_name(f".{SIDECAR}.{os.getpid()}")
        try:
            temporary.write_text(
                f"{self._count}\n# devices in {Path(self.path).name} when last counted. swiftftp-proxy "
                "refuses to start on a missing or empty registry while this says more than 0:\n"
                "# restore the registry from a backup, or remove this file to start afresh.\n"
            )
            os.replace(temporary, self._sidecar)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            if not self._sidecar_failed:
                self._sidecar_failed = True
                logs.event(log, "registry_sidecar_failed", level=logging.WARNING, path=self._sidecar,
                           reason=_reason(exc))

    # ---- errors -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock; an SQLite error comes out as RegistryError."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._failed(exc) from None

    def _failed(self, exc: sqlite3.Error) -> RegistryError:
        """Record (and log once, loudly) an SQLite error met while running."""
        reason = _reason(exc)
        if getattr(exc, "sqlite_errorcode", None) in _TRANSIENT or isinstance(
            exc, sqlite3.ProgrammingError | sqlite3.InterfaceError | sqlite3.IntegrityError
        ):  # busy, or a misuse (closed, a constraint): nothing wrong with the file
            return RegistryError(f"registry {self.path}: {reason}")
        self._record(reason)
        return RegistryError(f"registry {self.path}: {reason}")

    def _record(self, problem: str) -> None:
        with self._error_lock:
            if self.error is not None:
                return
            self.error = problem
        logs.event(
            log, "registry_damaged", level=logging.ERROR, path=self.path, error=problem,
            consequence="devices whose prefix is in memory are still served; new devices are "
                        "refused (error 0) and usage is not recorded",
            action="stop the node, restore the registry from a backup (or move it away and remove "
                   f"{SIDECAR} to start afresh), start it again",
        )

    def verify(self, seconds: float = VERIFY_SECONDS, *, at_most_every: float = 0.0) -> str | None:
        """Look at the file now, from a connection of its own: removed or replaced under
        the node, no SQLite header any more, damaged pages (``PRAGMA quick_check``, at
        most ``seconds``).  A problem is recorded like an error met while running.
        Returns :attr:`error`.  ``at_most_every``: skip if checked that recently."""
        if self._memory or self.error is not None:
            return self.error
        now = time.monotonic()
        if at_most_every and now - self._verified < at_most_every:
            return self.error
        self._verified = now
        problem = None
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) != self._identity:
                problem = "the file was replaced while the node runs"
            else:
                with open(self.path, "rb") as f:
                    if f.read(len(SQLITE_HEADER)) not in (SQLITE_HEADER, b""):
                        problem = "the file is no longer an SQLite database"
            if problem is None:
                uri = f"file:{urllib.parse.quote(self.path)}?mode=ro"
                db = sqlite3.connect(uri, uri=True, timeout=0.5, check_same_thread=False)
                try:
                    found = _quick_check(db, seconds)
                finally:
                    db.close()
                if found and found != "unchecked":
                    problem = f"damaged ({found})"
        except FileNotFoundError:
            problem = "the file was removed while the node runs"
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) not in _TRANSIENT:
                problem = _reason(exc)
        except OSError as exc:
            problem = _reason(exc)
        if problem:
            self._record(problem)
        return self.error

    def close(self) -> None:
        """Write what is pending, the sidecar, and close (an error was logged already)."""
        with contextlib.suppress(RegistryError):
            self.commit()
            self.flush_seen()
        with self._lock:
            if self._count and not self._memory and self.error is None:
                self._note_count()
            self._db.close()

    # ---- devices ----------------------------------------------------------------------

    def _remember(self, android_id: str, prefix: str, key: str | None = None) -> str:
        """Keep the device's prefix (and its bound key, if any) in memory: a device whose
        prefix is here has its key in ``_keys`` or none."""
        if len(self._prefixes) >= CACHE_SIZE:
            oldest = next(iter(self._prefixes))
            del self._prefixes[oldest]
            self._keys.pop(oldest, None)
        self._prefixes[android_id] = prefix
        if key is not None:
            self._keys[android_id] = key
        return prefix

    # ---- device keys (identity.py) ---------------------------------------------------------

    def key_of(self, android_id: str) -> str | None:
        """The public key bound to the device id (base64), or None: unbound or unknown.
        From memory once the device was seen, else the SELECT of :meth:`lookup`, which
        remembers the key with the prefix."""
        if self.lookup(android_id, seen=False) is None:
            return None
        return self._keys.get(android_id)

    def bind(self, android_id: str, key: str) -> bool:
        """Bind ``key`` to the device (known to the registry) unless it is bound already;
        True if it is bound to ``key`` now."""
        with self._sql() as db:
            db.execute(
                "UPDATE devices SET public_key = ?, key_bound = ?"
                " WHERE android_id = ? AND public_key IS NULL",
                (key, time.time(), android_id),
            )
            row = db.execute("SELECT prefix, public_key FROM devices WHERE android_id = ?",
                             (android_id,)).fetchone()
        if row is None:
            return False
        self._remember(android_id, row[0], row[1])
        return row[1] == key

    def unbind(self, android_id: str) -> None:
        """Forget the device's key: its next login without proof is accepted (and a login
        with a key binds that one)."""
        with self._sql() as db:
            db.execute("UPDATE devices SET public_key = NULL, key_bound = NULL WHERE android_id = ?",
                       (android_id,))
        self.forget_key(android_id)

    def forget_key(self, android_id: str) -> None:
        """Drop what memory holds of the device's key (another process unbound it): the
        next login reads it from the file again."""
        self._keys.pop(android_id, None)
        self._prefixes.pop(android_id, None)

    def known(self, android_id: str) -> bool:
        return self.lookup(android_id, seen=False) is not None

    def lookup(self, android_id: str, seen: bool = True) -> str | None:
        """The device's prefix, or None if it has none yet; from memory, else one SELECT.
        With ``seen``, its ``last_seen`` is now (written with the next batch)."""
        prefix = self._prefixes.get(android_id)
        if prefix is None:
            with self._sql() as db:
                row = db.execute(
                    "SELECT prefix, public_key FROM devices WHERE android_id = ?", (android_id,)
                ).fetchone()
            if row is None:
                return None
            prefix = self._remember(android_id, row[0], row[1])
        if seen:
            self._seen[android_id] = time.time()
        return prefix

    def allot(self, android_id: str) -> str:
        """A new device's prefix (this registry allots it alone: no fleet), after a
        :meth:`lookup` found none: one INSERT, in a transaction that :meth:`commit`
        ends. New devices logging in together share one commit: an autocommitted
        INSERT cost 111 µs here, most of it the commit, a quarter of a first login's
        CPU. The caller commits before the device can learn its prefix."""
        with self._sql() as db:
            if not db.in_transaction:
                db.execute("BEGIN")
            return self._remember(android_id, self._insert(android_id, None, time.time()))

    def commit(self) -> None:
        """Commit what :meth:`allot` wrote."""
        with self._sql() as db:
            if db.in_transaction:
                db.execute("COMMIT")

    def flush_seen(self) -> None:
        """Write the ``last_seen`` of the devices seen since the last call (and the device
        count to the sidecar, if it changed)."""
        if not self._count_noted and not self._memory and self.error is None:
            self._count_noted = True
            self._note_count()
        if not self._seen:
            return
        seen, self._seen = self._seen, {}
        try:
            with self._sql() as db:
                if db.in_transaction:
                    db.execute("COMMIT")  # what allot() wrote first
                db.execute("BEGIN")
                try:
                    db.executemany(
                        "UPDATE devices SET last_seen = ? WHERE android_id = ?",
                        [(when, android_id) for android_id, when in seen.items()],
                    )
                    db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                    raise
        except RegistryError:
            for android_id, when in seen.items():  # kept for the next try (one per device)
                self._seen.setdefault(android_id, when)
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
        with self._sql() as db:
            row = db.execute(
                "SELECT prefix, public_key FROM devices WHERE android_id = ?", (android_id,)
            ).fetchone()
            if row:
                self._seen[android_id] = now
                return self._remember(android_id, row[0], row[1])
            if self.shared is None:
                return self._remember(android_id, self._insert(android_id, None, now))
        prefix = self.shared.prefix_for(android_id, _candidate)  # not under the lock
        with self._sql():
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
            self._count += 1
            if self._count == 1:  # from now on an empty registry is damage: say so at once
                self._note_count()
            else:  # written with the next flush_seen or at close: writing the file here cost
                self._count_noted = False  # 0.57 ms of a first login's ~0.9 (5,000 new devices)
            return chosen
        raise RuntimeError("could not allot a unique prefix")

    def android_id_for(self, prefix: str) -> str | None:
        with self._sql() as db:
            row = db.execute("SELECT android_id FROM devices WHERE prefix = ?", (prefix,)).fetchone()
        return row[0] if row else None

    def create_account(self, android_id: str) -> str:
        """Legacy ``create_account``: a new device with a secret; :class:`AccountExists` if known."""
        secret = secrets.token_hex(16)
        if self.known(android_id):
            raise AccountExists(android_id)
        prefix = self.shared.prefix_for(android_id, _candidate) if self.shared else None
        with self._sql() as db:
            if db.execute("SELECT 1 FROM devices WHERE android_id = ?", (android_id,)).fetchone():
                raise AccountExists(android_id)
            self._insert(android_id, secret, time.time(), prefix)
        return secret

    def check_secret(self, android_id: str, secret: str) -> bool:
        """Legacy ``authenticate``: does the secret match the one ``create_account`` gave?"""
        with self._sql() as db:
            row = db.execute("SELECT secret FROM devices WHERE android_id = ?", (android_id,)).fetchone()
        return bool(row and row[0] and secrets.compare_digest(row[0], secret))

    # ---- operators' overrides and quota usage ------------------------------------------

    def find(self, key: str) -> DeviceRecord | None:
        """A device by prefix or by device id."""
        with self._sql() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM devices WHERE prefix = ? OR android_id = ?",
                (key.lower(), key),
            ).fetchone()
        return DeviceRecord(*row) if row else None

    def all(self) -> list[DeviceRecord]:
        with self._sql() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM devices ORDER BY prefix").fetchall()
        return [DeviceRecord(*row) for row in rows]

    def set_quota(self, android_id: str, quota_bytes: int | None) -> None:
        """Per-device quota override; None returns the device to the node's default."""
        with self._sql() as db:
            db.execute("UPDATE devices SET quota_bytes = ? WHERE android_id = ?", (quota_bytes, android_id))

    def set_rates(self, android_id: str, upload: int | None, download: int | None) -> None:
        """Per-device rate override in bytes/s (None: the node's default)."""
        with self._sql() as db:
            db.execute(
                "UPDATE devices SET upload_rate = ?, download_rate = ? WHERE android_id = ?",
                (upload, download, android_id),
            )

    def usage(self, android_id: str, period: str) -> int:
        with self._sql() as db:
            row = db.execute(
                "SELECT bytes FROM usage WHERE android_id = ? AND period = ?", (android_id, period)
            ).fetchone()
        return row[0] if row else 0

    def add_usage(self, period: str, amounts: dict[str, int]) -> None:
        """Add bytes to devices' usage in one transaction (increments, so another
        process may reset a device's usage meanwhile without being overwritten)."""
        with self._sql() as db:
            if db.in_transaction:
                db.execute("COMMIT")  # what allot() wrote first
            db.execute("BEGIN")
            try:
                for android_id, amount in amounts.items():
                    db.execute(
                        "INSERT INTO usage (android_id, period, bytes) VALUES (?, ?, ?)"
                        " ON CONFLICT (android_id, period) DO UPDATE SET bytes = bytes + excluded.bytes",
                        (android_id, period, amount),
                    )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise

    def reset_usage(self, android_id: str, period: str) -> None:
        with self._sql() as db:
            db.execute("DELETE FROM usage WHERE android_id = ? AND period = ?", (android_id, period))


_COLUMNS = ("android_id, prefix, created, last_seen, quota_bytes, upload_rate, download_rate, "
            "public_key, key_bound")
#: Columns added to ``devices`` after its first version: (name, type), for :meth:`Registry._migrate`.
_ADDED_COLUMNS = (("public_key", "TEXT"), ("key_bound", "REAL"))


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
    #: The bound Ed25519 public key (base64), None if the device id is not bound.
    public_key: str | None = None
    key_bound: float | None = None
