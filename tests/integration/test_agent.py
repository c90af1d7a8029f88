"""The device agent as a product: a stable identity, and it comes back by itself."""

from __future__ import annotations

import ftplib
from dataclasses import replace
from pathlib import Path

from tests.helpers import wait_until
from tests.stack import FTP_PASSWORD, FTP_USER, AgentThread, FtpServerThread, ProxyThread, node_settings


def listing(proxy: ProxyThread, prefix: str) -> list[str]:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
    ftp.login(f"{prefix}_{FTP_USER}", FTP_PASSWORD)
    names = ftp.nlst()
    ftp.quit()
    return names


def test_agent_reconnects_after_the_proxy_restarts(tmp_path: Path, backend_name: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "kept.txt").write_text("still here")
    ftpd = FtpServerThread(root)
    settings = node_settings(tmp_path / "proxy", relay_backend=backend_name)
    proxy = ProxyThread(settings)
    agent = AgentThread(proxy, ftpd.port, tmp_path / "agent", backend_name)
    try:
        prefix = agent.prefix
        assert listing(proxy, prefix) == ["kept.txt"]
        ports = {"ftp_port": proxy.ftp_port, "device_port": proxy.device_port}
        proxy.close()  # the node goes away: the agent's command session breaks
        proxy = ProxyThread(replace(settings, **ports))  # and comes back on the same ports
        wait_until(lambda: proxy.run(lambda n: n.online(prefix) is not None), 15,
                   "the agent to come back")
        assert listing(proxy, prefix) == ["kept.txt"]  # same device id, same prefix
    finally:
        agent.close()
        proxy.close()
        ftpd.close()


def test_agent_keeps_its_device_id(tmp_path: Path, backend_name: str) -> None:
    ftpd = FtpServerThread(tmp_path)
    proxy = ProxyThread(node_settings(tmp_path / "proxy", relay_backend=backend_name))
    try:
        prefixes = []
        for _ in range(2):
            agent = AgentThread(proxy, ftpd.port, tmp_path / "agent", backend_name)
            prefixes.append(agent.prefix)
            agent.close()
        assert prefixes[0] == prefixes[1]
    finally:
        proxy.close()
        ftpd.close()
