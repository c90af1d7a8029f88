"""End-to-end fixtures: files to move, and the whole stack per relay backend."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BACKENDS
from tests.helpers import fd_targets, wait_for_fds
from tests.stack import AgentThread, FtpServerThread, ProxyThread, node_settings

SIZES = {"empty.bin": 0, "one-mib.bin": 1 << 20, "big.bin": 64 << 20}
UPLOAD_SIZE = 16 << 20


@dataclass
class Files:
    root: Path  # served by the FTP server
    upload: Path  # a 16 MiB file outside it


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("ftproot")
    for name, size in SIZES.items():
        (root / name).write_bytes(os.urandom(size))
    upload = tmp_path_factory.mktemp("upload") / "upload.bin"
    upload.write_bytes(os.urandom(UPLOAD_SIZE))
    return Files(root, upload)


@dataclass
class Stack:
    backend: str
    proxy: ProxyThread
    ftpd: FtpServerThread
    agent: AgentThread
    root: Path

    @property
    def prefix(self) -> str:
        return self.agent.prefix

    @property
    def port(self) -> int:
        return self.proxy.ftp_port

    def baseline(self) -> tuple[int, dict[int, str]]:
        """The node's tasks once quiet, and the process's open fds: what a test returns to."""
        return self.proxy.quiet_tasks(), fd_targets()

    def settle(self, baseline: tuple[int, dict[int, str]]) -> None:
        """Wait until the node and the process are back to ``baseline``."""
        tasks, fds = baseline
        assert self.proxy.quiet_tasks() == tasks
        wait_for_fds(fds)


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          files: Files) -> Iterator[Stack]:
    backend = request.param
    base = tmp_path_factory.mktemp(f"stack-{backend}")
    root = base / "root"
    shutil.copytree(files.root, root)
    proxy = ProxyThread(node_settings(base / "proxy-state", relay_backend=backend))
    ftpd = FtpServerThread(root)
    agent = AgentThread(proxy, ftpd.port, base / "agent-state", backend)
    try:
        yield Stack(backend, proxy, ftpd, agent, root)
    finally:
        agent.close()
        ftpd.close()
        proxy.close()
