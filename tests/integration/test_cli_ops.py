"""The command line for operators: version, help everywhere, devices options in
either place, the device list (sizes, online on the running node), usage errors,
a node that does not answer, and shell completion in real bash and zsh."""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from swiftftp import admin
from swiftftp.cli import agent_parser, proxy_parser
from swiftftp.completion import tables
from swiftftp.quota import period_key
from swiftftp.registry import Registry
from tests.fielddevice import FieldDevice
from tests.serveproc import Serve, clean_env, node_config


def cli(*args: str, program: str = "swiftftp") -> subprocess.CompletedProcess:
    code = "import sys; from swiftftp.cli import agent_main; sys.exit(agent_main())"
    command = [sys.executable, "-c", code] if program == "agent" else [sys.executable, "-m", "swiftftp"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, env=clean_env())


def test_version_names_the_program() -> None:
    assert cli("--version").stdout == "swiftftp-proxy 0.1.0\n"
    assert cli("--version", program="agent").stdout == "swiftftp-agent 0.1.0\n"


def test_every_option_and_action_has_help() -> None:
    parsers = {"swiftftp-proxy": proxy_parser(), "swiftftp-agent": agent_parser()}
    missing = []
    for path, level in tables(parsers).items():
        missing += [f"{path} {name}" for name, text in level.commands if not text]
        missing += [f"{path} {flag}" for flag, text in level.options if not text]

    def positionals(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if not sub.description:
                        missing.append(f"{path} {name}: no description")
                    positionals(sub, f"{path} {name}")
            elif not action.option_strings and not action.help:
                missing.append(f"{path} {action.dest}")

    for name, parser in parsers.items():
        positionals(parser, name)
    assert missing == []
    text = cli("check-config", "--help").stdout
    assert re.search(r"FILE\s+the TOML configuration file to check", text)
    text = cli("serve", "--help").stdout
    assert re.search(r"-v, --verbose\s+debug logging", text)
    assert re.search(r"--log-format \{plain,json\}\s+log lines on stderr", text)
    text = cli("--help", program="agent").stdout
    assert re.search(r"--ftp HOST:PORT\s+the FTP server to publish", text)
    assert re.search(r"--state-dir DIR\s+where the device id is kept", text)


def test_device_list_options_anywhere_sizes_and_online(tmp_path: Path) -> None:
    state = tmp_path / "state"
    node = Serve("--config", str(node_config(tmp_path)))
    online = FieldDevice(node.device_port, android_id="online-phone").start()
    offline = FieldDevice(node.device_port, android_id="offline-phone").start()
    try:
        offline.stop()
        registry = Registry(state / "registry.sqlite3")
        try:
            registry.add_usage(period_key("month"), {"online-phone": 1_572_864})
        finally:
            registry.close()
        assert cli("devices", "--state-dir", str(state), "set-quota", "online-phone", "10GiB").returncode == 0
        before = cli("devices", "--state-dir", str(state), "list")
        after = cli("devices", "list", "--state-dir", str(state))
        assert before.returncode == after.returncode == 0, before.stderr + after.stderr
        assert before.stdout == after.stdout
        rows = {line.split()[0]: line for line in before.stdout.splitlines()[1:-1]}
        assert re.search(r"\bonline-phone\s+yes\s+1\.5 MiB\s+10\.0 GiB\s+default\s+default",
                         rows[online.prefix])
        assert re.search(r"\boffline-phone\s+no\s+0 B\s+unlimited", rows[offline.prefix])
        assert before.stdout.splitlines()[-1] == f"2 devices; usage period {period_key('month')}; 1 online"
        # with no node running the column says it does not know, and a note says why
        online.stop()
        assert node.stop() == 0
        done = cli("devices", "list", "--config", str(tmp_path / "node.toml"))
        assert done.returncode == 0
        assert re.search(r"\bonline-phone\s+\?\s+1\.5 MiB", done.stdout)
        assert not (state / "control.sock").exists()  # the stopped node removed its socket file
        assert re.fullmatch(rf"online: unknown \(no running node at {state}/control\.sock: "
                            r"No such file or directory\)", done.stdout.splitlines()[-1])
    finally:
        online.stop()
        node.kill()


def test_set_rate_needs_a_rate(tmp_path: Path) -> None:
    done = cli("devices", "--state-dir", str(tmp_path), "set-rate", "abcde")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("swiftftp-proxy: devices set-rate: give --upload RATE, --download RATE or both "
                           "(RATE in bytes/s like 2M, or 'default')\n")


def unanswering_node(path: Path, silent: bool) -> socket.socket:
    """A control socket that takes the request and closes (or stays silent)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    kept: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.recv(4096)
            if silent:
                kept.append(conn)
            else:
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_message_to_a_node_that_does_not_answer(tmp_path: Path) -> None:
    path = admin.socket_path(tmp_path)
    server = unanswering_node(path, silent=False)
    try:
        done = cli("devices", "message", "abcde", "hello", "--state-dir", str(tmp_path))
    finally:
        server.close()
    assert done.returncode == 1
    assert done.stderr == f"swiftftp-proxy: the node at {path} closed the connection without an answer\n"
    path.unlink()
    server = unanswering_node(path, silent=True)
    try:
        started = time.monotonic()
        with pytest.raises(admin.AdminError, match=r"did not answer within 0\.3 s$"):
            admin.request(path, {"command": "online"}, timeout=0.3)
        assert time.monotonic() - started < 5
    finally:
        server.close()


# ---- shell completion ----------------------------------------------------------------------


def bash_complete(words: list[str], script: str) -> list[str]:
    """COMPREPLY of the generated function for ``words`` (the last one being completed)."""
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    program = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}\n"
               f"_swiftftp_complete; printf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return [line for line in done.stdout.splitlines() if line]


def test_bash_completion(tmp_path: Path) -> None:
    script = cli("completion", "bash").stdout
    assert "complete -F _swiftftp_complete swiftftp-proxy swiftftp-agent" in script
    assert set(bash_complete(["swiftftp-proxy", ""], script)) == {
        "serve", "demo", "check-config", "stats", "devices", "completion"}
    assert bash_complete(["swiftftp-proxy", "devices", "l"], script) == ["list"]
    assert bash_complete(["swiftftp-proxy", "devices", "list", "--s"], script) == ["--state-dir"]
    assert bash_complete(["swiftftp-proxy", "devices", "--state-dir", "/x", "set-"], script) == [
        "set-quota", "set-rate"]
    assert bash_complete(["swiftftp-proxy", "serve", "--relay", ""], script) == ["rust", "python"]
    assert bash_complete(["swiftftp-proxy", "serve", "--log-format", "j"], script) == ["json"]
    assert bash_complete(["swiftftp-proxy", "serve", "--listen", ""], script) == []
    assert bash_complete(["swiftftp-proxy", "completion", ""], script) == ["bash", "zsh"]
    assert "--servers" in bash_complete(["/usr/bin/swiftftp-agent", "--"], script)
    (tmp_path / "node.toml").write_text("")
    assert bash_complete(["swiftftp-proxy", "check-config", f"{tmp_path}/no"], script) == [
        f"{tmp_path}/node.toml"]
    assert bash_complete(["swiftftp-proxy", "serve", "--state-dir", f"{tmp_path}/"], script) == []
    (tmp_path / "state").mkdir()
    assert bash_complete(["swiftftp-proxy", "serve", "--state-dir", f"{tmp_path}/"], script) == [
        f"{tmp_path}/state"]


class Terminal:
    """An interactive shell on a pseudo-terminal: keys in, the screen's bytes out."""

    def __init__(self, *argv: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            env = {"TERM": "dumb", "PATH": os.environ["PATH"], "HOME": "/nonexistent"}
            os.execvpe(argv[0], list(argv), env)
        self.output = b""

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, pattern: str, timeout: float = 15) -> str:
        """Read until ``pattern`` (a regex) shows in the output (escapes removed)."""
        deadline = time.monotonic() + timeout
        while True:
            text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", self.output.decode(errors="replace"))
            if m := re.search(pattern, text):
                self.output = text[m.end():].encode()  # consumed up to the match, no further
                return m[0]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {pattern!r} in {text[-400:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.fd, 65536)
                except OSError:  # the shell is gone
                    raise AssertionError(f"the shell ended; {text[-400:]!r}") from None

    def close(self) -> None:
        os.close(self.fd)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)


def test_zsh_completion() -> None:
    zsh = shutil.which("zsh")
    if not zsh:
        pytest.fail("zsh is not installed (scripts/test installs it)")
    term = Terminal(zsh, "-f", "-i")
    try:
        term.send("PS1='READY> '; autoload -Uz compinit && compinit -u -D && "
                  f"source <({sys.executable} -m swiftftp completion zsh); "
                  "show() { print -r -- \"BUF<$BUFFER>\" }; zle -N show; bindkey '^Xb' show; "
                  "echo LOADED$((1+1))\n")
        term.expect(r"LOADED2")
        term.expect(r"READY> $")

        def completed(keys: str) -> str:
            term.send(keys + "\x18b")  # the keys, then ^X b: the line as it stands
            return term.expect(r"BUF<[^>]*>")

        assert completed("swiftftp-proxy dev\t") == "BUF<swiftftp-proxy devices >"
        assert completed("li\t") == "BUF<swiftftp-proxy devices list >"
        assert completed("--sta\t") == "BUF<swiftftp-proxy devices list --state-dir >"
        assert completed("\x15swiftftp-agent --ser\t") == "BUF<swiftftp-agent --servers >"
        assert completed("\x15swiftftp-proxy serve --relay r\t") == "BUF<swiftftp-proxy serve --relay rust >"
        term.send("\x15swiftftp-proxy serve --log-format \t")  # two choices: listed
        term.expect(r"json\s+plain|plain\s+json")
    finally:
        term.close()
