"""Command-line entry points: ``swiftftp-proxy`` and ``swiftftp-agent``.

Exit status: 0 done, 1 failed at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import resource
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from . import __version__, logs
from .config import Settings, describe, load_settings, parse_bytes, parse_host_port
from .errors import ConfigError, FleetError
from .net import bracketed

log = logging.getLogger("swiftftp")

#: Flags of ``serve`` and ``demo``, mapped to setting names (see config.py).
_NODE_FLAGS = {
    "listen": "listen", "ftp_port": "ftp_port", "device_port": "device_port",
    "state_dir": "state_dir", "public_address": "public_address", "data_ports": "data_ports",
    "relay": "relay_backend", "stats_listen": "stats_listen", "log_format": "log_format",
    "s3_endpoint": "s3_endpoint", "s3_bucket": "fleet_bucket",
}


def _fail(message: str, status: int = 2) -> int:
    print(f"swiftftp-proxy: {message}", file=sys.stderr)
    return status


def _settings(args: argparse.Namespace, **forced: Any) -> Settings:
    """Defaults ← --config file ← SWIFTFTP_* ← flags given on the command line."""
    overrides = {attr: getattr(args, flag, None) for flag, attr in _NODE_FLAGS.items()}
    overrides.update(forced)
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", metavar="ADDR", help="listen address (default 0.0.0.0)")
    p.add_argument("--ftp-port", metavar="N", help="FTP clients' port (default 2121)")
    p.add_argument("--device-port", metavar="N", help="devices' port (default 2222)")
    p.add_argument("--state-dir", metavar="DIR", help="registry and logs (default ~/.local/state/swiftftp)")
    p.add_argument("--public-address", metavar="ADDR", help="address for 227 replies")
    p.add_argument("--data-ports", metavar="LOW-HIGH", help="passive/rendezvous ports (40000-44999)")
    p.add_argument("--relay", choices=["rust", "python"], help="relay backend")
    p.add_argument("--stats-listen", metavar="ADDR:PORT", help="HTTP stats (127.0.0.1:9121; 'off')")
    p.add_argument("--log-format", choices=["plain", "json"])
    p.add_argument("--s3-bucket", metavar="NAME", help="join the fleet kept in this S3 bucket")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint (default AWS)")
    p.add_argument("-v", "--verbose", action="store_true")


async def _until_signalled(main: asyncio.Future, on_hup: Any = None) -> int | None:
    """Run until ``main`` ends or SIGINT/SIGTERM arrives (returned); SIGHUP calls ``on_hup``."""
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda sig=sig: stop.done() or stop.set_result(sig))
    if on_hup:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return stop.result() if stop.done() else None


def _raise_fd_limit() -> None:
    """Every session holds 2 to 4 descriptors: use all the system allows, not the
    1024 a login shell usually starts with."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("file descriptor limit %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .node import ProxyNode

    _raise_fd_limit()
    node = ProxyNode(settings)
    try:
        await node.start()
    except OSError as exc:
        node.registry.close()
        return _fail(f"cannot listen: {exc}", 1)
    except (FleetError, ConfigError) as exc:
        node.registry.close()
        return _fail(f"cannot join the fleet: {exc}", 1)
    stats = ""
    if node.stats_address:
        stats = f", stats http://{bracketed(node.stats_address[0])}:{node.stats_address[1]}"
    print(
        f"swiftftp-proxy {__version__} listening on {bracketed(settings.listen)}: "
        f"FTP clients port {node.ftp_port}, devices port {node.device_port}, "
        f"relay {node.backend.name}{stats}",
        flush=True,
    )

    def reload() -> None:
        try:
            node.reload(_settings(args))
        except ConfigError as exc:
            log.error("reload refused, settings unchanged: %s", exc)

    forever = asyncio.ensure_future(asyncio.Event().wait())
    try:
        if await _until_signalled(forever, on_hup=reload) == signal.SIGTERM and settings.drain_timeout:
            # SIGTERM (systemd's stop) lets running transfers finish; SIGINT stops at once
            drain = asyncio.ensure_future(node.drain(settings.drain_timeout))
            if await _until_signalled(drain) is not None:
                log.warning("stopping now, without waiting for the drain")
            drain.cancel()
    finally:
        forever.cancel()
        await node.close()
        node.registry.close()
    log.info("stopped")
    return 0


async def _demo(settings: Settings) -> int:
    """A node, a pyftpdlib server on a folder and an agent, all on loopback."""
    import threading

    from .agent import Agent, AgentSettings
    from .node import ProxyNode

    try:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer
    except ImportError:
        return _fail("demo needs pyftpdlib: pip install pyftpdlib", 1)
    folder = settings.state_dir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        (folder / "hello.txt").write_text("Hello from behind the NAT!\n")
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(folder), perm="elradfmw")
    handler = type("DemoHandler", (FTPHandler,), {"authorizer": authorizer})
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    ftpd = ThreadedFTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=ftpd.serve_forever, kwargs={"timeout": 0.2}, daemon=True).start()
    node = ProxyNode(settings)
    try:
        await node.start()
    except OSError as exc:
        ftpd.close_all()
        return _fail(f"cannot listen: {exc}", 1)
    host = "127.0.0.1" if settings.listen in ("0.0.0.0", "::") else settings.listen
    ready = asyncio.get_running_loop().create_future()
    agent = Agent(
        AgentSettings(
            proxy_host=host, proxy_port=node.device_port, ftp_host="127.0.0.1",
            ftp_port=ftpd.address[1], state_dir=settings.state_dir, client_port=node.ftp_port,
        ),
        on_ready=lambda url: ready.done() or ready.set_result(url),
    )
    agent_task = asyncio.ensure_future(agent.run())
    try:
        url = await asyncio.wait_for(ready, 15)
        print(f"demo ready: serving {folder} (Ctrl-C to stop)", flush=True)
        print(url, flush=True)
        await _until_signalled(agent_task)
    finally:
        agent_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await agent_task
        await node.close()
        node.registry.close()
        ftpd.close_all()
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .stats import render_table

    settings = _settings(args)
    if not settings.stats_listen:
        return _fail("stats are off in this configuration (node.stats_listen)")
    host, port = settings.stats_listen
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://{bracketed(host)}:{port}/stats"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as exc:
        return _fail(f"no node answers at {url}: {exc}", 1)
    if args.json:
        print(body.decode().rstrip())
    else:
        import orjson

        print(render_table(orjson.loads(body)))
    return 0


def _devices(args: argparse.Namespace) -> int:
    from . import admin
    from .quota import period_key
    from .registry import Registry

    settings = _settings(args)
    if args.action == "message":
        path = admin.socket_path(settings.state_dir)
        try:
            reply = admin.request(path, {"command": "message", "prefix": args.key, "text": args.text})
        except OSError as exc:
            return _fail(f"no running node at {path}: {exc}", 1)
        if not reply.get("ok"):
            return _fail(reply.get("error", "refused"), 1)
        print(f"sent to {args.key}")
        return 0
    if not settings.registry_path.exists():
        return _fail(f"no registry at {settings.registry_path}", 1)
    registry = Registry(settings.registry_path)
    period = period_key(settings.quota_period)
    try:
        if args.action == "list":
            records = registry.all()
            print(f"{'prefix':<8} {'device id':<36} {'used':>14} {'quota':>14} {'up B/s':>10} "
                  f"{'down B/s':>10}  last seen")
            for r in records:
                quota = r.quota_bytes if r.quota_bytes is not None else settings.quota_bytes
                print(f"{r.prefix:<8} {r.android_id[:36]:<36} {registry.usage(r.android_id, period):>14} "
                      f"{quota or 'unlimited':>14} {_rate(r.upload_rate):>10} "
                      f"{_rate(r.download_rate):>10}  "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.last_seen))}")
            print(f"{len(records)} devices; usage period {period}")
            return 0
        record = registry.find(args.key)
        if record is None:
            return _fail(f"no device {args.key!r}", 1)
        if args.action == "show":
            quota = record.quota_bytes if record.quota_bytes is not None else settings.quota_bytes
            source = "device" if record.quota_bytes is not None else "node default"
            for key, value in (
                ("prefix", record.prefix), ("device id", record.android_id),
                ("first seen", time.ctime(record.created)), ("last seen", time.ctime(record.last_seen)),
                ("usage period", period), ("used", registry.usage(record.android_id, period)),
                ("quota", f"{quota or 'unlimited'} ({source})"),
                ("upload rate", _rate(record.upload_rate)), ("download rate", _rate(record.download_rate)),
            ):
                print(f"{key:<14} {value}")
        elif args.action == "set-quota":
            value = None if args.bytes == "default" else parse_bytes(args.bytes)
            registry.set_quota(record.android_id, value)
            print(f"{record.prefix}: quota {'node default' if value is None else value}")
        elif args.action == "set-rate":
            up = None if args.upload in (None, "default") else parse_bytes(args.upload)
            down = None if args.download in (None, "default") else parse_bytes(args.download)
            registry.set_rates(record.android_id, up, down)
            print(f"{record.prefix}: upload {_rate(up)}, download {_rate(down)} "
                  "(a running node applies it on SIGHUP or the device's next connection)")
        elif args.action == "reset-usage":
            registry.reset_usage(record.android_id, period)
            print(f"{record.prefix}: usage for {period} reset to 0")
        return 0
    except ValueError as exc:
        return _fail(str(exc))
    finally:
        registry.close()


def _rate(value: int | None) -> str:
    return "default" if value is None else str(value) if value else "unlimited"


def proxy_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="swiftftp-proxy", description="SwiftFTP proxy node: FTP servers behind NAT for any client."
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_node_flags(sub.add_parser("serve", help="run a proxy node"))
    demo = sub.add_parser("demo", help="a node, a pyftpdlib server and an agent on loopback")
    _add_node_flags(demo)
    check = sub.add_parser("check-config", help="validate a config file, print the effective settings")
    check.add_argument("file")
    stats = sub.add_parser("stats", help="the stats of a running node, as a table")
    stats.add_argument("--config", metavar="FILE")
    stats.add_argument("--stats-listen", metavar="ADDR:PORT")
    stats.add_argument("--json", action="store_true", help="raw JSON")
    devices = sub.add_parser("devices", help="the device registry: quotas, rates, usage, messages")
    devices.add_argument("--config", metavar="FILE")
    devices.add_argument("--state-dir", metavar="DIR")
    dsub = devices.add_subparsers(dest="action", required=True)
    dsub.add_parser("list", help="every known device")
    for name, text in (("show", "one device"), ("reset-usage", "zero this period's usage")):
        dsub.add_parser(name, help=text).add_argument("key", metavar="PREFIX|ID")
    p = dsub.add_parser("set-quota", help="bytes per period, or 'default'")
    p.add_argument("key", metavar="PREFIX|ID")
    p.add_argument("bytes", metavar="BYTES|default")
    p = dsub.add_parser("set-rate", help="per-device rate override in bytes/s, or 'default'")
    p.add_argument("key", metavar="PREFIX|ID")
    p.add_argument("--upload", metavar="RATE|default")
    p.add_argument("--download", metavar="RATE|default")
    p = dsub.add_parser("message", help="show a notice on an online device")
    p.add_argument("key", metavar="PREFIX")
    p.add_argument("text")
    args = parser.parse_args(argv)

    try:
        if args.command == "check-config":
            settings = load_settings(args.file, overrides={})
            print("\n".join(describe(settings)))
            return 0
        if args.command == "stats":
            return _stats(args)
        if args.command == "devices":
            return _devices(args)
        if args.command == "demo":
            import tempfile

            forced = {} if args.state_dir else {"state_dir": tempfile.mkdtemp(prefix="swiftftp-demo-")}
            settings = _settings(args, **forced)
            if args.ftp_port is None:
                settings.ftp_port = 0
            if args.device_port is None:
                settings.device_port = 0
            if args.stats_listen is None:
                settings.stats_listen = None
        else:
            settings = _settings(args)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    logs.setup(settings.log_format, args.verbose)
    if args.command == "serve":
        return asyncio.run(_serve(settings, args))
    return asyncio.run(_demo(settings))


def agent_main(argv: list[str] | None = None) -> int:
    from .agent import Agent, AgentSettings
    from .config import default_state_dir

    parser = argparse.ArgumentParser(
        prog="swiftftp-agent", description="Publish a local FTP server through a SwiftFTP proxy."
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--proxy", metavar="HOST:PORT", help="the proxy node's device port")
    where.add_argument("--servers", metavar="URL",
                       help="a fleet's server list (host[:port] per line, port 2222 if none)")
    parser.add_argument("--ftp", required=True, metavar="HOST:PORT")
    parser.add_argument("--state-dir", metavar="DIR")
    parser.add_argument("--client-port", type=int, default=2121, metavar="N",
                        help="the proxy's FTP port, for the printed URL (default 2121)")
    parser.add_argument("--user", default="anonymous", help="FTP user for the printed URL")
    parser.add_argument("--relay", choices=["rust", "python"], help="relay backend")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        proxy = parse_host_port(args.proxy) if args.proxy else ("", 2222)
        ftp = parse_host_port(args.ftp)
    except ValueError as exc:
        print(f"swiftftp-agent: {exc}", file=sys.stderr)
        return 2
    logs.setup("plain", args.verbose)
    settings = AgentSettings(
        proxy_host=proxy[0], proxy_port=proxy[1], ftp_host=ftp[0], ftp_port=ftp[1],
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        client_port=args.client_port, user=args.user, relay_backend=args.relay,
        servers_url=args.servers,
    )

    async def main() -> int:
        task = asyncio.ensure_future(Agent(settings).run())
        try:
            await _until_signalled(task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return 0

    return asyncio.run(main())
