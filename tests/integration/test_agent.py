"""The device agent as a product: a stable identity of its own, it comes back by
itself, it waits for its FTP server and says clearly what went wrong, and a data
connection that cannot be made is a failure the client and the node's log see."""

from __future__ import annotations

import contextlib
import ftplib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from swiftftp.agent import Agent, AgentSettings
from swiftftp.cli import agent_parser
from swiftftp.identity import load_or_create_key
from tests.ftpservers import FtpServer, free_port_block, start_server
from tests.helpers import fd_targets, wait_for_fds, wait_until
from tests.stack import (
    FTP_PASSWORD,
    FTP_USER,
    AgentProcess,
    AgentThread,
    FtpServerThread,
    LoopThread,
    ProxyThread,
    node_settings,
)


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


# ---- running it at home: its own state dir, locked; waits for its FTP server; says why ----------


def test_second_agent_on_a_state_dir_refuses_to_start(tmp_path: Path) -> None:
    """Two agents on one state dir would share a device id and evict each other: the
    second gets one clear line and exit 1; the first goes on."""
    proxy = ProxyThread(node_settings(tmp_path / "proxy"))
    closed = free_closed_port()
    first = AgentProcess(proxy, "127.0.0.1", closed, tmp_path / "agent", wait=False)
    try:
        first.logged("no FTP server at")  # it holds the lock before it probes
        second = AgentProcess(proxy, "127.0.0.1", closed, tmp_path / "agent", wait=False)
        assert second.exited() == 1
        assert second.logs == [
            f"swiftftp-agent: another swiftftp-agent (pid {first.proc.pid}) is running on the "
            f"state directory {tmp_path / 'agent'}; give each agent its own --state-dir"
        ]
        assert first.proc.poll() is None
    finally:
        first.close()
        proxy.close()


def test_default_state_dir_is_the_agents_own(tmp_path: Path) -> None:
    """Not the node's (~/.local/state/swiftftp): ~/.local/state/swiftftp-agent."""
    ftpd = FtpServerThread(tmp_path)
    proxy = ProxyThread(node_settings(tmp_path / "proxy"))
    state = tmp_path / "xdg"
    agent = AgentProcess(proxy, "127.0.0.1", ftpd.port, None, env={"XDG_STATE_HOME": str(state)})
    try:
        found = sorted(p.name for p in (state / "swiftftp-agent").iterdir())
        assert found == ["agent-device-id", "agent-device-key", "agent.lock"]
        assert [p.name for p in state.iterdir()] == ["swiftftp-agent"]
    finally:
        assert agent.close() == 0
        proxy.close()
        ftpd.close()


def test_upgraded_agent_keeps_its_prefix(tmp_path: Path) -> None:
    """An agent that kept its id in the node's default directory (earlier versions) finds
    it there: the id moves to its own directory, and the prefix stays the same."""
    ftpd = FtpServerThread(tmp_path)
    proxy = ProxyThread(node_settings(tmp_path / "proxy"))
    state = tmp_path / "xdg"
    (state / "swiftftp").mkdir(parents=True)
    (state / "swiftftp" / "agent-device-id").write_text("agent-from-before\n")
    prefix = proxy.run(lambda node: node.registry.prefix_for("agent-from-before"))
    agent = AgentProcess(proxy, "127.0.0.1", ftpd.port, None, env={"XDG_STATE_HOME": str(state)})
    try:
        assert agent.prefix == prefix
        assert (state / "swiftftp-agent" / "agent-device-id").read_text() == "agent-from-before\n"
        assert not (state / "swiftftp" / "agent-device-id").exists()
        assert agent.logged("device id moved from").endswith(
            f"device id moved from {state / 'swiftftp' / 'agent-device-id'} to "
            f"{state / 'swiftftp-agent' / 'agent-device-id'} (the agent's own state directory)")
    finally:
        assert agent.close() == 0
        proxy.close()
        ftpd.close()


def test_agent_waits_for_its_ftp_server_and_turns_clients_away_when_it_is_gone(
    tmp_path: Path, backend_name: str
) -> None:
    """No FTP server at start: one clear line, no URL, not online on the node; once the
    server answers, it is published. When the server goes away, a client gets 421 and
    the agent writes one WARNING, never a traceback."""
    proxy = ProxyThread(node_settings(tmp_path / "proxy", relay_backend=backend_name))
    port = free_port_block("127.0.0.1", 1)
    agent = AgentProcess(proxy, "127.0.0.1", port, tmp_path / "agent", backend_name, wait=False)
    ftpd = None
    try:
        line = agent.logged("no FTP server at")
        assert line.endswith(f"WARNING [-] swiftftp.agent: no FTP server at 127.0.0.1:{port} "
                             "(connection refused); not publishing it until it answers "
                             "(retrying every 30 s at most)")
        assert not agent.urls and proxy.run(lambda node: node.table.online) == 0
        (tmp_path / "root").mkdir()
        ftpd = FtpServerThread(tmp_path / "root", port)
        agent.wait_ready()
        assert listing(proxy, agent.prefix) == []
        baseline = proxy.quiet_tasks()
        ftpd.close()
        ftpd = None
        ftp = ftplib.FTP()
        ftp.connect("127.0.0.1", proxy.ftp_port, timeout=20)
        with pytest.raises(ftplib.error_temp, match=r"^421 The FTP server behind this device is not running"):
            ftp.login(f"{agent.prefix}_{FTP_USER}", FTP_PASSWORD)
        ftp.close()
        refused = agent.logged("the client gets 421")
        assert refused.endswith(
            f"no FTP server at 127.0.0.1:{port} (connection refused); the client gets 421")
        assert proxy.quiet_tasks() == baseline
    finally:
        agent.close()
        if ftpd:
            ftpd.close()
        proxy.close()
    assert [line for line in agent.logs if "no FTP server" in line and "client" not in line] == [line]
    assert not [line for line in agent.logs if "Traceback" in line or "ERROR" in line]


def test_agent_says_when_the_node_replaced_its_session(tmp_path: Path) -> None:
    """A copy of an agent's device id logs in elsewhere: the node tells the first agent
    before it closes its session, and the agent says so (not "closed the connection")."""
    (tmp_path / "root").mkdir()
    ftpd = FtpServerThread(tmp_path / "root")
    proxy = ProxyThread(node_settings(tmp_path / "proxy"))
    first = AgentProcess(proxy, "127.0.0.1", ftpd.port, tmp_path / "one")
    (tmp_path / "two").mkdir()
    # a cloned state directory: the id and its key (the id alone is refused: test_identity.py)
    for name in ("agent-device-id", "agent-device-key"):
        shutil.copy(tmp_path / "one" / name, tmp_path / "two" / name)
    device_id = (tmp_path / "one" / "agent-device-id").read_text().strip()
    try:
        second = AgentProcess(proxy, "127.0.0.1", ftpd.port, tmp_path / "two")
        assert second.prefix == first.prefix
        notice = first.logged("replaced this session")
        assert notice.endswith("WARNING [-] swiftftp.agent: the proxy replaced this session: this device id "
                               "logged in again from 127.0.0.1; this session is replaced")
        ended = first.logged("command session to")
        assert ended.endswith(f"ended: replaced by a new login of device id {device_id}; "
                              "logging in again in 60 s")
        assert listing(proxy, second.prefix) == []  # the second one serves
        second.close()
    finally:
        first.close()
        proxy.close()
        ftpd.close()
    assert not [line for line in first.logs if "closed the connection" in line]


def test_two_agents_sharing_an_id_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two agents with one device id keep replacing each other; each waits
    ``replaced_delay`` before logging in again, and the second time within ten minutes
    it says plainly that two agents share the id."""
    (tmp_path / "root").mkdir()
    ftpd = FtpServerThread(tmp_path / "root")
    proxy = ProxyThread(node_settings(tmp_path / "proxy"))
    load_or_create_key(tmp_path / "one")  # one key, copied with the id: a cloned state directory
    for name in ("one", "two"):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "agent-device-id").write_text("agent-shared\n")
    shutil.copy(tmp_path / "one" / "agent-device-key", tmp_path / "two" / "agent-device-key")
    loop = LoopThread("agents")
    agents = [Agent(AgentSettings(proxy_host="127.0.0.1", proxy_port=proxy.device_port,
                                  ftp_host="127.0.0.1", ftp_port=ftpd.port, state_dir=tmp_path / name,
                                  replaced_delay=0.2), on_ready=lambda url: None)
              for name in ("one", "two")]
    tasks = [loop.submit(agent.run()) for agent in agents]
    try:
        wait_until(lambda: any("times in 10 min" in r.getMessage() for r in caplog.records), 20,
                   "the hint that two agents share the id")
    finally:
        for task in tasks:
            task.cancel()
        loop.stop()
        proxy.close()
        ftpd.close()
    [hint, *_] = [r for r in caplog.records if "times in 10 min" in r.getMessage()]
    assert hint.levelname == "ERROR"
    assert re.fullmatch(
        r"the proxy replaced this agent's session 2 times in 10 min: another agent is logging in "
        r"with the same device id agent-shared \(a copy of .*/(one|two)/agent-device-id\?\); "
        r"give each agent its own state directory", hint.getMessage()), hint.getMessage()


# ---- data connections that fail: the client is told, the node logs it -------------------


class Control:
    """A raw FTP control connection to the node: lines out, whole replies in."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=20)
        self.reader = self.sock.makefile("rb")
        assert self.reply().startswith("220")

    def send(self, *lines: str) -> None:
        """Lines in one write (pipelined)."""
        self.sock.sendall("".join(f"{line}\r\n" for line in lines).encode())

    def reply(self) -> str:
        """The last line of the next reply."""
        while True:
            line = self.reader.readline(8192).decode("latin-1").rstrip("\r\n")
            assert line, "the node closed the connection"
            if line[:3].isdigit() and line[3:4] == " ":
                return line

    def login(self, user: str, password: str) -> None:
        self.send(f"USER {user}")
        assert self.reply().startswith("331")
        self.send(f"PASS {password}")
        assert self.reply().startswith("230")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@contextlib.contextmanager
def publish(kind: str, host: str, backend: str, base: Path) -> Iterator[Published]:
    """A server of ``kind`` with a 1 KiB file, an agent in this process, a node (with a
    short passive accept) on ``host``."""
    server = start_server(kind, host)
    try:
        (server.root / "small.bin").write_bytes(os.urandom(1024))
        proxy = ProxyThread(node_settings(base / "proxy", relay_backend=backend, listen=host,
                                          pasv_accept_timeout=1))
        try:
            agent = AgentThread(proxy, server.port, base / "agent", backend, ftp_host=host,
                                user=server.user)
            try:
                yield Published(host, server, proxy, agent)
            finally:
                agent.close()
        finally:
            proxy.close()
    finally:
        server.stop()


@pytest.fixture(params=["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def published(request: pytest.FixtureRequest, tmp_path: Path, backend_name: str) -> Iterator[Published]:
    """pyftpdlib behind an agent, on 127.0.0.1 or ::1."""
    with publish("pyftpdlib", request.param, backend_name, tmp_path) as found:
        yield found


@dataclass
class Published:
    host: str
    server: FtpServer
    proxy: ProxyThread
    agent: AgentThread

    def control(self) -> Control:
        control = Control(self.host, self.proxy.ftp_port)
        control.login(f"{self.agent.prefix}_{self.server.user}", self.server.password)
        return control

    def failed_transfers(self) -> list[str]:
        log = self.proxy.node.settings.state_dir / "transfers.log"
        return [line for line in log.read_text().splitlines() if "outcome=failed" in line]


def free_closed_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (bound, then closed: connecting to it is refused)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("kind", ["pureftpd", "pyftpdlib"])
def test_active_connection_the_node_cannot_make_is_a_425(
    kind: str, host: str, backend_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's data port refuses: the server's final reply never reaches the client;
    it gets 425 with the reason, the node logs a WARNING and a failed transfer, the agent
    a WARNING (IPv6 addresses in brackets), and nothing is left open.

    pure-ftpd connects when the RETR comes (its 226 is held, then replaced); pyftpdlib
    as soon as the PORT comes (the RETR is answered by the agent)."""
    with publish(kind, host, backend_name, tmp_path) as published:
        check_active_failure(published, caplog)


def check_active_failure(published: Published, caplog: pytest.LogCaptureFixture) -> None:
    baseline = published.proxy.quiet_tasks(), fd_targets()
    port = free_closed_port(published.host)
    client = f"[{published.host}]:{port}" if ":" in published.host else f"127.0.0.1:{port}"
    control = published.control()
    try:
        family = 2 if ":" in published.host else 1
        control.send(f"EPRT |{family}|{published.host}|{port}|")
        assert control.reply().startswith("200")
        control.send("RETR small.bin")
        while (reply := control.reply()).startswith("1"):
            pass  # pure-ftpd's 150
        assert reply.startswith("425 Cannot open the data connection: proxy error 14: connect failed:")
        assert "ECONNREFUSED" in reply
        control.send("NOOP")
        assert control.reply().startswith("200")  # the session goes on
    finally:
        control.close()
    assert published.proxy.quiet_tasks() == baseline[0]
    wait_for_fds(baseline[1])
    [failed] = published.failed_transfers()
    assert f"client={client} direction=none bytes=0" in failed
    assert 'outcome=failed reason="connect failed:' in failed
    messages = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    prefix = published.agent.prefix
    assert any(name == "swiftftp.devices" and level == "WARNING"
               and msg.startswith(f"data connection of {prefix} to {client} failed: connect failed:")
               for name, level, msg in messages), messages
    assert any(name == "swiftftp.agent" and level == "WARNING"
               and f"active data connection to {client} failed: proxy error 14" in msg
               for name, level, msg in messages), messages


def test_passive_connection_no_client_takes_is_a_425(published: Published) -> None:
    """The client asks for a transfer in passive mode and never connects: after the
    node's pasv_accept timeout it gets 425, and the transfer log says why."""
    baseline = published.proxy.quiet_tasks(), fd_targets()
    control = published.control()
    try:
        control.send("EPSV")
        assert control.reply().startswith("229")
        control.send("RETR small.bin")
        assert control.reply()[:1] == "1"  # 150 or 125
        assert control.reply() == ("425 Cannot open the data connection: proxy error 13: "
                                   "no client connected.")
    finally:
        control.close()
    assert published.proxy.quiet_tasks() == baseline[0]
    wait_for_fds(baseline[1])
    [failed] = published.failed_transfers()
    assert 'client=- direction=none bytes=0' in failed
    assert 'outcome=failed reason="no client connected within 1 s"' in failed


def test_client_leaving_mid_setup_leaves_nothing_open(published: Published) -> None:
    """A client that goes away while its data connection is being set up (passive: the
    node still waits for it; active: the node has connected to it, nothing read yet):
    the node's tasks and this process's descriptors (the agent's too) are back where
    they were."""
    baseline = published.proxy.quiet_tasks(), fd_targets()
    control = published.control()
    control.send("EPSV")
    assert control.reply().startswith("229")
    control.send("RETR small.bin")
    control.close()
    assert published.proxy.quiet_tasks() == baseline[0]
    wait_for_fds(baseline[1])

    family = socket.AF_INET6 if ":" in published.host else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((published.host, 0))
        listener.listen(1)
        control = published.control()
        number = 2 if family == socket.AF_INET6 else 1
        control.send(f"EPRT |{number}|{published.host}|{listener.getsockname()[1]}|")
        assert control.reply().startswith("200")
        control.close()
    assert published.proxy.quiet_tasks() == baseline[0]
    wait_for_fds(baseline[1])


def test_malformed_port_and_eprt_are_501_in_their_place(published: Published) -> None:
    """PORT/EPRT arguments that do not parse exactly never reach the server: the agent
    answers 501, in order with the server's replies to pipelined commands."""
    control = published.control()
    try:
        control.send("NOOP", "PORT 1,2,3", "NOOP", "EPRT |3|x|1|", "PORT 127,0,0,1,0,0", "NOOP")
        assert [control.reply()[:3] for _ in range(6)] == ["200", "501", "200", "501", "501", "200"]
    finally:
        control.close()


# ---- the systemd unit ----------------------------------------------------------------------


UNIT = Path(__file__).parents[2] / "contrib" / "swiftftp-agent.service"


def test_agent_unit(tmp_path: Path) -> None:
    """contrib/swiftftp-agent.service: ``systemd-analyze verify`` finds nothing (with
    ExecStart pointing at this checkout's agent), the hardening score is at most 3.0
    and the one its comment gives, and its command line is the agent's own."""
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("no systemd-analyze here")
    text = UNIT.read_text()
    [exec_start] = re.findall(r"^ExecStart=(.*)$", text, re.M)
    [environment] = re.findall(r"^Environment=(.*)$", text, re.M)
    defaults = dict(pair.split("=", 1) for pair in environment.split())
    # ${VAR}: one word; $VAR: split into words, none when empty (systemd.service(5))
    argv = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m[1] or m[2]], exec_start).split()
    assert argv[0] == "/opt/swiftftp/bin/swiftftp-agent"
    args = agent_parser().parse_args(argv[1:])
    assert (args.proxy, args.ftp, args.user, args.state_dir) == (
        "proxy.example.org:2222", "127.0.0.1:21", "anonymous", "/var/lib/swiftftp-agent")
    agent = Path(sys.executable).with_name("swiftftp-agent")
    local = tmp_path / UNIT.name
    local.write_text(text.replace("/opt/swiftftp/bin/swiftftp-agent", str(agent)))
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in done.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {done.stderr.strip()}")
    m = re.search(r"Overall exposure level for swiftftp-agent\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout[-500:] + done.stderr
    assert float(m[1]) <= 3.0
    assert f"scores {m[1]} OK" in text
