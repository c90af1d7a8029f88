"""Real FTP clients (ftplib, curl, lftp) through a real proxy node to pyftpdlib
behind the agent: LIST, RETR of 0 B, 1 MiB and 64 MiB, STOR of 16 MiB, in
passive and active mode, SHA-256 compared both ways, on both relay backends."""

from __future__ import annotations

import ftplib
import hashlib
import io
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import SIZES, Files, Stack
from tests.stack import FTP_PASSWORD, FTP_USER


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ftplib(stack: Stack, passive: bool, out: Path, upload: Path, upname: str) -> str:
    ftp = ftplib.FTP()
    ftp.connect("127.0.0.1", stack.port, timeout=30)
    ftp.login(f"{stack.prefix}_{FTP_USER}", FTP_PASSWORD)
    ftp.set_pasv(passive)
    lines: list[str] = []
    ftp.retrlines("LIST", lines.append)
    for name in SIZES:
        buf = io.BytesIO()
        ftp.retrbinary(f"RETR {name}", buf.write)
        (out / name).write_bytes(buf.getvalue())
    with upload.open("rb") as f:
        ftp.storbinary(f"STOR {upname}", f)
    ftp.quit()
    return "\n".join(lines)


def run_curl(stack: Stack, passive: bool, out: Path, upload: Path, upname: str) -> str:
    url = f"ftp://{stack.prefix}_{FTP_USER}:{FTP_PASSWORD}@127.0.0.1:{stack.port}/"
    base = ["curl", "--silent", "--show-error", "--max-time", "60"]
    if not passive:
        base += ["--ftp-port", "127.0.0.1"]

    def curl(*args: str) -> str:
        done = subprocess.run([*base, *args], capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, f"curl {args}: {done.returncode} {done.stderr}"
        return done.stdout

    listing = curl(url)
    for name in SIZES:
        curl("--output", str(out / name), url + name)
    curl("--upload-file", str(upload), url + upname)
    return listing


def run_lftp(stack: Stack, passive: bool, out: Path, upload: Path, upname: str) -> str:
    gets = "; ".join(f"get {name} -o {out / name}" for name in SIZES)
    script = (
        f"set ftp:passive-mode {'on' if passive else 'off'}; set net:max-retries 1; "
        "set net:timeout 20; set net:reconnect-interval-base 1; set xfer:clobber on; "
        f"open -u {stack.prefix}_{FTP_USER},{FTP_PASSWORD} -p {stack.port} 127.0.0.1; "
        f"cls -l; {gets}; put {upload} -o {upname}; bye"
    )
    done = subprocess.run(["lftp", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"lftp: {done.returncode} {done.stderr}"
    return done.stdout


CLIENTS = {"ftplib": run_ftplib, "curl": run_curl, "lftp": run_lftp}


@pytest.mark.parametrize("mode", ["passive", "active"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_transfers(stack: Stack, files: Files, client: str, mode: str,
                          tmp_path: Path) -> None:
    baseline = stack.baseline()
    upname = f"up-{client}-{mode}.bin"
    listing = CLIENTS[client](stack, mode == "passive", tmp_path, files.upload, upname)
    for name in SIZES:
        assert name in listing
        assert digest(tmp_path / name) == digest(stack.root / name), f"RETR {name}"
    assert digest(stack.root / upname) == digest(files.upload), "STOR"
    stack.settle(baseline)
