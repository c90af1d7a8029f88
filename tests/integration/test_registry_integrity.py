"""Issue 8: a registry that is damaged, half-written, not SQLite, or empty while the state
dir shows it held devices stops ``serve`` with one line naming the file (exit 1), and
damage under a running node is logged once, shown on /stats and /readyz, while the
devices it knows are still served."""

from __future__ import annotations

import ftplib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from swiftftp.registry import SIDECAR, Registry
from tests.fielddevice import FieldDevice
from tests.helpers import sha256
from tests.serveproc import Serve, clean_env, node_config


def run_serve(state: Path, wrapper: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    args = ["--listen", "127.0.0.1", "--ftp-port", "0", "--device-port", "0", "--data-ports", "0",
            "--stats-listen", "off", "--state-dir", str(state)]
    return subprocess.run([*wrapper, sys.executable, "-m", "swiftftp", "serve", *args], capture_output=True,
                          text=True, timeout=60, env=clean_env())


#: Root reads any file: run the node without the capabilities that let it (util-linux's
#: setpriv drops them from the bounding set, so the exec'd node never has them).
AS_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()


def filled(state: Path, devices: int) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    path = state / "registry.sqlite3"
    reg = Registry(path)
    for i in range(devices):
        reg.prefix_for(f"phone-{i:05d}-{'z' * 40}")
    reg.close()
    return path


def one_line(done: subprocess.CompletedProcess, pattern: str) -> None:
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert re.fullmatch(rf"swiftftp-proxy: {pattern}\n", done.stderr), done.stderr
    assert "Traceback" not in done.stderr


def test_not_an_sqlite_file(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    path = tmp_path / "state" / "registry.sqlite3"
    path.write_bytes(os.urandom(8192))
    one_line(run_serve(tmp_path / "state"), rf"registry {re.escape(str(path))}: not an SQLite database "
                                             r"\(damaged, or another file\); restore it from a backup")


def test_a_half_written_registry(tmp_path: Path) -> None:
    path = filled(tmp_path / "state", 3000)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line(run_serve(tmp_path / "state"),
             rf"registry {re.escape(str(path))}: .*(malformed|damaged).*; restore it from a backup")


def test_a_registry_that_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "state" / "registry.sqlite3"
    path.mkdir(parents=True)
    one_line(run_serve(tmp_path / "state"), rf"registry {re.escape(str(path))}: not a regular file")


def test_an_unreadable_registry(tmp_path: Path) -> None:
    path = filled(tmp_path / "state", 2)
    path.chmod(0)
    try:
        done = run_serve(tmp_path / "state", AS_USER)
    finally:
        path.chmod(0o600)
    assert done.returncode in (1, 2) and done.stderr.count("\n") == 1 and str(path) in done.stderr


@pytest.mark.parametrize("how", ["empty", "missing"])
def test_a_registry_that_held_devices_is_not_silently_reallotted(tmp_path: Path, how: str) -> None:
    state = tmp_path / "state"
    path = filled(state, 4)
    if how == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    sidecar = state / SIDECAR
    what = "holds no devices" if how == "empty" else "is missing"
    one_line(run_serve(state), rf"registry {re.escape(str(path))} {what}, but {re.escape(str(sidecar))} "
                               rf"says it held 4 devices: restore the registry from a backup, or remove "
                               rf"{re.escape(str(sidecar))} to start afresh \(every device then gets a new "
                               r"prefix\)")
    assert path.exists() == (how == "empty")  # a missing one is not created
    sidecar.unlink()  # what the operator does to start afresh
    node = Serve("--listen", "127.0.0.1", "--ftp-port", "0", "--device-port", "0", "--data-ports", "0",
                 "--stats-listen", "off", "--state-dir", str(state))
    try:
        assert node.stop() == 0
    finally:
        node.kill()


def test_damage_under_a_running_node(tmp_path: Path) -> None:
    node = Serve("--config", str(node_config(tmp_path)))
    data = os.urandom(1_500_000)
    device = FieldDevice(node.device_port, android_id="integrity-phone", files={"f": data}).start()
    try:
        assert node.get("/readyz")[0] == 200
        assert orjson.loads(node.get("/stats")[2])["registry_error"] is None
        path = tmp_path / "state" / "registry.sqlite3"
        with path.open("r+b") as f:  # a stray write over the file's first page
            f.write(os.urandom(4096))
        deadline = time.monotonic() + 20
        while (answer := node.get("/readyz"))[0] == 200:
            assert time.monotonic() < deadline, "damage not noticed"
            time.sleep(0.2)
        status, _, body = answer
        assert status == 503 and body.startswith(b"not ready: registry damaged: ")
        stats = orjson.loads(node.get("/stats")[2])
        assert stats["registry_error"] == "the file is no longer an SQLite database"
        assert b"swiftftp_registry_damaged 1.0" in node.get("/metrics")[2]
        # the device the node knows is still served, to a client from another address
        chunks: list[bytes] = []
        ftp = ftplib.FTP(source_address=("127.0.0.5", 0), timeout=30)
        ftp.connect("127.0.0.1", node.ftp_port)
        ftp.login(f"{device.prefix}_u", "pw")
        ftp.retrbinary("RETR f", chunks.append)
        ftp.quit()
        assert sha256(b"".join(chunks)) == sha256(data)
        node.get("/readyz")
        errors = [line for line in node.logs if " ERROR " in line]
        assert len(errors) == 1 and "registry damaged" in errors[0], errors
        assert str(path) in errors[0]
        assert not any("Traceback" in line for line in node.logs)
        assert device.errors == []
    finally:
        device.stop()
        node.kill()
    # the next start refuses it, in one line
    done = subprocess.run([sys.executable, "-m", "swiftftp", "serve", "--config",
                           str(tmp_path / "node.toml")], capture_output=True, text=True, timeout=60,
                          env=clean_env())
    one_line(done, rf"registry {re.escape(str(path))}: not an SQLite database .*")


def test_devices_command_on_a_damaged_registry(tmp_path: Path) -> None:
    path = filled(tmp_path / "state", 3)
    path.write_bytes(b"garbage" * 100)
    done = subprocess.run([sys.executable, "-m", "swiftftp", "devices", "--state-dir",
                           str(tmp_path / "state"), "list"], capture_output=True, text=True, timeout=60,
                          env=clean_env())
    one_line(done, rf"registry {re.escape(str(path))}: not an SQLite database .*")
