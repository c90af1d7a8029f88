"""A real ``swiftftp-proxy serve`` process for the operations tests: its ready line
parsed, its stderr collected, HTTP requests to its stats port, a download through it."""

from __future__ import annotations

import ftplib
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY = re.compile(
    r"listening on (\S+): FTP clients port (\d+), devices port (\d+), relay (\w+)"
    r"(?:, stats http://(\S+):(\d+))?"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SWIFTFTP_* settings, plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SWIFTFTP_")} | extra


def node_config(tmp_path: Path, extra: str = "", **node: str) -> Path:
    """A config file: loopback, free ports, stats on, a state dir in ``tmp_path``."""
    settings = {"listen": '"127.0.0.1"', "ftp_port": "0", "device_port": "0", "data_ports": '"0"',
                "state_dir": f'"{tmp_path / "state"}"', "stats_listen": '"127.0.0.1:0"'} | node
    path = tmp_path / "node.toml"
    path.write_text("[node]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
                    + "[limits]\nfailure_delay = 0\n" + extra)
    return path


class Serve:
    """``python -m swiftftp serve ARGS`` (``wrapper`` runs before it, e.g. a prctl)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "swiftftp", "serve", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or clean_env(),
        )
        self.logs: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()  # EOF if it dies; pytest-timeout bounds the rest
        m = READY.search(line)
        if not m:
            self.proc.kill()
            self.proc.wait(5)
            self._reader.join(5)
            raise AssertionError(f"no ready line: {line!r} {self.logs[-5:]}")
        self.ready_line = line
        self.ftp_port, self.device_port, self.backend = int(m[2]), int(m[3]), m[4]
        self.stats_port = int(m[6]) if m[6] else None

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.logs.append(line)

    def logged(self, text: str, timeout: float = 10) -> str:
        """The first log line containing ``text`` (waits for it, bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.logs):
                if text in line:
                    return line
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line with {text!r}: {self.logs[-5:]}")
            time.sleep(0.02)

    def get(self, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        """One HTTP GET to the stats port: (status, headers in lower case, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.stats_port, timeout=10)
        try:
            conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)


def download(port: int, prefix: str, name: str) -> bytes:
    """``RETR name`` from the device with ``prefix`` through the node's FTP port."""
    chunks: list[bytes] = []
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", port, timeout=30)
    ftp.login(f"{prefix}_u", "pw")
    ftp.retrbinary(f"RETR {name}", chunks.append)
    ftp.quit()
    return b"".join(chunks)
