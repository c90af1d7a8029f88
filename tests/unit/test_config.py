"""Configuration: file, environment and flags; errors that name the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from swiftftp.config import Settings, describe, load_settings, parse_bytes, reloadable_changes
from swiftftp.errors import ConfigError
from swiftftp.quota import period_key


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_original_deployment() -> None:
    s = load_settings(env={})
    assert (s.ftp_port, s.device_port, s.listen) == (2121, 2222, "0.0.0.0")
    assert (s.client_login_timeout, s.device_login_timeout, s.idle_timeout) == (120, 10, 1800)
    assert s.keepalive_interval == 50 and s.session_rate == 0


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
ftp_port = 2100
data_ports = "50000-50100"
[limits]
session_rate = "2M"
device_download_rate = "1MiB"
[quota]
bytes = "10G"
period = "day"
""")
    s = load_settings(path, env={"SWIFTFTP_NODE_FTP_PORT": "2200", "SWIFTFTP_LIMITS_BURST": "64k"})
    assert s.ftp_port == 2200 and s.data_ports == (50000, 50100)
    assert s.session_rate == 2_000_000 and s.burst == 64_000
    assert s.rates("session") == (2_000_000, 2_000_000)
    assert s.rates("device") == (0, 1 << 20)
    assert s.quota_bytes == 10**10 and s.quota_period == "day"
    s = load_settings(path, env={"SWIFTFTP_NODE_FTP_PORT": "2200"}, overrides={"ftp_port": "2300"})
    assert s.ftp_port == 2300


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[limits]\nsession_rte = 5\n", "limits.session_rte"),
        ("[limits]\nsession_rate = -5\n", "limits.session_rate"),
        ("[limits]\nsession_rate = \"fast\"\n", "limits.session_rate"),
        ("[node]\nftp_port = 70000\n", "node.ftp_port"),
        ("[node]\ndata_ports = \"9-3\"\n", "node.data_ports"),
        ("[quota]\nperiod = \"fortnight\"\n", "quota.period"),
        ("[timeouts]\nidle = \"soon\"\n", "timeouts.idle"),
        ("[nodes]\nftp_port = 1\n", "nodes.ftp_port"),
        ("limits = 5\n", "limits"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}[:]"):
        load_settings(write(tmp_path, text), env={})


def test_bad_env_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"limits\.session_rate.*SWIFTFTP_LIMITS_SESSION_RATE"):
        load_settings(env={"SWIFTFTP_LIMITS_SESSION_RATE": "x"})


def test_check_config_command(tmp_path: Path) -> None:
    good = write(tmp_path, "[limits]\nsession_rate = 1000\n")
    done = subprocess.run([sys.executable, "-m", "swiftftp", "check-config", str(good)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert "limits.session_rate = 1000" in done.stdout.splitlines()
    bad = write(tmp_path, "[limits]\nsession_rate = \"lots\"\n")
    done = subprocess.run([sys.executable, "-m", "swiftftp", "check-config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.session_rate" in lines[0] and "Traceback" not in done.stderr


def test_describe_round_trips(tmp_path: Path) -> None:
    s = load_settings(env={})
    text = "\n".join(describe(s))
    # the printed settings are themselves a valid config file (sections.keys → tables)
    tables: dict[str, list[str]] = {}
    for line in text.splitlines():
        section, rest = line.split(".", 1)
        tables.setdefault(section, []).append(rest)
    doc = "\n".join(f"[{k}]\n" + "\n".join(v) for k, v in tables.items())
    again = load_settings(write(tmp_path, doc), env={})
    assert again == s


def test_reload_tells_what_needs_a_restart() -> None:
    old = Settings()
    new = Settings(session_rate=5, ftp_port=2000)
    applied, ignored = reloadable_changes(old, new)
    assert applied == ["limits.session_rate"] and ignored == ["node.ftp_port"]


@pytest.mark.parametrize(("text", "value"), [
    (0, 0), (1500, 1500), ("1500", 1500), ("1.5k", 1500), ("2M", 2_000_000), ("2MB", 2_000_000),
    ("1KiB", 1024), ("1 GiB", 1 << 30), ("10g", 10**10),
])
def test_parse_bytes(text: object, value: int) -> None:
    assert parse_bytes(text) == value


def test_periods() -> None:
    from datetime import UTC, datetime

    t = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)
    assert period_key("month", t) == "2026-11"
    assert period_key("day", t) == "2026-11-24"
    assert period_key("week", t) == "2026-W48"
    assert period_key("total", t) == "total"


# ---- check-config: every problem, with its line --------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def check_config(path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SWIFTFTP_")} | env
    return subprocess.run([sys.executable, "-m", "swiftftp", "check-config", str(path)],
                          capture_output=True, text=True, timeout=30, env=environ)


def test_check_config_reports_every_problem_with_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
listen = "0.0.0.0"
[node]
listen = "0.0.0.O"
ftp_prot = 21
public_address = "proxy.example.org"

[limits]
sesion_rate = "2M"
idle = 5
burst = "lots"

[nodes]
ftp_port = 1
""")
    done = check_config(path, SWIFTFTP_LIMITS_SESION_RATE="1M")
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    expected = [
        f"listen: a setting outside any table; put it under [node] ({path}:1)",
        f"node.ftp_prot: unknown setting; did you mean node.ftp_port? ({path}:4)",
        f"node.public_address: expected an IP address, got 'proxy.example.org' ({path}:5)",
        f"limits.sesion_rate: unknown setting; did you mean limits.session_rate? ({path}:8)",
        f"limits.idle: unknown setting; did you mean timeouts.idle? ({path}:9)",
        f"limits.burst: expected a number of bytes like 1500000 or '10M', got 'lots' ({path}:10)",
        f"nodes.ftp_port: unknown setting; did you mean node.ftp_port? ({path}:13)",
        "SWIFTFTP_LIMITS_SESION_RATE: unknown environment variable; "
        "did you mean SWIFTFTP_LIMITS_SESSION_RATE? (environment)",
    ]
    assert [line.removeprefix("swiftftp-proxy: config error: ") for line in lines[:-1]] == expected
    # the listen address is resolved: "0.0.0.O" is a host name nobody resolves
    assert re.fullmatch(rf"swiftftp-proxy: config error: node\.listen: cannot resolve '0\.0\.0\.O': .+ "
                        rf"\({re.escape(str(path))}:3\)", lines[-1]), lines[-1]


@pytest.mark.parametrize(("text", "message"), [
    ("ftp_port = 21\n", "ftp_port: a setting outside any table; put it under [node] (FILE:1)"),
    ("limits = 5\n", "limits: expected a [limits] table, got 5 (FILE:1)"),
    ("bogus = 1\n", "bogus: unknown setting outside any table (FILE:1)"),
    ("ftp_prot = 1\n", "ftp_prot: unknown setting outside any table; did you mean node.ftp_port? (FILE:1)"),
    ("limit = 1\n", "limit: unknown setting outside any table; did you mean [limits]? (FILE:1)"),
    ('# a comment\n\n[node]\n"state_dir" = 5\n', "node.state_dir: expected a string, got 5 (FILE:4)"),
    ("node.ftp_port = 70000\n", "node.ftp_port: must be between 0 and 65535, got 70000 (FILE:1)"),
    ("[limits]\nburst = '''\nx\n'''\nsession_rate = 'y'\n",
     "limits.burst: expected a number of bytes like 1500000 or '10M', got 'x\\n' (FILE:2)"),
    ("node = { listen = 'x y' }\n", "node.listen: not an IP address or host name: 'x y' (FILE:1)"),
])
def test_config_messages(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    done = check_config(path)
    assert done.returncode == 2
    first = done.stderr.splitlines()[0].removeprefix("swiftftp-proxy: config error: ")
    assert first == message.replace("FILE", str(path))


def test_check_config_checks_the_state_dir(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    done = check_config(write(tmp_path, f'[node]\nstate_dir = "{tmp_path}/a-file/state"\n'))
    assert done.returncode == 2
    assert f"node.state_dir: cannot create {tmp_path}/a-file/state: Not a directory" in done.stderr
    # creatable is good, and check-config creates nothing
    done = check_config(write(tmp_path, f'[node]\nstate_dir = "{tmp_path}/new/state"\n'))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "new").exists()


def test_check_config_ok_line_and_settings(tmp_path: Path) -> None:
    path = write(tmp_path, f'[node]\nstate_dir = "{tmp_path}"\n[limits]\nsession_rate = "2M"\n')
    done = check_config(path, SWIFTFTP_QUOTA_PERIOD="day")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "limits.session_rate = 2000000" in lines and 'quota.period = "day"' in lines
    assert lines[-1] == f"# OK: {path}"
    assert done.stderr == ""


def test_sample_config_has_every_setting_at_its_default() -> None:
    """contrib/node.toml passes check-config; uncommenting every ``#key = value`` line
    gives every setting once, each at its default (state_dir: the unit's)."""
    sample = ROOT / "contrib" / "node.toml"
    done = check_config(sample)
    assert done.returncode == 0, done.stderr
    text = re.sub(r"(?m)^#([a-z0-9_]+ = )", r"\1", sample.read_text())
    import tomllib

    document = tomllib.loads(text)
    from swiftftp.config import OPTIONS

    assert {(s, k) for s, table in document.items() for k in table} == {(o.section, o.key) for o in OPTIONS}
    loaded = load_settings_from_text(text)
    assert replace(loaded, state_dir=Settings().state_dir) == Settings()
    assert str(loaded.state_dir) == "/var/lib/swiftftp"


def load_settings_from_text(text: str) -> Settings:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        return load_settings(f.name, env={})


def test_tls_device_port_needs_a_readable_certificate_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, f"""\
[node]
state_dir = "{tmp_path / 'state'}"
[tls]
key = "{tmp_path / 'missing.key'}"
device_port = 2223
""")
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"swiftftp-proxy: config error: tls.certificate: missing; tls.key is set ({path}:4)",
        f"swiftftp-proxy: config error: tls.key: cannot read {tmp_path / 'missing.key'} ({path}:4)",
    ]
    settings = load_settings(path, env={})
    assert (settings.tls_device_port, settings.tls_certificate) == (2223, None)
