"""Settings of a proxy node: every port, timeout and limit in one place.

Sources, later ones winning: built-in defaults, a TOML file (``--config``),
``SWIFTFTP_<SECTION>_<KEY>`` environment variables, command-line flags.  Each
setting has a home ``[section]`` and ``key`` in the file::

    [limits]
    session_rate = "2M"     # bytes/s per data session; 0 = unlimited

An unknown key or a bad value is a :class:`ConfigError` whose message names
the key (``limits.session_rate: …``), never a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import socket
import tempfile
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .outbox import GRACE


def default_state_dir() -> Path:
    """Per-user state directory: ``$XDG_STATE_HOME/swiftftp`` (``~/.local/state/swiftftp``)."""
    home = os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(os.environ.get("XDG_STATE_HOME") or home) / "swiftftp"


@dataclass
class Settings:
    """Everything a node needs to run; defaults are the original deployment's."""

    # [node]
    listen: str = "0.0.0.0"
    ftp_port: int = 2121
    device_port: int = 2222
    #: Address put into 227 replies; default: the local address of the client's control socket.
    public_address: str | None = None
    state_dir: Path = field(default_factory=default_state_dir)
    #: Ports for rendezvous and passive listeners, inclusive; (0, 0) = any free port.
    data_ports: tuple[int, int] = (40000, 44999)
    relay_backend: str | None = None
    #: HTTP /metrics and /stats; None = off.
    stats_listen: tuple[str, int] | None = ("127.0.0.1", 9121)
    log_format: str = "plain"
    #: One line per finished data connection; None = ``state_dir/transfers.log``, "-" = stderr.
    transfer_log: str | None = None

    # [fleet]: nodes sharing an S3 bucket (fleet.py); no bucket, no fleet.
    fleet_bucket: str | None = None
    #: S3 endpoint URL (MinIO, Ceph, moto…); None = AWS's, credentials as boto3 finds them.
    s3_endpoint: str | None = None
    fleet_key_prefix: str = ""
    #: The name devices are given in the server list; None = public_address, else the FQDN.
    fleet_host: str | None = None
    fleet_heartbeat: float = 30.0
    fleet_servers_key: str = "servers"

    # [tls]: the node's certificate and key (PEM files), and the TLS device port.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: Devices that dial over TLS (swiftftp-agent --tls) come here; 0 = off.
    tls_device_port: int = 0

    # [timeouts], seconds (docs/protocol.md: 2 min client login, 10 s device login, 30 min silence).
    client_login_timeout: float = 120.0
    device_login_timeout: float = 10.0
    idle_timeout: float = 1800.0
    keepalive_interval: float = 50.0
    #: For the device to take a client: notify, connect, log in on the port. The
    #: deployed device takes one client per two round trips (docs/protocol.md):
    #: 16 clients at once on a 400 ms round trip need 13 s.
    rendezvous_timeout: float = 30.0
    pasv_accept_timeout: float = 10.0
    #: How long a passive listener waits for a client and for data_pasv_accept at all.
    pasv_listen_timeout: float = 120.0
    connect_timeout: float = 10.0
    #: On SIGTERM, how long FTP clients and transfers already running may take to finish.
    drain_timeout: float = 30.0
    #: Every write to a client or a device: a peer that takes nothing for this long is closed.
    send_timeout: float = 30.0
    #: After a message the device's TCP acknowledged, before the next may follow when
    #: the round trip was shorter than this (outbox.GRACE has the measurement).
    device_grace: float = GRACE

    # [limits]; rates in bytes/s, 0 = unlimited; None = same as the two-way rate.
    session_rate: int = 0
    session_upload_rate: int | None = None
    session_download_rate: int | None = None
    device_rate: int = 0
    device_upload_rate: int | None = None
    device_download_rate: int | None = None
    node_rate: int = 0
    node_upload_rate: int | None = None
    node_download_rate: int | None = None
    #: Token-bucket depth in bytes; 0 = 50 ms worth of the rate (at least 16 KiB).
    burst: int = 0
    #: Devices online at once; 0 = half the descriptor limit (limits.Capacity).
    max_command_sessions: int = 0
    #: Connections not logged in yet, node-wide (FTP clients until the device's 230,
    #: devices until their login); 0 = a quarter of the descriptor limit.
    max_pending_connections: int = 0
    max_control_per_device: int = 16
    max_data_per_device: int = 32
    max_pending_listeners: int = 2000
    max_connections_per_ip: int = 64
    #: Device-port connections from one IP that have not logged in yet (a phone logs in
    #: within a round trip; many phones share a carrier NAT address).
    max_pending_logins_per_ip: int = 32
    #: First logins of unknown device ids from one IP per hour (each takes a prefix).
    max_new_devices_per_ip: int = 60
    max_login_failures: int = 3
    #: Prefix guessing: this many failed logins from one IP within guess_window
    #: seconds lock that IP out for guess_lockout seconds.
    guess_max_failures: int = 10
    guess_window: float = 600.0
    guess_lockout: float = 900.0
    #: A failed login is answered after this pause (slows guessing on one connection).
    failure_delay: float = 1.0
    #: Failed guesses (unknown prefixes, a device's 530 to PASS) per second, node-wide:
    #: guessing spread over many addresses gets no more than this.
    guess_rate: float = 10.0
    #: IPv6 addresses count for per-address limits by this prefix (/64: a subscriber's).
    ipv6_prefix: int = 64

    # [quota]
    #: Bytes per device per period (control and data, both ways); 0 = unlimited.
    quota_bytes: int = 0
    quota_period: str = "month"
    #: Usage is written to the registry at least this often (and at session end).
    quota_flush_interval: float = 5.0

    # [tls]: FTPS terminated at the node (tls.py); no certificate, no TLS.
    #: PEM certificate chain (end-entity first) and its private key; SIGHUP re-reads both.
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    #: Implicit FTPS (TLS from the first byte) on this port of ``listen``; 0 = off.
    tls_implicit_port: int = 0
    #: Every FTP client must use TLS: a plain one is refused before its USER is relayed.
    tls_require: bool = False
    #: ``PROT P`` before any data connection (PASV, EPSV, PORT, EPRT), else 521.
    tls_require_data_protection: bool = False
    #: A ``PROT P`` data connection must resume its control connection's TLS session
    #: (vsftpd's ``require_ssl_reuse``, default on there too): a stranger who learnt the
    #: port cannot take the transfer. FileZilla, lftp, curl and ftplib all resume.
    tls_require_session_reuse: bool = True

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    def rates(self, scope: str) -> tuple[int, int]:
        """(upload, download) bytes/s for ``scope`` in session, device, node."""
        both = getattr(self, f"{scope}_rate")
        up = getattr(self, f"{scope}_upload_rate")
        down = getattr(self, f"{scope}_download_rate")
        return (both if up is None else up), (both if down is None else down)


# ---- value parsers: each raises ValueError with a short reason -------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.I)


def parse_bytes(value: Any) -> int:
    """An amount of bytes: ``1500000``, ``"1.5M"``, ``"10MiB"`` (k/M/G/T: 1000s; Ki…: 1024s)."""
    if isinstance(value, bool):
        raise ValueError("expected a number of bytes")
    if isinstance(value, int | float):
        number, unit, binary = float(value), "", ""
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        number, unit, binary = float(m[1]), m[2].lower(), m[3]
    else:
        raise ValueError(f"expected a number of bytes like 1500000 or '10M', got {value!r}")
    scale = (1024 if binary else 1000) ** " kmgt".index(unit or " ")
    result = int(number * scale)
    if result < 0:
        raise ValueError("must be >= 0")
    return result


def _optional_bytes(value: Any) -> int | None:
    return None if value in (None, "") else parse_bytes(value)


def _int(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(value: Any) -> float:
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected seconds, got {value!r}") from None
    if isinstance(value, bool) or not 0 <= result < 1e9:
        raise ValueError(f"expected seconds >= 0, got {value!r}")
    return result


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional_text(value: Any) -> str | None:
    return _text(value) or None


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> Any:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(o for o in options if o)}, got {value!r}")
        return value or None  # "" = the default

    return parse


def parse_port_range(value: Any) -> tuple[int, int]:
    """``"40000-44999"``, ``[40000, 44999]``, or ``"0"`` for any free port."""
    if isinstance(value, list) and len(value) == 2:
        low, high = value
    elif isinstance(value, str):
        low, _, high = value.partition("-")
        high = high or low
    else:
        raise ValueError(f"expected 'LOW-HIGH', got {value!r}")
    port = _int(0, 65535)
    low, high = port(low.strip() if isinstance(low, str) else low), port(
        high.strip() if isinstance(high, str) else high
    )
    if low > high or (low == 0) != (high == 0):
        raise ValueError(f"bad port range {value!r}")
    return low, high


def parse_host_port(value: Any) -> tuple[str, int]:
    """``"127.0.0.1:9121"`` or ``"[::1]:9121"``."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected 'ADDR:PORT', got {value!r}")
    host, _, port = value.rpartition(":")
    return host.strip("[]"), _int(0, 65535)(port)


def _optional_host_port(value: Any) -> tuple[str, int] | None:
    return None if value in ("", "off", None) else parse_host_port(value)


def _optional_ip(value: Any) -> str | None:
    """An IP address (what 227 replies carry), or ``""`` for none."""
    text = _text(value).strip()
    if not text:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"expected an IP address, got {value!r}") from None


def _listen_address(value: Any) -> str:
    text = _text(value).strip().strip("[]")
    if not text:
        raise ValueError("expected an address to listen on, e.g. 0.0.0.0 or ::")
    return text


def _path(value: Any) -> Path:
    return Path(os.path.expanduser(_text(value)))


def _optional_path(value: Any) -> Path | None:
    return _path(value) if _text(value).strip() else None


def _bool(value: Any) -> bool:
    """``true``/``false`` in TOML; ``1``, ``0``, ``yes``, ``no``, ``true``, ``false`` in the
    environment."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "yes", "true", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    attr: str
    parse: Callable[[Any], Any]
    #: Takes effect on SIGHUP without a restart.
    reloadable: bool = False


def _options() -> list[Option]:
    seconds, count = _seconds, _int(0, 10**9)
    node = [
        ("listen", "listen", _listen_address), ("ftp_port", "ftp_port", _int(0, 65535)),
        ("device_port", "device_port", _int(0, 65535)),
        ("public_address", "public_address", _optional_ip), ("state_dir", "state_dir", _path),
        ("data_ports", "data_ports", parse_port_range),
        ("relay", "relay_backend", _choice("", "rust", "python")),
        ("stats_listen", "stats_listen", _optional_host_port),
        ("log_format", "log_format", _choice("plain", "json")),
        ("transfer_log", "transfer_log", _optional_text),
    ]
    timeouts = [
        ("client_login", "client_login_timeout"), ("device_login", "device_login_timeout"),
        ("idle", "idle_timeout"), ("keepalive", "keepalive_interval"),
        ("rendezvous", "rendezvous_timeout"), ("pasv_accept", "pasv_accept_timeout"),
        ("pasv_listen", "pasv_listen_timeout"), ("connect", "connect_timeout"),
        ("drain", "drain_timeout"), ("send", "send_timeout"),
        ("device_grace", "device_grace"),
    ]
    limits: list[tuple[str, Callable[[Any], Any]]] = []
    for scope in ("session", "device", "node"):
        limits += [(f"{scope}_rate", parse_bytes), (f"{scope}_upload_rate", _optional_bytes),
                   (f"{scope}_download_rate", _optional_bytes)]
    limits += [
        ("burst", parse_bytes), ("max_command_sessions", count), ("max_pending_connections", count),
        ("max_control_per_device", count), ("max_data_per_device", count),
        ("max_pending_listeners", count), ("max_connections_per_ip", count),
        ("max_pending_logins_per_ip", count), ("max_new_devices_per_ip", count),
        ("max_login_failures", _int(1, 1000)), ("guess_max_failures", _int(1, 10**6)),
        ("guess_window", seconds), ("guess_lockout", seconds), ("failure_delay", seconds),
        ("guess_rate", seconds), ("ipv6_prefix", _int(1, 128)),
    ]
    quota = [
        ("bytes", "quota_bytes", parse_bytes),
        ("period", "quota_period", _choice("month", "week", "day", "total")),
        ("flush_interval", "quota_flush_interval", seconds),
    ]
    fleet = [
        ("bucket", "fleet_bucket", _optional_text), ("s3_endpoint", "s3_endpoint", _optional_text),
        ("key_prefix", "fleet_key_prefix", _text), ("host", "fleet_host", _optional_text),
        ("heartbeat", "fleet_heartbeat", seconds), ("servers_key", "fleet_servers_key", _text),
    ]
    tls = [
        ("certificate", "tls_certificate", _optional_path, True),
        ("key", "tls_key", _optional_path, True),
        ("implicit_port", "tls_implicit_port", _int(0, 65535), False),
        ("require", "tls_require", _bool, False),
        ("require_data_protection", "tls_require_data_protection", _bool, False),
        ("require_session_reuse", "tls_require_session_reuse", _bool, False),
        ("device_port", "tls_device_port", _int(0, 65535), False),
    ]
    return (
        [Option("node", k, a, p) for k, a, p in node]
        + [Option("fleet", k, a, p) for k, a, p in fleet]
        + [Option("timeouts", k, a, seconds, reloadable=True) for k, a in timeouts]
        + [Option("limits", k, k, p, reloadable=True) for k, p in limits]
        + [Option("quota", k, a, p, reloadable=True) for k, a, p in quota]
        + [Option("tls", k, a, p, reloadable=r) for k, a, p, r in tls]
    )


OPTIONS = _options()
_BY_NAME = {(o.section, o.key): o for o in OPTIONS}
_BY_ATTR = {o.attr: o for o in OPTIONS}
assert set(_BY_ATTR) == {f.name for f in fields(Settings)}, "every setting needs an Option"


#: ``SWIFTFTP_…`` variables that are not settings: read by the relay, the event loop
#: choice, kernel TLS, the test tools (and every ``SWIFTFTP_BENCH_…``, the benches').
OTHER_ENV = frozenset({
    "SWIFTFTP_RELAY", "SWIFTFTP_RELAY_WORKERS", "SWIFTFTP_RELAY_PIPE_SIZE", "SWIFTFTP_LOOP",
    "SWIFTFTP_KTLS", "SWIFTFTP_FTP_TOOLS",
})
SECTIONS = tuple(dict.fromkeys(o.section for o in OPTIONS))


def env_name(option: Option) -> str:
    """The environment variable overriding ``option``: ``SWIFTFTP_<SECTION>_<KEY>``."""
    return f"SWIFTFTP_{option.section}_{option.key}".upper()


_BY_ENV = {env_name(o): o for o in OPTIONS}


@dataclass
class Loaded:
    """The outcome of reading every source: the settings, where each value came from,
    and every problem found (empty: the settings are good)."""

    settings: Settings
    #: Attribute name → ``FILE:LINE``, ``SWIFTFTP_…`` or ``command line`` (defaults absent).
    sources: dict[str, str]
    #: One line each, ``section.key: what is wrong (where)``.
    issues: list[str]


_BARE_KEY = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_DOTTED_KEY = rf"{_BARE_KEY}(?:\s*\.\s*{_BARE_KEY})*"
_MULTILINE_QUOTES = ('"' * 3, "'" * 3)


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in re.findall(_BARE_KEY, key))


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Line numbers (from 1) of the tables and keys of a TOML document, by dotted path
    (``("limits", "session_rate")``): tomllib gives values, not their places.  A line
    scanner, enough for configuration files: table headers, ``key =`` lines (dotted and
    quoted keys, one level of inline table); the insides of multi-line strings skipped."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_quote: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if open_quote:
            if line.count(open_quote) % 2:
                open_quote = None
            continue
        if not line or line.startswith("#"):
            continue
        if m := re.match(rf"^\[\[?\s*({_DOTTED_KEY})\s*\]", line):
            table = _split_key(m[1])
            lines.setdefault(table, number)
            continue
        if m := re.match(rf"^({_DOTTED_KEY})\s*=(.*)$", line):
            path = table + _split_key(m[1])
            for i in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:i], number)
            rest = m[2]
            for inner in re.findall(rf"[{{,]\s*({_BARE_KEY})\s*=", rest):
                lines.setdefault((*path, *_split_key(inner)), number)
            for quote in _MULTILINE_QUOTES:
                if rest.count(quote) % 2:
                    open_quote = quote
    return lines


def _suggest(section: str, key: str) -> str:
    """``; did you mean limits.burst?`` for a misspelt or misplaced key, else ``""``."""
    homes = [f"{o.section}.{o.key}" for o in OPTIONS if o.key == key and o.section != section]
    if homes:
        return f"; did you mean {homes[0]}?"
    if section in SECTIONS:
        keys = [o.key for o in OPTIONS if o.section == section]
        if close := difflib.get_close_matches(key, keys, n=1, cutoff=0.6):
            return f"; did you mean {section}.{close[0]}?"
    names = [f"{o.section}.{o.key}" for o in OPTIONS]
    if close := difflib.get_close_matches(f"{section}.{key}", names, n=1, cutoff=0.75):
        return f"; did you mean {close[0]}?"
    return ""


def _read_document(path: Path | str, issues: list[str]) -> tuple[dict[str, Any], str]:
    try:
        text = Path(path).read_bytes().decode("utf-8")
        return tomllib.loads(text), text
    except OSError as exc:
        issues.append(f"{path}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        issues.append(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}")
    except tomllib.TOMLDecodeError as exc:
        issues.append(f"{path}: not valid TOML: {exc}")
    return {}, ""


def _not_a_table(section: str, value: Any, where: str) -> str:
    """The message for ``section = value`` outside any table."""
    if section in SECTIONS:
        return f"{section}: expected a [{section}] table, got {value!r} ({where})"
    homes = [o.section for o in OPTIONS if o.key == section]
    if homes:
        return f"{section}: a setting outside any table; put it under [{homes[0]}] ({where})"
    names = {f"[{s}]": s for s in SECTIONS} | {f"{o.section}.{o.key}": o.key for o in OPTIONS}
    close = difflib.get_close_matches(section, list(names.values()), n=1, cutoff=0.7)
    hint = f"; did you mean {next(n for n, v in names.items() if v == close[0])}?" if close else ""
    return f"{section}: unknown setting outside any table{hint} ({where})"


def load(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Loaded:
    """Defaults ← TOML file ← ``SWIFTFTP_<SECTION>_<KEY>`` ← ``overrides`` (by attribute
    name), collecting every problem instead of stopping at the first."""
    settings = Settings()
    sources: dict[str, str] = {}
    issues: list[str] = []

    def apply(option: Option, value: Any, source: str) -> None:
        nonlocal settings
        try:
            parsed = option.parse(value)
        except ValueError as exc:
            issues.append(f"{option.section}.{option.key}: {exc} ({source})")
            return
        settings = replace(settings, **{option.attr: parsed})
        sources[option.attr] = source

    if path is not None:
        document, text = _read_document(path, issues)
        places = key_lines(text)

        def where(*keys: str) -> str:
            line = places.get(keys) or places.get(keys[:1])
            return f"{path}:{line}" if line else str(path)

        for section, table in document.items():
            if not isinstance(table, dict):
                issues.append(_not_a_table(section, table, where(section)))
                continue
            for key, value in table.items():
                option = _BY_NAME.get((section, key))
                if option is None:
                    issues.append(f"{section}.{key}: unknown setting{_suggest(section, key)} "
                                  f"({where(section, key)})")
                else:
                    apply(option, value, where(section, key))
    env = os.environ if env is None else env
    for name in sorted(env):
        if not name.startswith("SWIFTFTP_") or name in OTHER_ENV or name.startswith("SWIFTFTP_BENCH_"):
            continue
        option = _BY_ENV.get(name)
        if option is None:
            close = difflib.get_close_matches(name, [*_BY_ENV, *OTHER_ENV], n=1, cutoff=0.75)
            hint = f"; did you mean {close[0]}?" if close else ""
            issues.append(f"{name}: unknown environment variable{hint} (environment)")
        else:
            apply(option, env[name], name)
    for attr, value in (overrides or {}).items():
        if value is not None:
            apply(_BY_ATTR[attr], value, "command line")
    return Loaded(settings, sources, issues)


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Defaults ← TOML file ← ``SWIFTFTP_<SECTION>_<KEY>`` ← ``overrides`` (by attribute
    name).  Raises :class:`ConfigError` naming the first problem (``issues`` has all)."""
    loaded = load(path, env, overrides)
    if loaded.issues:
        raise ConfigError(loaded.issues[0], loaded.issues)
    return loaded.settings


# ---- checks against this machine: addresses, directories -------------------------------

RESOLVE_TIMEOUT = 5.0


def resolve(host: str, timeout: float = RESOLVE_TIMEOUT) -> list[tuple[int, str]]:
    """(family, address) pairs of ``host``: an IP literal at once, a name through the
    resolver within ``timeout`` seconds; ``ValueError`` with the reason otherwise."""
    try:
        ip = ipaddress.ip_address(host)
        return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"not an IP address or host name: {host!r}")
    found: list[Any] = []

    def lookup() -> None:
        try:
            found.append(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            found.append(exc)

    worker = threading.Thread(target=lookup, name="resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if not found:
        raise ValueError(f"cannot resolve {host!r} within {timeout:g} s")
    if isinstance(found[0], Exception):
        reason = getattr(found[0], "strerror", None) or str(found[0])
        raise ValueError(f"cannot resolve {host!r}: {reason}")
    return [(family, address[0]) for family, _, _, _, address in found[0]]


def check_address(host: str) -> None:
    """``ValueError`` unless ``host`` resolves to an address of this machine (one a
    socket can be bound to)."""
    family, address = resolve(host)[0]
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host!r}: {exc.strerror or exc}") from None


def _writable_dir(path: Path, create: bool) -> str | None:
    """Why ``path`` cannot serve as a writable directory; None when it can.  A missing
    one is made to try it, and removed again unless ``create``."""
    made: list[Path] = []
    try:
        if path.exists():
            if not path.is_dir():
                return f"{path} is not a directory"
        else:
            missing = [path, *(p for p in path.parents if not p.exists())]
            for directory in reversed(missing):
                try:
                    directory.mkdir()
                except FileExistsError:
                    continue
                except OSError as exc:
                    return f"cannot create {path}: {exc.strerror or exc}"
                made.append(directory)
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".swiftftp-probe-"):
                pass
        except OSError as exc:
            return f"{path} is not writable: {exc.strerror or exc}"
        return None
    finally:
        if not create:
            for directory in reversed(made):
                with contextlib.suppress(OSError):
                    directory.rmdir()


def check_environment(loaded: Loaded, create: bool = False) -> list[str]:
    """Problems of valid settings on this machine, one line each like parse errors:
    a listen address that does not resolve to a local address, a state directory (or
    transfer log) neither writable nor creatable, a registry that cannot be written.
    ``create`` makes a missing state directory (``serve``); ``check-config`` does not."""
    s, issues = loaded.settings, []

    def source(attr: str) -> str:
        return loaded.sources.get(attr, "default")

    try:
        check_address(s.listen)
    except ValueError as exc:
        issues.append(f"node.listen: {exc} ({source('listen')})")
    if s.stats_listen:
        try:
            check_address(s.stats_listen[0] or "0.0.0.0")
        except ValueError as exc:
            issues.append(f"node.stats_listen: {exc} ({source('stats_listen')})")
    problem = _writable_dir(s.state_dir, create)
    if problem:
        issues.append(f"node.state_dir: {problem} ({source('state_dir')})")
    elif s.registry_path.exists() and not os.access(s.registry_path, os.R_OK | os.W_OK):
        issues.append(f"node.state_dir: the registry {s.registry_path} is not writable "
                      f"({source('state_dir')})")
    if s.transfer_log and s.transfer_log != "-":
        log_path = Path(s.transfer_log).expanduser()
        problem = _writable_dir(log_path.parent, create)
        if problem is None and log_path.exists() and not os.access(log_path, os.W_OK):
            problem = f"{log_path} is not writable"
        if problem:
            issues.append(f"node.transfer_log: {problem} ({source('transfer_log')})")
    issues += _check_tls(s, source)
    return issues


def _check_tls(s: Settings, source: Callable[[str], str]) -> list[str]:
    """The ``[tls]`` settings on this machine: both files or neither, readable, a pair
    the TLS engine takes (not expired, the key matching), and a relay that can do TLS."""
    issues = []
    if not (s.tls_certificate or s.tls_key):
        for attr in ("tls_implicit_port", "tls_require", "tls_require_data_protection", "tls_device_port"):
            if getattr(s, attr):
                key = _BY_ATTR[attr].key
                issues.append(f"tls.{key}: needs tls.certificate and tls.key ({source(attr)})")
        return issues
    if not (s.tls_certificate and s.tls_key):
        missing = "tls.key" if s.tls_certificate else "tls.certificate"
        attr = "tls_certificate" if s.tls_certificate else "tls_key"
        issues.append(f"{missing}: missing; tls.{_BY_ATTR[attr].key} is set ({source(attr)})")
        path = getattr(s, attr)
        if not os.access(path, os.R_OK):
            issues.append(f"tls.{_BY_ATTR[attr].key}: cannot read {path} ({source(attr)})")
        return issues
    from . import tls

    try:
        tls.load_pair(s)
    except ConfigError as exc:
        issues.append(f"{exc} ({source('tls_certificate')})")
    if s.tls_device_port and s.tls_device_port in (s.ftp_port, s.device_port, s.tls_implicit_port):
        issues.append(f"tls.device_port: {s.tls_device_port} is already another of the node's ports "
                      f"({source('tls_device_port')})")
    if s.tls_implicit_port and s.tls_implicit_port in (s.ftp_port, s.device_port):
        issues.append(f"tls.implicit_port: {s.tls_implicit_port} is already node.ftp_port or "
                      f"node.device_port ({source('tls_implicit_port')})")
    if s.relay_backend == "python" or os.environ.get("SWIFTFTP_RELAY", "").strip().lower() == "python":
        issues.append("node.relay: the python relay cannot terminate TLS; use the rust relay "
                      f"or remove tls.certificate ({source('relay_backend')})")
    return issues


def describe(settings: Settings) -> list[str]:
    """The effective settings, one ``section.key = value`` line each."""
    lines = []
    for option in OPTIONS:
        value = getattr(settings, option.attr)
        if isinstance(value, tuple) and option.key == "data_ports":
            text = f'"{value[0]}-{value[1]}"'
        elif isinstance(value, tuple):
            text = f'"{value[0]}:{value[1]}"'
        elif value is None:
            text = '""'
        elif isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str | Path):
            text = f'"{value}"'
        else:
            text = str(value)
        lines.append(f"{option.section}.{option.key} = {text}")
    return lines


def reloadable_changes(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(settings a reload applies, settings that need a restart) that differ."""
    applied, ignored = [], []
    for option in OPTIONS:
        if getattr(old, option.attr) != getattr(new, option.attr):
            (applied if option.reloadable else ignored).append(f"{option.section}.{option.key}")
    return applied, ignored
