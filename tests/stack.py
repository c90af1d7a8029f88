"""Real parts for end-to-end tests, each on loopback in a thread of its own:
a proxy node, a pyftpdlib server on a folder, and the agent publishing it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import subprocess
import sys
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
from swiftftp.net import bracketed
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

    def __init__(self, root: Path, port: int = 0) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_user(FTP_USER, FTP_PASSWORD, str(root), perm="elradfmwMT")
        handler = type("TestHandler", (FTPHandler,), {"authorizer": authorizer, "timeout": 60})
        self.server = ThreadedFTPServer(("127.0.0.1", port), handler)
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


class AgentProcess:
    """``swiftftp-agent`` as its own process (as people run it), publishing
    ``ftp_host:ftp_port`` through ``proxy``; ready once it printed its URL.

    Its stderr is kept in ``logs``; ``logged(text)`` waits for a line."""

    def __init__(self, proxy: ProxyThread, ftp_host: str, ftp_port: int, state_dir: Path | None,
                 backend: str | None = None, *, user: str = FTP_USER, wait: bool = True,
                 env: dict[str, str] | None = None, port: int | None = None,
                 extra: list[str] | None = None) -> None:
        host = proxy.node.settings.listen
        code = "import sys; from swiftftp.cli import agent_main; sys.exit(agent_main())"
        port = port or proxy.device_port  # another device port of the node (its TLS one)
        argv = [sys.executable, "-c", code, "--proxy", f"{bracketed(host)}:{port}",
                "--ftp", f"{bracketed(ftp_host)}:{ftp_port}",
                "--client-port", str(proxy.ftp_port), "--user", user]
        if state_dir is not None:  # else its default, under $XDG_STATE_HOME or ~/.local/state
            argv += ["--state-dir", str(state_dir)]
        if backend:
            argv += ["--relay", backend]
        argv += extra or []
        env = {k: v for k, v in os.environ.items() if not k.startswith("SWIFTFTP_")} | (env or {})
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.logs: list[str] = []
        self.urls: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.urls), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.logs), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.url = ""
        self.prefix = ""
        if wait:
            self.wait_ready()

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._changed:
                into.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, found: Callable[[], T | None], timeout: float, what: str) -> T:
        with self._changed:
            if not self._changed.wait_for(lambda: found() is not None or self.proc.poll() is not None,
                                          timeout):
                raise AssertionError(f"agent: no {what} within {timeout:g} s: {self.logs[-5:]}")
            value = found()
        if value is None:
            raise AssertionError(f"agent exited {self.proc.wait(5)} before {what}: {self.logs[-5:]}")
        return value

    def wait_ready(self, timeout: float = 20) -> str:
        """The URL it printed (waits for it, bounded); sets ``url`` and ``prefix``."""
        self.url = self._wait(lambda: self.urls[0] if self.urls else None, timeout, "URL")
        self.prefix = self.url.removeprefix("ftp://").split("_", 1)[0]
        return self.url

    def logged(self, text: str, timeout: float = 10) -> str:
        """The first stderr line containing ``text`` (waits for it, bounded)."""
        return self._wait(lambda: next((line for line in self.logs if text in line), None),
                          timeout, f"log line with {text!r}")

    def exited(self, timeout: float = 20) -> int:
        """Its exit status, once it has ended by itself (bounded)."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def close(self, timeout: float = 20) -> int:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.exited(timeout)
