"""The SQLite device registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from swiftftp.registry import AccountExists, Registry


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
