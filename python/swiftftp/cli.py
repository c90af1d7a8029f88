"""Command-line entry points: ``swiftftp-proxy`` and ``swiftftp-agent``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from . import __version__
from .config import Settings, default_state_dir


def _host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
        return text, default_port
    host = host.strip("[]")
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None


def _port_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH, got {text!r}") from None
    if not (0 <= lo <= hi <= 65535) or (lo == 0) != (hi == 0):
        raise argparse.ArgumentTypeError(f"bad port range {text!r}")
    return lo, hi


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _until_signalled(main: asyncio.Future | asyncio.Task) -> None:
    """Run until ``main`` ends or SIGINT/SIGTERM arrives."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    try:
        await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        listen=args.listen,
        ftp_port=args.ftp_port,
        device_port=args.device_port,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        public_address=args.public_address,
        data_ports=args.data_ports,
        relay_backend=args.relay,
    )


async def _serve(settings: Settings) -> int:
    from .node import ProxyNode

    node = ProxyNode(settings)
    try:
        await node.start()
    except OSError as exc:
        print(f"swiftftp-proxy: cannot listen: {exc}", file=sys.stderr)
        return 1
    print(
        f"swiftftp-proxy {__version__} listening on {settings.listen}: "
        f"FTP clients port {node.ftp_port}, devices port {node.device_port}, "
        f"relay {node.backend.name}",
        flush=True,
    )
    forever = asyncio.ensure_future(asyncio.Event().wait())
    try:
        await _until_signalled(forever)
    finally:
        forever.cancel()
        await node.close()
        node.registry.close()
    logging.getLogger("swiftftp").info("stopped")
    return 0


async def _demo(args: argparse.Namespace) -> int:
    """A node, a pyftpdlib server on a folder and an agent, all on loopback."""
    import tempfile

    from .agent import Agent, AgentSettings
    from .node import ProxyNode

    try:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer
    except ImportError:
        print("swiftftp-proxy demo needs pyftpdlib: pip install pyftpdlib", file=sys.stderr)
        return 1
    import threading

    state = Path(tempfile.mkdtemp(prefix="swiftftp-demo-"))
    folder = Path(args.dir) if args.dir else state / "files"
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.iterdir()):
        (folder / "hello.txt").write_text("Hello from behind the NAT!\n")
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(folder), perm="elradfmw")
    handler = type("DemoHandler", (FTPHandler,), {"authorizer": authorizer})
    ftpd = ThreadedFTPServer(("127.0.0.1", 0), handler)
    ftpd_thread = threading.Thread(target=ftpd.serve_forever, kwargs={"timeout": 0.2}, daemon=True)
    ftpd_thread.start()
    settings = _settings_from(args)
    settings.state_dir = state
    node = ProxyNode(settings)
    try:
        await node.start()
    except OSError as exc:
        print(f"swiftftp-proxy: cannot listen: {exc}", file=sys.stderr)
        ftpd.close_all()
        return 1
    host = "127.0.0.1" if settings.listen in ("0.0.0.0", "::") else settings.listen
    ready = asyncio.get_running_loop().create_future()
    agent = Agent(
        AgentSettings(
            proxy_host=host, proxy_port=node.device_port,
            ftp_host="127.0.0.1", ftp_port=ftpd.address[1],
            state_dir=state, client_port=node.ftp_port,
        ),
        on_ready=lambda url: ready.done() or ready.set_result(url),
    )
    agent_task = asyncio.ensure_future(agent.run())
    try:
        url = await asyncio.wait_for(ready, 15)
        print(f"demo ready: serving {folder}", flush=True)
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


def proxy_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swiftftp-proxy", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("serve", "run a proxy node"), ("demo", "node + FTP server + agent")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--listen", default="0.0.0.0", metavar="ADDR")
        p.add_argument("--ftp-port", type=int, default=2121 if name == "serve" else 0, metavar="N")
        p.add_argument("--device-port", type=int, default=2222 if name == "serve" else 0,
                       metavar="N")
        p.add_argument("--state-dir", metavar="DIR")
        p.add_argument("--public-address", metavar="ADDR")
        p.add_argument("--data-ports", type=_port_range, default=(40000, 44999),
                       metavar="LOW-HIGH", help="ports for passive and rendezvous listeners")
        p.add_argument("--relay", choices=["rust", "python"], help="relay backend")
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "demo":
            p.add_argument("--dir", help="folder to publish (default: a temporary one)")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if args.command == "serve":
        return asyncio.run(_serve(_settings_from(args)))
    return asyncio.run(_demo(args))


def agent_main(argv: list[str] | None = None) -> int:
    from .agent import Agent, AgentSettings

    parser = argparse.ArgumentParser(
        prog="swiftftp-agent",
        description="Publish a local FTP server through a SwiftFTP proxy.",
    )
    parser.add_argument("--proxy", required=True, metavar="HOST:PORT", type=_host_port)
    parser.add_argument("--ftp", required=True, metavar="HOST:PORT", type=_host_port)
    parser.add_argument("--state-dir", metavar="DIR")
    parser.add_argument("--client-port", type=int, default=2121, metavar="N",
                        help="the proxy's FTP port, for the printed URL")
    parser.add_argument("--user", default="anonymous", help="FTP user for the printed URL")
    parser.add_argument("--relay", choices=["rust", "python"], help="relay backend")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    settings = AgentSettings(
        proxy_host=args.proxy[0], proxy_port=args.proxy[1],
        ftp_host=args.ftp[0], ftp_port=args.ftp[1],
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        client_port=args.client_port, user=args.user, relay_backend=args.relay,
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
