

def test_a_node_starts_on_a_registry_from_before_device_keys(tmp_path: Path) -> None:
    """A registry file of an earlier version (no key columns) is migrated at start: its
    devices keep their prefixes, and are not bound."""
    import sqlite3

    from tests.unit.test_registry import OLD_SCHEMA

    state = tmp_path / "node"
    state.mkdir()
    db = sqlite3.connect(state / "registry.sqlite3")
    db.executescript(OLD_SCHEMA.replace("old-phone", "f1e1dd-old").replace("oldph", "oldpx"))
    db.close()
    proxy = ProxyThread(node_settings(state))
    try:
        device = FieldDevice(proxy.device_port, android_id="f1e1dd-old").start()
        assert device.prefix == "oldpx"
        device.stop()
        assert not device.errors
    finally:
        proxy.close()
    site = Site(proxy, None, None, tmp_path, state)  # type: ignore[arg-type]
    done = cli(site, "show", "oldpx")
    assert done.returncode == 0, done.stderr
    assert "not bound" in done.stdout and "quota" in done.stdout
