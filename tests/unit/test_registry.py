"""The SQLite device registry."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from swiftftp.errors import ErrorCode, RegistryError
from swiftftp.registry import SIDECAR, AccountExists, Registry, read_sidecar


def test_prefix_is_stable_and_unique(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    prefixes = {reg.prefix_for(f"device-{i}") for i in range(500)}
    assert len(prefixes) == 500
    assert all(len(p) == 5 and p.isalpha() and p.islower() for p in prefixes)
    first = reg.prefix_for("device-7")
    reg.close()
    again = Registry(tmp_path / "r.sqlite3")
    assert again.prefix_for("device-7") == first
    assert again.android_id_for(first) == "device-7"


def test_legacy_accounts(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    secret = reg.create_account("old-phone")
    assert reg.check_secret("old-phone", secret)
    assert not reg.check_secret("old-phone", "nope")
    assert not reg.check_secret("unknown", secret)
    with pytest.raises(AccountExists):
        reg.create_account("old-phone")


# ---- integrity: at start, and while running ---------------------------------------------


def filled(path: Path, devices: int = 300) -> dict[str, str]:
    """A registry at ``path`` with ``devices`` devices, closed; their prefixes."""
    reg = Registry(path)
    prefixes = {f"phone-{i:04d}-{'x' * 30}": "" for i in range(devices)}
    for android_id in prefixes:
        prefixes[android_id] = reg.prefix_for(android_id)
    reg.close()
    return prefixes


def refused(path: Path) -> str:
    with pytest.raises(RegistryError) as info:
        Registry(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert info.value.code == ErrorCode.INTERNAL  # what a device would be answered
    return message


def test_not_an_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    path.write_bytes(b"PK\x03\x04" + os.urandom(5000))
    assert "not an SQLite database" in refused(path)
    path.unlink()
    path.mkdir()
    assert "not a regular file" in refused(path)


def test_half_written_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    filled(path, 3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = refused(path)
    assert "malformed" in message or "damaged" in message
    assert message.endswith("restore it from a backup")


def test_damaged_pages_found_by_the_check_at_start(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    filled(path, 3000)
    with path.open("r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xa5" * 4096 * 2)
    assert "damaged (" in refused(path)


def test_an_empty_or_missing_registry_that_held_devices_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    first = filled(path, 3)
    sidecar = tmp_path / SIDECAR
    assert read_sidecar(sidecar) == 3
    backup = path.read_bytes()
    path.write_bytes(b"")  # a 0-byte registry
    message = refused(path)
    assert "holds no devices" in message and "says it held 3 devices" in message
    assert f"remove {sidecar} to start afresh" in message
    path.unlink()
    assert "is missing" in refused(path)
    assert not path.exists()  # refused before SQLite could create it
    path.write_bytes(backup)  # restored from the backup: the same prefixes
    reg = Registry(path)
    assert all(reg.prefix_for(device) == prefix for device, prefix in first.items())
    reg.close()
    path.unlink()
    sidecar.unlink()  # the operator's "start afresh"
    Registry(path).close()


def test_a_registry_recovered_from_its_wal_is_not_empty(tmp_path: Path) -> None:
    """A node killed before SQLite checkpointed: the devices are in the -wal file."""
    live = Registry(tmp_path / "a" / "registry.sqlite3")
    prefix = live.prefix_for("phone")
    (tmp_path / "b").mkdir()
    for name in ("registry.sqlite3", "registry.sqlite3-wal", SIDECAR):
        shutil.copy(tmp_path / "a" / name, tmp_path / "b" / name)
    live.close()
    copy = Registry(tmp_path / "b" / "registry.sqlite3")
    assert copy.prefix_for("phone") == prefix
    copy.close()


def test_damage_while_running_is_recorded_once_and_known_devices_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.sqlite3"
    reg = Registry(path)
    devices = [f"phone-{i}-{'y' * 40}" for i in range(3000)]
    prefixes = [reg.prefix_for(d) for d in devices]
    reg.flush_seen()
    assert reg.verify() is None and reg.error is None
    reg._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\x5a" * (path.stat().st_size - 4096))
    with caplog.at_level(logging.ERROR, logger="swiftftp.registry"):
        assert reg.verify() is not None
        reg._db.execute("PRAGMA cache_size=0")
        with pytest.raises(RegistryError):
            reg.all()
        with pytest.raises(RegistryError):
            reg.add_usage("total", {devices[0]: 1})
        reg.verify()
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # once, however often it fails
    assert "registry damaged" in caplog.records[0].getMessage()
    assert reg.error and "\n" not in reg.error
    # cached devices are still answered from memory
    assert reg.known(devices[7]) and reg.prefix_for(devices[7]) == prefixes[7]
    reg.close()  # the pending last_seen cannot be written: no exception out of close


def test_a_registry_replaced_under_the_node(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite3"
    reg = Registry(path)
    reg.prefix_for("phone")
    path.rename(tmp_path / "moved.sqlite3")
    assert reg.verify() == "the file was removed while the node runs"
    reg.close()


# ---- device keys, and a registry made by an earlier version ---------------------------------

#: The devices table as the first versions made it (before device keys).
OLD_SCHEMA = """CREATE TABLE devices (
    android_id TEXT PRIMARY KEY, prefix TEXT NOT NULL UNIQUE, secret TEXT, created REAL NOT NULL,
    last_seen REAL NOT NULL, quota_bytes INTEGER, upload_rate INTEGER, download_rate INTEGER);
CREATE TABLE usage (android_id TEXT NOT NULL, period TEXT NOT NULL, bytes INTEGER NOT NULL,
    PRIMARY KEY (android_id, period));
INSERT INTO devices VALUES ('old-phone', 'oldph', NULL, 1.0, 2.0, 5000, NULL, NULL);
INSERT INTO usage VALUES ('old-phone', '2026-11', 1234);"""


def test_an_old_registry_gains_the_key_columns(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "registry.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.close()
    reg = Registry(path)
    record = reg.find("oldph")
    assert record is not None and record.prefix == "oldph" and record.quota_bytes == 5000
    assert record.public_key is None and record.key_bound is None
    assert reg.usage("old-phone", "2026-11") == 1234
    assert reg.key_of("old-phone") is None
    assert reg.bind("old-phone", "k" * 43 + "=")
    reg.close()
    again = Registry(path)  # migrated once; opening it again changes nothing
    assert again.key_of("old-phone") == "k" * 43 + "="
    assert again.prefix_for("old-phone") == "oldph"
    again.close()


def test_bind_is_first_come_and_unbind_forgets(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.sqlite3")
    reg.prefix_for("agent-1")
    assert reg.key_of("agent-1") is None and reg.key_of("nobody") is None
    assert reg.bind("agent-1", "first")
    assert not reg.bind("agent-1", "second")  # bound already: the first key stays
    assert reg.key_of("agent-1") == "first"
    other = Registry(tmp_path / "r.sqlite3")  # the CLI, in another process
    other.unbind("agent-1")
    other.close()
    assert reg.key_of("agent-1") == "first"  # still in this one's memory…
    reg.forget_key("agent-1")  # …until the node is told (admin socket)
    assert reg.key_of("agent-1") is None
    assert not reg.bind("nobody", "key")  # not in the registry: nothing to bind
    reg.close()
