"""Real parts for end-to-end tests, each on loopback in a thread of its own:
a proxy node, a pyftpdlib server on a folder, and the agent publishing it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer

from swiftftp.agent import Agent, AgentSettings
from swiftftp.config import Settings
from swiftftp.node import ProxyNode

T = TypeVar("T")
FTP_USER, FTP_PASSWORD = "user", "secret"

logging.getLogger("pyftpdlib").setLevel(logging.WARNING)


class LoopThread:
    """An asyncio loop running in a daemon thread; ``call`` runs a coroutine there."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; its result comes later."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.call(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def node_settings(state_dir: Path, **overrides: Any) -> Settings:
    """Node settings for tests: loopback, free ports, short timeouts where a test waits."""
    base = Settings(
        listen="127.0.0.1",
        ftp_port=0,
        device_port=0,
        state_dir=state_dir,
        data_ports=(0, 0),
        device_login_timeout=3,
        rendezvous_timeout=5,
        pasv_accept_timeout=3,
        pasv_listen_timeout=10,
        connect_timeout=3,
        idle_timeout=60,
        stats_listen=("127.0.0.1", 0),
        failure_delay=0,
    )
    return replace(base, **overrides)


class ProxyThread(LoopThread):
    """A proxy node on its own loop."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("proxy")
        self.node = ProxyNode(settings)
        self.call(self.node.start())
        self.ftp_port = self.node.ftp_port
        self.device_port = self.node.device_port

    def run(self, fn: Callable[[ProxyNode], T]) -> T:
        """Run ``fn(node)`` on the node's loop (to read its state safely)."""

        async def wrapper() -> T:
            return fn(self.node)

        return self.call(wrapper())

    def tasks(self) -> int:
        return self.run(lambda node: node.tasks)

    def quiet_tasks(self, timeout: float = 10) -> int:
        """The node's task count once no FTP client is connected and no control or data
        session or passive listener is open: a baseline without a previous client still closing."""

        def quiet(node: ProxyNode) -> bool:
            clients = [t for t in node._tasks if t.get_name().startswith("ftp")]
            relayed = [s for s in node.sessions if s.kind != "command"]
            return not clients and not relayed and not node.pending_listeners

        deadline = time.monotonic() + timeout
        while not self.run(quiet):
            if time.monotonic() > deadline:
                raise AssertionError("the node did not become quiet")
            time.sleep(0.01)
        return self.tasks()

    def close(self) -> None:
        if self.loop.is_closed():
            return  # closed already (a test may stop a node itself)
        self.call(self.node.close())
        self.node.registry.close()
        self.stop()


class FtpServerThread:
    """pyftpdlib on ``root``: user/secret with full rights, plus anonymous read-write."""

    def __init__(self, root: Path) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_user(FTP_USER, FTP_PASSWORD, str(root), perm="elradfmwMT")
        handler = type("TestHandler", (FTPHandler,), {"authorizer": authorizer, "timeout": 60})
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.address[1]
        self.root = root
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"timeout": 0.1}, name="ftpd", daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.close_all()
        self.thread.join(10)


class AgentThread(LoopThread):
    """The agent on its own loop, publishing ``ftp_port`` through the proxy."""

    def __init__(self, proxy: ProxyThread, ftp_port: int, state_dir: Path, backend: str, *,
                 ftp_host: str = "127.0.0.1", user: str = FTP_USER) -> None:
        super().__init__("agent")
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self.agent = Agent(
            AgentSettings(
                proxy_host=proxy.node.settings.listen, proxy_port=proxy.device_port,
                ftp_host=ftp_host, ftp_port=ftp_port,
                state_dir=state_dir, client_port=proxy.ftp_port, user=user,
                relay_backend=backend,
            ),
            on_ready=lambda url: ready.done() or ready.set_result(url),
        )
        self.task = asyncio.run_coroutine_threadsafe(self.agent.run(), self.loop)
        try:
            self.url = ready.result(15)
        except concurrent.futures.TimeoutError:
            failure = self.task.exception(0) if self.task.done() else None
            self.close()
            raise AssertionError(f"the agent did not come online within 15 s: {failure!r}") from None
        self.prefix = self.agent.prefix
        assert self.prefix

    def close(self) -> None:
        self.task.cancel()
        self.stop()
