"""What a node reports: counters, ``/metrics`` (Prometheus) and ``/stats`` (JSON)
on a small local HTTP server, and the table ``swiftftp-proxy stats`` prints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from . import __version__

if TYPE_CHECKING:
    from .state import Node

log = logging.getLogger("swiftftp.stats")

KINDS = ("command", "control", "data")


class Stats:
    """Counters of one node (the live parts are read from the node at scrape time)."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.closed_bytes = [0, 0]  # up, down of finished control and data sessions
        self.quota_refusals = 0
        self.login_failures = 0
        self.throughput = (0.0, 0.0)
        self.started = time.time()

    def refuse(self, reason: str) -> None:
        self.refused[reason] += 1


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
        # the server list as of the last heartbeat; None outside a fleet
        "fleet_servers": list(node.fleet.servers) if node.fleet else None,
    }


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
        if s["fleet_servers"] is not None:
            yield GaugeMetricFamily("swiftftp_fleet_servers", "Nodes on the fleet's server list",
                                    value=len(s["fleet_servers"]))


async def sample_throughput(node: Node, interval: float = 1.0) -> None:
    """Keep ``stats.throughput`` at the relay rate of the last ``interval`` seconds."""
    before = relayed_bytes(node)
    stamp = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now_bytes, now = relayed_bytes(node), time.monotonic()
        dt = max(now - stamp, 1e-6)
        node.stats.throughput = ((now_bytes[0] - before[0]) / dt, (now_bytes[1] - before[1]) / dt)
        before, stamp = now_bytes, now


async def serve_http(node: Node, host: str, port: int) -> asyncio.Server:
    """The stats HTTP server: ``GET /metrics`` and ``GET /stats``; nothing else."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = [*request.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            path = path.split("?", 1)[0]
            if method != "GET":
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                body = generate_latest(registry)
            elif path == "/stats":
                status, ctype = "200 OK", "application/json"
                body = orjson.dumps(snapshot(node), option=orjson.OPT_INDENT_2) + b"\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics or /stats\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, reuse_address=True)


def render_table(s: dict[str, Any]) -> str:
    """``/stats`` as a table for people."""

    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or unit == "TiB":
                return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            n /= 1024
        return str(n)

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
    if s.get("fleet_servers") is not None:
        rows.append(("fleet servers", ", ".join(s["fleet_servers"]) or "(none)"))
    for reason, n in sorted(s["sessions_refused"].items()):
        rows.append((f"refused: {reason}", n))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
