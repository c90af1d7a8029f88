"""What a node reports: counters and histograms, the local HTTP server on
``stats_listen`` (``/metrics`` for Prometheus, ``/stats`` JSON, ``/healthz``,
``/readyz`` and the status page at ``/``), and the table ``swiftftp-proxy stats``
prints.

Per-device usage goes to Prometheus as ``swiftftp_device_relayed_bytes_total{prefix,
direction}``, for devices online at scrape time only, and only the
:data:`DEVICE_SERIES` busiest of them (bytes relayed since this node started);
the other online devices are summed under ``prefix="_other"``.  A node may
hold thousands of devices; one series per device ever seen would grow without
bound and cost Prometheus more than the figures are worth, while the busiest
online devices are the ones an operator asks about.  ``swiftftp-proxy devices
list`` gives every device's quota usage from the registry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import importlib.resources
import logging
import re
import sqlite3
import time
from collections import Counter, OrderedDict, deque
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted

from . import __version__, logs

if TYPE_CHECKING:
    from .state import Node

log = logging.getLogger("swiftftp.stats")

KINDS = ("command", "control", "data")
#: Online devices that get a ``prefix`` series of their own (the busiest); see above.
DEVICE_SERIES = 50
#: Devices whose finished sessions' bytes are remembered (least recently active dropped).
DEVICE_MEMORY = 10_000
#: Throughput history for the status page: one point per HISTORY_STEP seconds.
HISTORY_STEP = 5
HISTORY_POINTS = 120  # ten minutes
#: /readyz looks at the registry file itself (Registry.verify) at most this often, seconds.
VERIFY_EVERY = 5.0

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_DURATIONS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0)
_SIZES = tuple(float(1 << shift) for shift in range(10, 37, 3))  # 1 KiB to 64 GiB, each 8 times the last


class Stats:
    """Counters and histograms of one node (the live parts are read from the node at
    scrape time)."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.closed_bytes = [0, 0]  # up, down of finished control and data sessions
        self.quota_refusals = 0
        self.login_failures = 0
        self.throughput = (0.0, 0.0)
        self.started = time.time()
        #: True while the node's listeners accept (set by whoever started it); /readyz.
        self.listening = False
        #: (up, down) bytes of finished control and data sessions by device prefix.
        self.device_bytes: OrderedDict[str, list[int]] = OrderedDict()
        #: Mean throughput (up, down) of each HISTORY_STEP seconds, oldest first.
        self.history: deque[tuple[int, int]] = deque(maxlen=HISTORY_POINTS)
        # Histograms: registered in the node's own CollectorRegistry by serve_http.
        self.login_latency = Histogram(
            "swiftftp_login_seconds", "FTP client connected to the device's 230 reply",
            buckets=_SECONDS, registry=None,
        )
        self.rendezvous_latency = Histogram(
            "swiftftp_rendezvous_seconds",
            "Client's USER to the device logged in on the rendezvous port", buckets=_SECONDS,
            registry=None,
        )
        self.transfer_duration = Histogram(
            "swiftftp_transfer_seconds", "Duration of finished data connections",
            buckets=_DURATIONS, registry=None,
        )
        self.transfer_size = Histogram(
            "swiftftp_transfer_bytes", "Bytes moved by finished data connections (both ways)",
            buckets=_SIZES, registry=None,
        )

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1

    def histograms(self) -> list[Histogram]:
        return [self.login_latency, self.rendezvous_latency, self.transfer_duration, self.transfer_size]

    def observe_login(self, seconds: float) -> None:
        """An FTP client is in: from its connection to the device's ``230``."""
        self.login_latency.observe(max(seconds, 0.0))

    def observe_rendezvous(self, seconds: float) -> None:
        """A device took a client: from the client's ``USER`` to the device logged in
        on the rendezvous port."""
        self.rendezvous_latency.observe(max(seconds, 0.0))

    def observe_transfer(self, seconds: float, nbytes: int) -> None:
        """A data connection ended after ``seconds``, having moved ``nbytes`` both ways."""
        self.transfer_duration.observe(max(seconds, 0.0))
        self.transfer_size.observe(max(nbytes, 0))

    def session_closed(self, kind: str, prefix: str, up: int, down: int, duration: float) -> None:
        """Account a finished session: its device's bytes, and for a data connection
        the transfer histograms."""
        if kind == "command":
            return
        if prefix and prefix != "-":
            totals = self.device_bytes.pop(prefix, None) or [0, 0]
            totals[0] += up
            totals[1] += down
            self.device_bytes[prefix] = totals  # most recent last
            while len(self.device_bytes) > DEVICE_MEMORY:
                self.device_bytes.popitem(last=False)
        if kind == "data":
            self.observe_transfer(duration, up + down)

    def record_history(self, up: float, down: float) -> None:
        self.history.append((round(up), round(down)))


def relayed_bytes(node: Node) -> tuple[int, int]:
    """(up, down) bytes relayed on control and data connections, finished and live."""
    up, down = node.stats.closed_bytes
    for session in list(node.sessions):
        if session.kind != "command":
            live_up, live_down = session.counters()
            up += live_up
            down += live_down
    return up, down


def snapshot(node: Node) -> dict[str, Any]:
    """Everything ``/stats`` serves."""
    stats = node.stats
    open_by_kind = Counter(session.kind for session in list(node.sessions))
    up, down = relayed_bytes(node)
    return {
        "version": __version__,
        "relay_backend": node.backend.name,
        "uptime_seconds": round(time.time() - stats.started, 3),
        "devices_online": node.table.online,
        "sessions_open": {k: open_by_kind[k] for k in KINDS},
        "sessions_opened": {k: stats.opened[k] for k in KINDS},
        "sessions_refused": dict(stats.refused),
        "bytes": {"up": up, "down": down},
        "throughput_bytes_per_second": {
            "up": round(stats.throughput[0]), "down": round(stats.throughput[1])
        },
        "quota_refusals": stats.quota_refusals,
        "login_failures": stats.login_failures,
        "ips_locked_out": node.guard.locked_out,
        "draining": node.draining,
        # the first damage or I/O error of the registry met while running; None: none
        "registry_error": node.registry.error,
        # the server list as of the last heartbeat; None outside a fleet
        "fleet_servers": list(node.fleet.servers) if node.fleet else None,
        # why this node's usage could not reach the fleet's bucket lately; None: it did
        "fleet_usage_error": node.quota.fleet_error,
        # why the fleet's device keys could not be read lately (logins of ids not bound
        # here are accepted without proof meanwhile); None: they could, or no fleet
        "fleet_keys_error": node.keys.outage if node.keys else None,
        # mean bytes/s of each step, oldest first (the status page's sparkline)
        "throughput_history": {
            "step_seconds": HISTORY_STEP,
            "up": [up for up, _ in stats.history],
            "down": [down for _, down in stats.history],
        },
    }


def device_usage(node: Node) -> list[tuple[str, int, int]]:
    """(prefix, up, down) bytes relayed since the node started, for each online device,
    busiest first."""
    stats = node.stats
    online = {d.prefix for d in list(node.devices.values()) if d.command}
    usage = {prefix: list(stats.device_bytes.get(prefix, (0, 0))) for prefix in online}
    for session in list(node.sessions):
        if session.kind != "command" and session.prefix in usage:
            live_up, live_down = session.counters()
            usage[session.prefix][0] += live_up
            usage[session.prefix][1] += live_down
    return sorted(((p, u, d) for p, (u, d) in usage.items()), key=lambda t: (-(t[1] + t[2]), t[0]))


class NodeCollector:
    """prometheus-client collector reading a node's snapshot at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self):
        s = snapshot(self.node)
        info = InfoMetricFamily("swiftftp", "Proxy node version and relay backend")
        info.add_metric([], {"version": s["version"], "relay_backend": s["relay_backend"]})
        yield info
        yield GaugeMetricFamily("swiftftp_uptime_seconds", "Seconds since the node started",
                                value=s["uptime_seconds"])
        yield GaugeMetricFamily("swiftftp_devices_online", "Devices with an open command session",
                                value=s["devices_online"])
        g = GaugeMetricFamily("swiftftp_sessions_open", "Open sessions by kind", labels=["kind"])
        c = CounterMetricFamily("swiftftp_sessions_opened", "Sessions opened by kind", labels=["kind"])
        for kind in KINDS:
            g.add_metric([kind], s["sessions_open"][kind])
            c.add_metric([kind], s["sessions_opened"][kind])
        yield g
        yield c
        r = CounterMetricFamily("swiftftp_sessions_refused", "Connections and requests refused",
                                labels=["reason"])
        for reason, n in sorted(s["sessions_refused"].items()):
            r.add_metric([reason], n)
        yield r
        b = CounterMetricFamily("swiftftp_relayed_bytes", "Bytes relayed on control and data "
                                "connections (up: client to device)", labels=["direction"])
        t = GaugeMetricFamily("swiftftp_throughput_bytes_per_second",
                              "Relay throughput over the last second", labels=["direction"])
        for direction in ("up", "down"):
            b.add_metric([direction], s["bytes"][direction])
            t.add_metric([direction], s["throughput_bytes_per_second"][direction])
        yield b
        yield t
        yield CounterMetricFamily("swiftftp_quota_refusals", "Data connections refused over quota",
                                  value=s["quota_refusals"])
        yield CounterMetricFamily("swiftftp_login_failures", "Failed FTP logins",
                                  value=s["login_failures"])
        yield GaugeMetricFamily("swiftftp_ips_locked_out", "Client IPs locked out for guessing",
                                value=s["ips_locked_out"])
        yield GaugeMetricFamily("swiftftp_draining", "1 while the node drains before stopping",
                                value=int(s["draining"]))
        yield GaugeMetricFamily("swiftftp_registry_damaged", "1 once the registry failed while running "
                                "(damage, I/O error; see the log)", value=int(bool(s["registry_error"])))
        if s["fleet_servers"] is not None:
            yield GaugeMetricFamily("swiftftp_fleet_servers", "Nodes on the fleet's server list",
                                    value=len(s["fleet_servers"]))
            yield GaugeMetricFamily("swiftftp_fleet_usage_unreachable", "1 while this node's quota "
                                    "usage cannot reach the fleet's bucket (kept in memory meanwhile)",
                                    value=int(bool(s["fleet_usage_error"])))
            yield GaugeMetricFamily("swiftftp_fleet_keys_unreachable", "1 while the fleet's device keys "
                                    "cannot be read (ids not bound on this node are accepted without proof)",
                                    value=int(bool(s["fleet_keys_error"])))
        d = CounterMetricFamily(
            "swiftftp_device_relayed_bytes",
            f"Bytes relayed for each online device since the node started (the {DEVICE_SERIES} "
            "busiest; the rest as prefix _other)", labels=["prefix", "direction"],
        )
        usage = device_usage(self.node)
        other = [0, 0]
        for _prefix, up, down in usage[DEVICE_SERIES:]:
            other[0] += up
            other[1] += down
        rows = usage[:DEVICE_SERIES] + ([("_other", *other)] if len(usage) > DEVICE_SERIES else [])
        for prefix, up, down in rows:
            d.add_metric([prefix, "up"], up)
            d.add_metric([prefix, "down"], down)
        yield d


async def sample_throughput(node: Node, interval: float = 1.0) -> None:
    """Keep ``stats.throughput`` at the relay rate of the last ``interval`` seconds, and
    ``stats.history`` at the mean rate of every HISTORY_STEP seconds."""
    before = step_bytes = relayed_bytes(node)
    stamp = step_stamp = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now_bytes, now = relayed_bytes(node), time.monotonic()
        dt = max(now - stamp, 1e-6)
        node.stats.throughput = ((now_bytes[0] - before[0]) / dt, (now_bytes[1] - before[1]) / dt)
        before, stamp = now_bytes, now
        if now - step_stamp >= HISTORY_STEP - interval / 2:
            dt = max(now - step_stamp, 1e-6)
            node.stats.record_history((now_bytes[0] - step_bytes[0]) / dt,
                                      (now_bytes[1] - step_bytes[1]) / dt)
            step_bytes, step_stamp = now_bytes, now


def _registry_problem(path: Any, timeout: float = 0.5) -> str | None:
    """Why the registry cannot take a write now (read-only, locked, gone); None if it can.
    A connection of its own, so the node's is never held up."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        return str(exc)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        return str(exc)
    finally:
        db.close()
    return None


async def readiness(node: Node) -> list[str]:
    """Why the node should not be sent traffic now; empty when it is ready: listeners
    up, registry sound (no error met while running, the file itself checked at most
    every VERIFY_EVERY s) and writable, fleet bucket reachable at the last heartbeat,
    not draining."""
    reasons = []
    if not node.stats.listening:
        reasons.append("not listening")
    if node.draining:
        reasons.append("draining")
    damage = await asyncio.to_thread(node.registry.verify, at_most_every=VERIFY_EVERY)
    if damage:
        reasons.append(f"registry damaged: {damage}")
    else:
        problem = await asyncio.to_thread(_registry_problem, node.settings.registry_path)
        if problem:
            reasons.append(f"registry not writable: {problem}")
    error = getattr(node.fleet, "error", None) if node.fleet else None
    if error:
        reasons.append(f"fleet bucket unreachable at the last heartbeat: {error}")
    return reasons


def status_page() -> tuple[bytes, str]:
    """The status page (``status.html`` in the package) and a Content-Security-Policy
    allowing its one inline script, by hash, and nothing from elsewhere."""
    page = importlib.resources.files(__package__).joinpath("status.html").read_bytes()
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.S)
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(code).digest()).decode() + "'" for code in scripts
    )
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
              "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")
    return page, policy


def _metrics_registry(node: Node) -> CollectorRegistry:
    """The node's own registry: its collector, process metrics, its histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    for histogram in node.stats.histograms():
        registry.register(histogram)
    return registry


async def serve_http(node: Node, host: str, port: int) -> asyncio.Server:
    """The stats HTTP server: ``/`` (status page), ``/metrics``, ``/stats``,
    ``/healthz``, ``/readyz``; GET and HEAD; nothing else."""
    registry = _metrics_registry(node)
    page, policy = status_page()

    async def respond(path: str, headers: dict[str, str]) -> tuple[str, dict[str, str], bytes]:
        if path == "/metrics":
            encoder, ctype = choose_encoder(headers.get("accept", ""))
            return "200 OK", {"Content-Type": ctype}, encoder(registry)
        if path == "/stats":
            body = orjson.dumps(snapshot(node), option=orjson.OPT_INDENT_2) + b"\n"
            return "200 OK", {"Content-Type": "application/json", "Cache-Control": "no-store"}, body
        if path == "/healthz":
            return "200 OK", {"Content-Type": "text/plain; charset=utf-8"}, b"ok\n"
        if path == "/readyz":
            reasons = await readiness(node)
            if reasons:
                body = ("not ready: " + "; ".join(reasons) + "\n").encode()
                return "503 Service Unavailable", {"Content-Type": "text/plain; charset=utf-8"}, body
            return "200 OK", {"Content-Type": "text/plain; charset=utf-8"}, b"ready\n"
        if path in ("/", "/index.html"):
            return "200 OK", {"Content-Type": "text/html; charset=utf-8",
                              "Content-Security-Policy": policy}, page
        return ("404 Not Found", {"Content-Type": "text/plain; charset=utf-8"},
                b"try /, /metrics, /stats, /healthz or /readyz\n")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            lines = request.decode("latin-1").split("\r\n")
            method, path, *_ = [*lines[0].split(" "), "", ""]
            path = path.split("?", 1)[0]
            headers = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if method not in ("GET", "HEAD"):
                status, extra, body = "405 Method Not Allowed", {"Content-Type": "text/plain",
                                                                 "Allow": "GET, HEAD"}, b"GET only\n"
            else:
                status, extra, body = await respond(path, headers)
            if status.startswith("200") and gzip_accepted(headers.get("accept-encoding", "")):
                body = gzip.compress(body, compresslevel=6)
                extra["Content-Encoding"] = "gzip"
            head = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
            writer.write(
                f"HTTP/1.0 {status}\r\n{head}Content-Length: {len(body)}\r\nVary: Accept-Encoding\r\n"
                "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            async with asyncio.timeout(10):  # a scraper that does not read is let go
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            logs.event(log, "stats_request_failed", level=logging.ERROR, exc_info=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, reuse_address=True)


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``; whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_table(s: dict[str, Any]) -> str:
    """``/stats`` as a table for people."""

    size = human_bytes
    rows = [
        ("version", s["version"]),
        ("relay backend", s["relay_backend"]),
        ("uptime", f"{s['uptime_seconds']:.0f} s"),
        ("devices online", s["devices_online"]),
    ]
    for kind in KINDS:
        rows.append((f"{kind} sessions open / opened",
                     f"{s['sessions_open'][kind]} / {s['sessions_opened'][kind]}"))
    rows += [
        ("relayed up (client→device)", size(s["bytes"]["up"])),
        ("relayed down (device→client)", size(s["bytes"]["down"])),
        ("throughput up / down", f"{size(s['throughput_bytes_per_second']['up'])}/s / "
                                 f"{size(s['throughput_bytes_per_second']['down'])}/s"),
        ("quota refusals", s["quota_refusals"]),
        ("login failures", s["login_failures"]),
        ("IPs locked out", s["ips_locked_out"]),
    ]
    if s.get("draining"):
        rows.append(("draining", "yes"))
    if s.get("registry_error"):
        rows.append(("registry error", s["registry_error"]))
    if s.get("fleet_servers") is not None:
        rows.append(("fleet servers", ", ".join(s["fleet_servers"]) or "(none)"))
    for reason, n in sorted(s["sessions_refused"].items()):
        rows.append((f"refused: {reason}", n))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
