"""Stock FTP servers behind the agent, every common client through a real node: the matrix.

Each server of tests/ftpservers.py (pyftpdlib, vsftpd, ProFTPD, pure-ftpd:
Debian's binaries as foreground processes on loopback, their own config
files, a temporary root, a virtual or anonymous user) is published by its own
agent (a ``swiftftp-agent`` process, as people run it) through one node
(``ProxyThread``). Every client of
tests/ftpclients.py logs in to the node as ``<prefix>_<user>`` and does, in
each data mode it has, every operation it has (tests/ftpops.py):

    LIST · RETR 1 MiB · RETR 16 MiB · REST (a resumed RETR) · STOR 8 MiB · MKD · RNFR/RNTO · DELE

Every transfer is checked by SHA-256 against the other end's copy, every
change by looking at the server's directory, and afterwards the node's
transfer log must hold no failed transfer.

What runs (about 4 minutes on two cores for the whole module), on both relays
(rust and python):

* IPv4: every server by every client mode;
* IPv6 (node, agent and server on ``::1``): every client mode that exists over
  IPv6, with every server on the rust relay and with pure-ftpd on the python one;
* pure-ftpd with curl in active mode (the case that failed before the agent held
  the final reply back): RETR 1 MiB 20 times in a row, EPRT over IPv6, EPRT
  and PORT over IPv4.

Combinations that cannot exist, left out: wget has no upload, MKD, RNFR/RNTO
or DELE (it is run for LIST, RETR and REST); rclone has no active mode; a
``227`` cannot carry an IPv6 address, so PASV is not run over IPv6 (curl's
``--disable-epsv`` sends EPSV there anyway, rclone's ``pasv`` fails).

Run it alone with ``pytest -m matrix``; the table of results is printed at the end.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import ftpops
from tests.conftest import BACKENDS
from tests.ftpclients import CLIENTS, FtpClient, Target, sha256_file
from tests.ftpservers import KINDS, FtpServer, start_server
from tests.stack import AgentProcess, ProxyThread, node_settings

pytestmark = [pytest.mark.matrix, pytest.mark.timeout(300)]

DOWN_1M, DOWN_16M = "down-1m.bin", "down-16m.bin"
UP_SIZE = 8 << 20
RESUME_AT = 300_000
OPERATIONS = ("LIST", "RETR 1 MiB", "RETR 16 MiB", "REST", "STOR 8 MiB", "MKD", "RNFR/RNTO", "DELE")
HOSTS = {"ipv4": "127.0.0.1", "ipv6": "::1"}


@dataclass(frozen=True)
class Case:
    backend: str
    family: str
    kind: str
    client: str
    mode: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.family}-{self.kind}-{self.client}-{self.mode}"


def _modes(family: str) -> list[tuple[str, str]]:
    pairs = []
    for name, client in CLIENTS.items():
        for mode in client.modes:
            if name == "curl" and mode == "port":
                continue  # the node turns EPRT into PORT for the device anyway; run 20x below
            if family == "ipv6" and mode == "pasv":
                continue  # a 227 cannot carry an IPv6 address
            pairs.append((name, mode))
    return pairs


CASES = [
    Case(backend, family, kind, client, mode)
    for backend in BACKENDS
    for family in HOSTS
    # IPv6: every server on the rust relay, pure-ftpd on the python one
    for kind in (KINDS if family == "ipv4" or backend == "rust" else ("pureftpd",))
    for client, mode in _modes(family)
]
assert set(BACKENDS) == {c.backend for c in CASES}

#: What each case did: operation -> None (passed) or the failure's first lines.
RESULTS: dict[Case, dict[str, str | None]] = {}


@dataclass
class Published:
    """A server, the agent publishing it and the node it is published on."""

    server: FtpServer
    agent: AgentProcess
    proxy: ProxyThread

    def login(self) -> Target:
        return Target(self.proxy.node.settings.listen, self.proxy.ftp_port,
                      f"{self.agent.prefix}_{self.server.user}", self.server.password)

    def transfer_log(self) -> list[str]:
        path = self.proxy.node.settings.state_dir / "transfers.log"
        return path.read_text().splitlines() if path.exists() else []


class Stacks:
    """One node per relay backend and address family, at a time (the transfer log is
    the process's), with an agent and a server of each kind asked for."""

    def __init__(self, base: Path, upload: Path) -> None:
        self.base = base
        self.upload = upload
        self.key: tuple[str, str] | None = None
        self.proxy: ProxyThread | None = None
        self.published: dict[str, Published] = {}

    def get(self, backend: str, family: str, kind: str) -> Published:
        if self.key != (backend, family):
            self.close()
            host = HOSTS[family]
            state = self.base / f"node-{backend}-{family}"
            self.proxy = ProxyThread(node_settings(state, relay_backend=backend, listen=host,
                                                   pasv_accept_timeout=10, connect_timeout=10))
            self.key = (backend, family)
        if kind not in self.published:
            assert self.proxy is not None
            host = HOSTS[family]
            server = start_server(kind, host)
            try:
                for name, size in ((DOWN_1M, 1 << 20), (DOWN_16M, 16 << 20)):
                    (server.root / name).write_bytes(os.urandom(size))
                state = self.base / f"agent-{backend}-{family}-{kind}"
                agent = AgentProcess(self.proxy, host, server.port, state, backend, user=server.user)
            except BaseException:
                server.stop()
                raise
            self.published[kind] = Published(server, agent, self.proxy)
        return self.published[kind]

    def close(self) -> None:
        for published in self.published.values():
            published.agent.close()
            published.server.stop()
        self.published = {}
        if self.proxy is not None:
            self.proxy.close()
            self.proxy = None
        self.key = None


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stacks]:
    base = tmp_path_factory.mktemp("agent-matrix")
    upload = base / "up-8m.bin"
    upload.write_bytes(os.urandom(UP_SIZE))
    found = Stacks(base, upload)
    try:
        yield found
    finally:
        found.close()
        report = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if report is not None and capture is not None and RESULTS:
            with capture.global_and_fixture_disabled():
                report.write_line("")
                for line in table(RESULTS):
                    report.write_line(line)


def table(results: dict[Case, dict[str, str | None]]) -> list[str]:
    """The matrix as a Markdown table: operations passed per server, client and mode."""
    lines = ["| relay | family | server | client | mode | passed | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    total = passed = 0
    for case, ops in results.items():
        ok = sum(error is None for error in ops.values())
        total, passed = total + len(ops), passed + ok
        failed = ", ".join(op for op, error in ops.items() if error is not None) or "-"
        lines.append(f"| {case.backend} | {case.family} | {case.kind} | {case.client} | {case.mode} "
                     f"| {ok}/{len(ops)} | {failed} |")
    lines.append(f"\n{passed} of {total} operations passed in {len(results)} cases")
    return lines


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_cell(client: FtpClient, mode: str, pub: Published, work: Path, upload: Path) -> dict[str, str | None]:
    """Every operation ``client`` has, in ``mode``, through the node; each one's outcome."""
    login, root = pub.login(), pub.server.root
    tag = f"{client.name}-{mode}-{secrets.token_hex(3)}"
    upname, newname, dirname = f"up-{tag}.bin", f"moved-{tag}.bin", f"dir-{tag}"
    results: dict[str, str | None] = {}

    def op(name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except Exception as exc:  # every failure is reported with the others
            results[name] = "".join(traceback.format_exception_only(exc)).strip()[:2000]
        else:
            results[name] = None

    def listing() -> None:
        text = client.list(login, mode)
        assert DOWN_1M in text, f"{DOWN_1M} not in the listing:\n{text}"

    def retr(name: str) -> Callable[[], None]:
        def body() -> None:
            dest = work / f"got-{name}"
            client.get(login, name, dest, mode)
            assert sha256_file(dest) == sha256_file(root / name), f"RETR {name}: SHA-256 differs"
            dest.unlink()
        return body

    def rest() -> None:
        folder = work / "resume"
        folder.mkdir()
        dest = folder / DOWN_1M  # wget continues a file of the remote's name
        dest.write_bytes((root / DOWN_1M).read_bytes()[:RESUME_AT])
        ftpops.resume(client, login, DOWN_1M, dest, mode)
        assert sha256_file(dest) == sha256_file(root / DOWN_1M), "resumed RETR: SHA-256 differs"

    def stor() -> None:
        client.put(login, upload, upname, mode)
        assert (root / upname).exists(), f"STOR {upname} left no file"
        assert sha256_file(root / upname) == sha256_file(upload), "STOR: SHA-256 differs"

    def mkd() -> None:
        ftpops.mkdir(client, login, dirname, mode)
        assert (root / dirname).is_dir(), f"MKD {dirname} made no directory"

    def rnfr_rnto() -> None:
        if not (root / upname).exists():  # STOR failed: rename a file put there directly
            shutil.copyfile(upload, root / upname)
        ftpops.rename(client, login, upname, newname, mode)
        assert not (root / upname).exists() and (root / newname).exists(), "RNFR/RNTO: not renamed"
        assert sha256_file(root / newname) == sha256_file(upload), "RNFR/RNTO: contents changed"

    def dele() -> None:
        if not (root / newname).exists():
            shutil.copyfile(upload, root / newname)
        ftpops.delete(client, login, newname, mode)
        assert not (root / newname).exists(), f"DELE {newname}: still there"

    op("LIST", listing)
    op("RETR 1 MiB", retr(DOWN_1M))
    op("RETR 16 MiB", retr(DOWN_16M))
    op("REST", rest)
    can = ftpops.CAN[client.name]
    if client.can_store:
        op("STOR 8 MiB", stor)
    if "mkdir" in can:
        op("MKD", mkd)
    if "rename" in can:
        op("RNFR/RNTO", rnfr_rnto)
    if "delete" in can:
        op("DELE", dele)
    return results


def failed_transfers(pub: Published, before: int) -> list[str]:
    """The node's transfer-log lines after the first ``before`` that are not ``ok``,
    once the node has no data connection left."""
    pub.proxy.quiet_tasks()
    return [line for line in pub.transfer_log()[before:] if "outcome=ok" not in line]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matrix(stacks: Stacks, case: Case, tmp_path: Path) -> None:
    """One server, one client, one mode: every operation, SHA-256 both ways."""
    pub = stacks.get(case.backend, case.family, case.kind)
    before = len(pub.transfer_log())
    results = run_cell(CLIENTS[case.client], case.mode, pub, tmp_path, stacks.upload)
    RESULTS[case] = results
    failed = {name: error for name, error in results.items() if error is not None}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())
    assert not failed_transfers(pub, before), "failed transfers in the node's log"


# python first: the matrix's last cases left a python IPv6 stack running
@pytest.mark.parametrize(("backend", "family", "mode"), [
    (backend, family, mode) for backend in reversed(BACKENDS)
    for family, mode in (("ipv6", "eprt"), ("ipv4", "eprt"), ("ipv4", "port"))
])
def test_pureftpd_curl_active_20_times(stacks: Stacks, backend: str, family: str, mode: str,
                                       tmp_path: Path) -> None:
    """pure-ftpd sends its 226 right after a small file; curl in active mode gives up if
    that reply comes before the node's connection to it. 20 RETR of 1 MiB in a row."""
    pub = stacks.get(backend, family, "pureftpd")
    before = len(pub.transfer_log())
    login, want = pub.login(), sha256_file(pub.server.root / DOWN_1M)
    passed, errors = 0, []
    for i in range(20):
        dest = tmp_path / f"got-{i}.bin"
        try:
            CLIENTS["curl"].get(login, DOWN_1M, dest, mode)
            assert sha256_file(dest) == want, "SHA-256 differs"
            passed += 1
        except AssertionError as exc:
            errors.append(str(exc).splitlines()[1:3])
    RESULTS[Case(backend, family, "pureftpd", "curl", f"{mode} RETR 1 MiB x20")] = {
        f"RETR #{i + 1}": None for i in range(passed)
    } | {f"failed #{i + 1}": "x" for i in range(20 - passed)}
    assert passed == 20, f"{passed} of 20 passed: {errors}"
    assert not failed_transfers(pub, before), "failed transfers in the node's log"
