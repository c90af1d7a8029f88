"""Command-line entry points: ``swiftftp-proxy`` and ``swiftftp-agent``.

Exit status: 0 done, 1 failed at run time, 2 bad usage or configuration.  An
operator's error is one line on stderr (one per problem), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import logging
import resource
import shutil
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__, aio, logs, sdnotify
from .config import (
    Loaded,
    Settings,
    check_environment,
    describe,
    load,
    load_settings,
    parse_bytes,
    parse_host_port,
    resolve,
)
from .errors import ConfigError, FleetError, RegistryError
from .identity import fingerprint
from .net import bracketed

log = logging.getLogger("swiftftp")

#: Flags of ``serve`` and ``demo``, mapped to setting names (see config.py).
_NODE_FLAGS = {
    "listen": "listen", "ftp_port": "ftp_port", "device_port": "device_port",
    "state_dir": "state_dir", "public_address": "public_address", "data_ports": "data_ports",
    "relay": "relay_backend", "stats_listen": "stats_listen", "log_format": "log_format",
    "s3_endpoint": "s3_endpoint", "s3_bucket": "fleet_bucket",
}


def _fail(message: str, status: int = 2, prog: str = "swiftftp-proxy") -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return status


def _config_errors(issues: list[str]) -> int:
    for issue in issues:
        print(f"swiftftp-proxy: config error: {issue}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace, **forced: Any) -> Loaded:
    """Defaults ← --config file ← SWIFTFTP_* ← flags given on the command line."""
    overrides = {attr: getattr(args, flag, None) for flag, attr in _NODE_FLAGS.items()}
    overrides.update(forced)
    return load(getattr(args, "config", None), overrides=overrides)


def _settings(args: argparse.Namespace, **forced: Any) -> Settings:
    """Like :func:`_load`; raises :class:`ConfigError` on the first problem."""
    overrides = {attr: getattr(args, flag, None) for flag, attr in _NODE_FLAGS.items()}
    overrides.update(forced)
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (see contrib/node.toml)")
    p.add_argument("--listen", metavar="ADDR", help="listen address (default 0.0.0.0; :: for IPv6 too)")
    p.add_argument("--ftp-port", metavar="N", help="FTP clients' port (default 2121)")
    p.add_argument("--device-port", metavar="N", help="devices' port (default 2222)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="registry, control socket and transfer log (default ~/.local/state/swiftftp)")
    p.add_argument("--public-address", metavar="ADDR",
                   help="IP address put into 227 replies (default: the address each client reached)")
    p.add_argument("--data-ports", metavar="LOW-HIGH",
                   help="rendezvous and passive listener ports (default 40000-44999; 0: any)")
    p.add_argument("--relay", choices=["rust", "python"], help="relay backend (default rust when built)")
    p.add_argument("--stats-listen", metavar="ADDR:PORT",
                   help="HTTP status page, /metrics, /stats, /healthz, /readyz (default "
                        "127.0.0.1:9121; 'off')")
    p.add_argument("--log-format", choices=["plain", "json"],
                   help="log lines on stderr: plain text (default) or one JSON object each")
    p.add_argument("--s3-bucket", metavar="NAME", help="join the fleet kept in this S3 bucket")
    p.add_argument("--s3-endpoint", metavar="URL", help="S3 endpoint of the fleet's bucket (default AWS)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


class Signals:
    """SIGINT and SIGTERM queued for :meth:`until`, SIGHUP calling ``on_hup``: installed
    on entry (before a ready line is printed, so a signal sent on seeing it is never
    the default action), removed on exit."""

    def __init__(self, on_hup: Callable[[], None] | None = None) -> None:
        self.on_hup = on_hup
        self.received: asyncio.Queue[int] = asyncio.Queue()

    def __enter__(self) -> Signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.received.put_nowait, sig)
        if self.on_hup:
            loop.add_signal_handler(signal.SIGHUP, self.on_hup)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def until(self, main: asyncio.Future) -> int | None:
        """Wait until ``main`` ends (None) or SIGINT/SIGTERM arrives (the signal)."""
        got = asyncio.ensure_future(self.received.get())
        try:
            await asyncio.wait({main, got}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not got.done():
                got.cancel()
        return got.result() if got.done() and not got.cancelled() else None


def _raise_fd_limit() -> int:
    """Every session holds 2 to 4 descriptors: use all the system allows, not the
    1024 a login shell usually starts with.  Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _listen_failure(settings: Settings, exc: OSError) -> str:
    """Which listener could not be bound, by setting and port, once the node failed to
    start; the bare error when every port binds again."""
    wanted = [("node.device_port", settings.listen, settings.device_port),
              ("node.ftp_port", settings.listen, settings.ftp_port)]
    if settings.tls_certificate and settings.tls_implicit_port:
        wanted.append(("tls.implicit_port", settings.listen, settings.tls_implicit_port))
    if settings.stats_listen:
        wanted.append(("node.stats_listen", settings.stats_listen[0] or "0.0.0.0", settings.stats_listen[1]))
    for setting, host, port in wanted:
        if port == 0:
            continue
        try:
            family, address = resolve(host)[0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((address, port))
        except (OSError, ValueError) as failed:
            reason = getattr(failed, "strerror", None) or str(failed)
            hint = " (another node running?)" if getattr(failed, "errno", None) == errno.EADDRINUSE else ""
            return f"cannot listen on {bracketed(host)} port {port} ({setting}): {reason}{hint}"
    return f"cannot listen: {exc.strerror or exc}"


async def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .node import ProxyNode

    fd_limit = _raise_fd_limit()
    try:
        node = ProxyNode(settings)
    except RegistryError as exc:  # one line naming the file and what to do
        return _fail(str(exc), 1)
    except (sqlite3.Error, OSError) as exc:
        return _fail(f"cannot open the registry {settings.registry_path} (node.state_dir): {exc}", 1)
    except ConfigError as exc:  # the [tls] certificate and key (changed since the check?)
        return _config_errors(exc.issues)
    except (ImportError, ValueError) as exc:
        return _fail(f"relay backend {settings.relay_backend or 'rust'} unavailable (node.relay): {exc}", 1)
    try:
        await node.start()
    except OSError as exc:
        node.registry.close()
        return _fail(_listen_failure(settings, exc), 1)
    except (FleetError, ConfigError) as exc:
        node.registry.close()
        return _fail(f"cannot join the fleet: {exc}", 1)
    node.stats.listening = True
    logs.event(log, "file_descriptor_limit", soft=fd_limit)
    tls_port = f", devices TLS port {node.tls_device_port}" if node.device_tls is not None else ""
    serving = (f"FTP clients port {node.ftp_port}, devices port {node.device_port}{tls_port}, "
               f"relay {node.backend.name}")

    def reload() -> None:
        sdnotify.reloading()
        reopened = logs.reopen()
        try:
            node.reload(_settings(args))
            sdnotify.ready(f"serving, configuration reloaded: {serving}")
        except ConfigError as exc:
            for issue in exc.issues:
                logs.event(log, "reload_refused", level=logging.ERROR, reason=issue)
            sdnotify.ready(f"serving, reload refused (see the log): {serving}")
        logs.event(log, "logs_reopened", files=reopened, level=logging.DEBUG)

    forever = asyncio.ensure_future(asyncio.Event().wait())
    try:
        with Signals(on_hup=reload) as signals:
            stats = ""
            if node.stats_address:
                stats = f", stats http://{bracketed(node.stats_address[0])}:{node.stats_address[1]}"
            print(f"swiftftp-proxy {__version__} listening on {bracketed(settings.listen)}: {serving}{stats}",
                  flush=True)
            sdnotify.ready(f"serving: {serving}")
            stop = await signals.until(forever)
            if stop == signal.SIGTERM and settings.drain_timeout:
                # SIGTERM (systemd's stop) lets running transfers finish; SIGINT stops at once
                sdnotify.stopping(f"draining: up to {settings.drain_timeout:g} s for {node.busy} "
                                  "clients and transfers")
                drain = asyncio.ensure_future(node.drain(settings.drain_timeout))
                if await signals.until(drain) is not None:
                    logs.event(log, "stopping_now", level=logging.WARNING,
                               reason="signalled again during the drain")
                drain.cancel()
            sdnotify.stopping("stopping")
    finally:
        node.stats.listening = False
        forever.cancel()
        await node.close()
        node.registry.close()
    logs.event(log, "stopped")
    return 0


def _loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(a).is_loopback for _, a in resolve(host))
    except ValueError:
        return False


async def _demo(settings: Settings) -> int:
    """A node, a pyftpdlib server on a folder and an agent, all on loopback.  The URL is
    the first and only line on stdout; everything else goes to stderr."""
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
    with warnings.catch_warnings():  # "write permissions assigned to anonymous user": wanted here
        warnings.simplefilter("ignore")
        authorizer.add_anonymous(str(folder), perm="elradfmw")
    handler = type("DemoHandler", (FTPHandler,), {"authorizer": authorizer})
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    ftpd = ThreadedFTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=ftpd.serve_forever, kwargs={"timeout": 0.2}, daemon=True).start()
    try:
        node = ProxyNode(settings)
    except RegistryError as exc:
        ftpd.close_all()
        return _fail(str(exc), 1)
    except (sqlite3.Error, OSError) as exc:
        ftpd.close_all()
        return _fail(f"cannot open the registry {settings.registry_path}: {exc}", 1)
    try:
        await node.start()
    except OSError as exc:
        ftpd.close_all()
        node.registry.close()
        return _fail(_listen_failure(settings, exc), 1)
    node.stats.listening = True
    ready = asyncio.get_running_loop().create_future()
    agent = Agent(
        AgentSettings(
            proxy_host=settings.listen, proxy_port=node.device_port, ftp_host="127.0.0.1",
            ftp_port=ftpd.address[1], state_dir=settings.state_dir, client_port=node.ftp_port,
        ),
        on_ready=lambda url: ready.done() or ready.set_result(url),
    )
    agent_task = asyncio.ensure_future(agent.run())
    try:
        with Signals() as signals:
            waiting = asyncio.ensure_future(asyncio.wait_for(asyncio.shield(ready), 15))
            stopped = await signals.until(waiting)
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await waiting
            if stopped is not None:
                return 0
            if not ready.done():
                return _fail("demo: the agent did not come online within 15 s", 1)
            print(ready.result(), flush=True)
            print(f"demo ready: serving {folder} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            await signals.until(agent_task)
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


def _online(settings: Settings) -> tuple[set[str] | None, str]:
    """Prefixes online on the node running on this state dir (asked through its
    control socket), or None and why not."""
    from . import admin

    path = admin.socket_path(settings.state_dir)
    try:
        reply = admin.request(path, {"command": "online"}, timeout=5)
    except admin.AdminError as exc:
        return None, str(exc)
    if not reply.get("ok") or not isinstance(reply.get("prefixes"), list):
        return None, f"the node at {path} did not say: {reply.get('error', reply)}"
    return set(reply["prefixes"]), ""


def _devices(args: argparse.Namespace) -> int:
    from . import admin
    from .quota import period_key
    from .registry import Registry
    from .stats import human_bytes

    settings = _settings(args)
    if args.action == "message":
        path = admin.socket_path(settings.state_dir)
        try:
            reply = admin.request(path, {"command": "message", "prefix": args.key, "text": args.text})
        except admin.AdminError as exc:
            return _fail(str(exc), 1)
        if not reply.get("ok"):
            return _fail(reply.get("error", "refused"), 1)
        print(f"sent to {args.key}")
        return 0
    if args.action == "set-rate" and args.upload is None and args.download is None:
        return _fail("devices set-rate: give --upload RATE, --download RATE or both "
                     "(RATE in bytes/s like 2M, or 'default')")
    if not settings.registry_path.exists():
        return _fail(f"no registry at {settings.registry_path}", 1)
    try:
        registry = Registry(settings.registry_path)
    except RegistryError as exc:
        return _fail(str(exc), 1)
    except sqlite3.Error as exc:
        return _fail(f"cannot open the registry {settings.registry_path}: {exc}", 1)
    period = period_key(settings.quota_period)
    shared = None
    shared_keys = None
    try:
        if settings.fleet_bucket:  # usage and overrides are the fleet's, in the bucket
            from .fleet import Bucket, SharedKeys, SharedUsage

            bucket = Bucket(settings.fleet_bucket, settings.s3_endpoint, settings.fleet_key_prefix)
            shared = SharedUsage(bucket)
            shared_keys = SharedKeys(bucket)
    except ConfigError as exc:
        registry.close()
        return _fail(str(exc), 1)
    try:
        if args.action == "list":
            records = registry.all()
            if shared is not None:
                fleet_used = shared.all_used(period)
                records = [_with_fleet_overrides(r, shared) for r in records]
            online, why = _online(settings)
            print(f"{'prefix':<8} {'device id':<36} {'online':<6} {'used':>10} {'quota':>10} "
                  f"{'upload':>12} {'download':>12}  last seen")
            for r in records:
                quota = r.quota_bytes if r.quota_bytes is not None else settings.quota_bytes
                state = "?" if online is None else "yes" if r.prefix in online else "no"
                print(f"{r.prefix:<8} {r.android_id[:36]:<36} {state:<6} "
                      f"{human_bytes(_used(registry, fleet_used if shared else None, r, period)):>10} "
                      f"{human_bytes(quota) if quota else 'unlimited':>10} "
                      f"{_rate(r.upload_rate, human=True):>12} {_rate(r.download_rate, human=True):>12}  "
                      f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.last_seen))}")
            print(f"{len(records)} devices; usage period {period}"
                  + (f"; {len(online)} online" if online is not None else ""))
            if online is None:
                print(f"online: unknown ({why})")
            return 0
        record = registry.find(args.key)
        if record is None and shared is not None:  # known to the fleet, not to this node
            record = _fleet_record(shared, args.key)
        if record is None:
            return _fail(f"no device {args.key!r}", 1)
        if shared is not None:
            record = _with_fleet_overrides(record, shared)
        if args.action == "show":
            quota = record.quota_bytes if record.quota_bytes is not None else settings.quota_bytes
            source = "device" if record.quota_bytes is not None else "node default"
            if shared is not None:
                used = shared.used(period, record.android_id)
            else:
                used = registry.usage(record.android_id, period)
            for key, value in (
                ("prefix", record.prefix), ("device id", record.android_id),
                ("first seen", time.ctime(record.created)), ("last seen", time.ctime(record.last_seen)),
                ("usage period", period), ("used", f"{used} ({human_bytes(used)})"),
                ("quota", f"{quota or 'unlimited'} ({source})"),
                ("upload rate", _rate(record.upload_rate)), ("download rate", _rate(record.download_rate)),
                ("identity", _identity(record.public_key, record.key_bound) if shared_keys is None
                 else _fleet_identity(shared_keys.read(record.android_id), record.public_key)),
            ):
                print(f"{key:<14} {value}")
        elif args.action == "set-quota":
            value = None if args.bytes == "default" else parse_bytes(args.bytes)
            if shared is not None:
                shared.set_overrides(record.android_id, _overrides_of(record), quota_bytes=value)
            registry.set_quota(record.android_id, value)
            print(f"{record.prefix}: quota {'node default' if value is None else value}")
        elif args.action == "set-rate":
            up = None if args.upload in (None, "default") else parse_bytes(args.upload)
            down = None if args.download in (None, "default") else parse_bytes(args.download)
            if shared is not None:
                shared.set_overrides(record.android_id, _overrides_of(record), upload_rate=up,
                                     download_rate=down)
            registry.set_rates(record.android_id, up, down)
            print(f"{record.prefix}: upload {_rate(up)}, download {_rate(down)} "
                  "(a running node applies it on SIGHUP or the device's next connection)")
        elif args.action == "unbind":
            key = record.public_key
            if shared_keys is not None:  # the fleet's binding: a tombstone tells every node
                found = shared_keys.read(record.android_id)
                key = (found or {}).get("key") or key
                if key is not None:
                    shared_keys.unbind(record.android_id)
            if key is None:
                print(f"{record.prefix}: not bound to a key; nothing to do")
                return 0
            registry.unbind(record.android_id)
            try:  # a running node keeps the key in memory: tell it
                reply = admin.request(admin.socket_path(settings.state_dir),
                                      {"command": "forget_key", "android_id": record.android_id}, timeout=5)
                running = "" if reply.get("ok") else f" (the running node said: {reply.get('error')})"
            except admin.AdminError:
                running = ""  # no node running here: the next one reads the file
            fleet = (" in the fleet (other nodes learn it at the device's next login there)"
                     if shared_keys else "")
            print(f"{record.prefix}: unbound from key {fingerprint(key)}{fleet}; the next login "
                  f"of device id {record.android_id} is accepted without proof, and binds the key it "
                  f"presents{running}")
        elif args.action == "reset-usage":
            if shared is not None:  # every node's usage object of the device
                shared.reset(period, record.android_id)
            registry.reset_usage(record.android_id, period)
            print(f"{record.prefix}: usage for {period} reset to 0")
        return 0
    except RegistryError as exc:
        return _fail(str(exc), 1)
    except FleetError as exc:
        return _fail(f"fleet: {exc}", 1)
    except ValueError as exc:
        return _fail(str(exc))
    except sqlite3.Error as exc:
        return _fail(f"registry {settings.registry_path}: {exc}", 1)
    finally:
        registry.close()


def _identity(key: str | None, since: float | None) -> str:
    """``devices show``'s identity line: bound (the key's fingerprint) or not."""
    if key is None:
        return "not bound (whoever logs in with this device id is taken for it)"
    when = f" since {time.ctime(since)}" if since else ""
    return f"bound to key {fingerprint(key)}{when}"


def _fleet_identity(found: dict[str, Any] | None, local: str | None) -> str:
    """``devices show``'s identity line in a fleet: the bucket's ``keys/<id>``."""
    if found and found.get("key"):
        return f"bound to key {fingerprint(found['key'])} since {time.ctime(found.get('bound', 0))} (fleet)"
    if found:
        return (f"not bound (unbound fleet-wide {time.ctime(found.get('unbound', 0))}; "
                "whoever logs in with this device id is taken for it)")
    if local is not None:  # bound before this node joined the fleet: published when it starts
        return f"bound to key {fingerprint(local)} on this node only (published when the node starts)"
    return "not bound (whoever logs in with this device id is taken for it)"


def _used(registry: Any, fleet_used: dict[str, int] | None, record: Any, period: str) -> int:
    """A device's usage: the fleet's sum in a fleet, this registry's otherwise."""
    if fleet_used is not None:
        return fleet_used.get(record.android_id, 0)
    return registry.usage(record.android_id, period)


def _fleet_record(shared: Any, key: str) -> Any:
    """A device the fleet knows but this node's registry does not (it logged in elsewhere)."""
    from .registry import DeviceRecord

    android_id = shared.android_id_for(key.lower())
    prefix = key.lower() if android_id else shared.prefix_of(key)
    android_id = android_id or (key if prefix else None)
    if android_id is None or prefix is None:
        return None
    return DeviceRecord(android_id, prefix, 0.0, 0.0, None, None, None)


def _overrides_of(record: Any) -> dict[str, int | None]:
    return {"quota_bytes": record.quota_bytes, "upload_rate": record.upload_rate,
            "download_rate": record.download_rate}


def _with_fleet_overrides(record: Any, shared: Any) -> Any:
    """The record with the fleet's overrides, where an operator set any."""
    import dataclasses

    overrides = shared.overrides(record.android_id)
    return record if overrides is None else dataclasses.replace(record, **overrides)


def _rate(value: int | None, human: bool = False) -> str:
    if value is None:
        return "default"
    if not value:
        return "unlimited"
    if human:
        from .stats import human_bytes

        return f"{human_bytes(value)}/s"
    return str(value)


def _version(prog: str) -> str:
    return f"{prog} {__version__}"


def proxy_parser() -> argparse.ArgumentParser:
    """The ``swiftftp-proxy`` command line (also the source of its shell completion)."""
    parser = argparse.ArgumentParser(
        prog="swiftftp-proxy", description="SwiftFTP proxy node: FTP servers behind NAT for any client.",
        epilog="Exit status: 0 done, 1 failed at run time, 2 bad usage or configuration.",
    )
    parser.add_argument("--version", action="version", version=_version("swiftftp-proxy"),
                        help="print the program's name and version, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_node_flags(sub.add_parser("serve", help="run a proxy node",
                                   description="Run a proxy node until SIGTERM (drains) or SIGINT."))
    demo = sub.add_parser(
        "demo", help="a node, a pyftpdlib server and an agent on loopback",
        description="Start a node, a pyftpdlib server on a temporary folder and an agent publishing "
                    "it, all on loopback, and print a URL any FTP client can open.",
    )
    _add_node_flags(demo)
    check = sub.add_parser(
        "check-config", help="validate a config file, print the effective settings",
        description="Report every problem of a configuration file (and of the SWIFTFTP_* "
                    "environment), each with its file and line; print the effective settings "
                    "when there is none.",
    )
    check.add_argument("file", metavar="FILE", help="the TOML configuration file to check")
    stats = sub.add_parser("stats", help="the stats of a running node, as a table",
                           description="Ask a running node's stats HTTP server and print a table.")
    stats.add_argument("--config", metavar="FILE", help="read stats_listen from this configuration file")
    stats.add_argument("--stats-listen", metavar="ADDR:PORT", help="the node's stats address")
    stats.add_argument("--json", action="store_true", help="print the raw JSON of /stats")
    devices = sub.add_parser(
        "devices", help="the device registry: quotas, rates, usage, messages, keys",
        description="Read and change the device registry (<state_dir>/registry.sqlite3).",
    )
    where = argparse.ArgumentParser(add_help=False)  # accepted before and after the action
    for p, default in ((devices, None), (where, argparse.SUPPRESS)):
        p.add_argument("--config", metavar="FILE", default=default,
                       help="read state_dir from this configuration file")
        p.add_argument("--state-dir", metavar="DIR", default=default,
                       help="the node's state directory (default ~/.local/state/swiftftp)")
    dsub = devices.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions = {
        "list": "every known device: usage, quota, rates, online on the running node",
        "show": "one device's record",
        "set-quota": "set a device's quota in bytes per period, or back to the node's 'default'",
        "set-rate": "per-device rate override in bytes/s, or back to 'default'",
        "reset-usage": "zero a device's usage for this period",
        "message": "show a notice on an online device (through the running node)",
        "unbind": "forget the key bound to a device id (its next login binds the key it presents)",
    }
    parsers = {name: dsub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                                     parents=[where]) for name, text in actions.items()}
    for name in ("show", "set-quota", "set-rate", "reset-usage", "unbind"):
        parsers[name].add_argument("key", metavar="PREFIX|ID", help="the device's prefix or device id")
    parsers["set-quota"].add_argument("bytes", metavar="BYTES|default",
                                      help="bytes per period (1500000, 1.5M, 10GiB), 0 unlimited")
    parsers["set-rate"].add_argument("--upload", metavar="RATE|default", help="client to device, bytes/s")
    parsers["set-rate"].add_argument("--download", metavar="RATE|default", help="device to client, bytes/s")
    parsers["message"].add_argument("key", metavar="PREFIX", help="the device's prefix")
    parsers["message"].add_argument("text", help="the notice to show")
    completion = sub.add_parser(
        "completion", help="print a shell completion script (bash or zsh)",
        description="Print a completion script for swiftftp-proxy and swiftftp-agent: "
                    "source <(swiftftp-proxy completion bash)",
    )
    completion.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    return parser


def agent_parser() -> argparse.ArgumentParser:
    """The ``swiftftp-agent`` command line."""
    parser = argparse.ArgumentParser(
        prog="swiftftp-agent", description="Publish a local FTP server through a SwiftFTP proxy.",
        epilog="Exit status: 0 done, 1 failed at run time, 2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=_version("swiftftp-agent"),
                        help="print the program's name and version, and exit")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--proxy", metavar="HOST:PORT", help="the proxy node's device port")
    where.add_argument("--servers", metavar="URL",
                       help="a fleet's server list (host[:port] per line, port 2222 if none)")
    parser.add_argument("--ftp", required=True, metavar="HOST:PORT",
                        help="the FTP server to publish, e.g. 127.0.0.1:21")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the device id is kept, so the prefix never changes; one "
                             "agent per directory (default ~/.local/state/swiftftp-agent)")
    parser.add_argument("--client-port", type=int, default=2121, metavar="N",
                        help="the proxy's FTP port, for the printed URL (default 2121)")
    parser.add_argument("--user", default="anonymous", help="FTP user for the printed URL")
    parser.add_argument("--relay", choices=["rust", "python"], help="relay backend (default rust when built)")
    parser.add_argument("--tls", action="store_true",
                        help="dial the node over TLS (its [tls] device_port) and verify its certificate")
    parser.add_argument("--ca", metavar="FILE",
                        help="with --tls: verify the node against this CA certificate (PEM) instead of "
                             "the system's CAs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _check_config(path: str) -> int:
    loaded = load(path)
    issues = loaded.issues + check_environment(loaded)
    if issues:
        return _config_errors(issues)
    print("\n".join(describe(loaded.settings)))
    print(f"# OK: {path}")
    return 0


def proxy_main(argv: list[str] | None = None) -> int:
    args = proxy_parser().parse_args(argv)
    if args.command == "check-config":
        return _check_config(args.file)
    if args.command == "completion":
        from .completion import SHELLS

        print(SHELLS[args.shell]({"swiftftp-proxy": proxy_parser(), "swiftftp-agent": agent_parser()}))
        return 0
    try:
        if args.command == "stats":
            return _stats(args)
        if args.command == "devices":
            return _devices(args)
    except ConfigError as exc:
        return _config_errors(exc.issues)
    if args.command == "demo":
        return _demo_main(args)
    loaded = _load(args)
    issues = loaded.issues + check_environment(loaded, create=not loaded.issues)
    if issues:
        return _config_errors(issues)
    logs.setup(loaded.settings.log_format, args.verbose)
    return _run(_serve(loaded.settings, args))


def _run(main: Any) -> int:
    """Run ``main`` on a new event loop (uvloop where installed, else asyncio's own; see
    :func:`swiftftp.aio.run`); a Ctrl-C before the signal handlers are in place is one line."""
    try:
        return aio.run(main)
    except KeyboardInterrupt:
        return _fail("interrupted", 1)


def _demo_main(args: argparse.Namespace) -> int:
    """``demo``: loopback only, free ports, a temporary state dir removed on exit."""
    import tempfile

    if args.listen is not None and not _loopback(args.listen):
        return _fail(f"demo listens on loopback only; --listen {args.listen} is not a loopback address")
    temporary = None if args.state_dir else tempfile.mkdtemp(prefix="swiftftp-demo-")
    try:
        forced: dict[str, Any] = {"listen": args.listen or "127.0.0.1"}
        if temporary:
            forced["state_dir"] = temporary
        for flag, attr, value in (("ftp_port", "ftp_port", 0), ("device_port", "device_port", 0),
                                  ("data_ports", "data_ports", "0"), ("stats_listen", "stats_listen", "off")):
            if getattr(args, flag) is None:
                forced[attr] = value
        loaded = _load(args, **forced)
        issues = loaded.issues + check_environment(loaded, create=not loaded.issues)
        if issues:
            return _config_errors(issues)
        logs.setup(loaded.settings.log_format, args.verbose, level=logging.WARNING)
        return _run(_demo(loaded.settings))
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


def agent_main(argv: list[str] | None = None) -> int:
    from .agent import Agent, AgentSettings, StateDirLocked, default_state_dir, legacy_state_dir
    from .identity import KeyFileError

    args = agent_parser().parse_args(argv)
    try:
        proxy = parse_host_port(args.proxy) if args.proxy else ("", 2222)
        ftp = parse_host_port(args.ftp)
    except ValueError as exc:
        return _fail(str(exc), 2, "swiftftp-agent")
    if args.ca and not args.tls:
        return _fail("--ca needs --tls", 2, "swiftftp-agent")
    tls = None
    if args.tls:
        import ssl

        try:  # with a CA file, only that CA is trusted; else the system's
            tls = ssl.create_default_context(cafile=args.ca)
        except (OSError, ssl.SSLError) as exc:
            return _fail(f"--ca {args.ca}: {getattr(exc, 'strerror', None) or exc}", 2, "swiftftp-agent")
    logs.setup("plain", args.verbose)
    settings = AgentSettings(
        proxy_host=proxy[0], proxy_port=proxy[1], ftp_host=ftp[0], ftp_port=ftp[1],
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        client_port=args.client_port, user=args.user, relay_backend=args.relay,
        servers_url=args.servers, tls=tls,
        # the id an older agent kept in the node's directory by default: same prefix after an upgrade
        legacy_state_dir=None if args.state_dir else legacy_state_dir(),
    )

    async def main() -> int:
        task = asyncio.ensure_future(Agent(settings).run())
        try:
            with Signals() as signals:
                await signals.until(task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return 0

    try:
        return aio.run(main())
    except (StateDirLocked, KeyFileError) as exc:
        return _fail(str(exc), 1, "swiftftp-agent")
    except KeyboardInterrupt:
        return _fail("interrupted", 1, "swiftftp-agent")
