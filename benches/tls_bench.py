"""FTPS throughput of the Rust relay: 1 GiB through one TLS session, each way.

    python benches/tls_bench.py [--gib 1] [--rounds 2] [--quick]

Traffic ends and the relay are ``benches/tls_load.rs`` (built here with
cargo, release): a rustls client (aws-lc-rs, one cipher suite offered), a
plain sink or source behind the relay, and the relay itself: the
extension's engine in a process of its own, so that its CPU time (read from
``/proc``) is the relay's alone. "up" is client → server (STOR), "down"
server → client (RETR). Plain splice relaying is the reference. Cases:

* plain splice; rustls AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305 (aws-lc-rs);
* AES-128-GCM with ring as the relay's provider;
* AES-128-GCM with other buffer sizes (``SWIFTFTP_TLS_SIZES``).

Kernel TLS, where the kernel has it, is used by the TLS cases automatically
(the relay prints which path on stderr); ``SWIFTFTP_KTLS=0`` forces rustls.
Figures are printed as a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TICK = os.sysconf("SC_CLK_TCK")


def build(features: list[str], target_dir: Path) -> Path:
    cmd = ["cargo", "build", "--quiet", "--release", "--example", "tls_load", "--target-dir", str(target_dir)]
    if features:
        cmd += ["--features", ",".join(features)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return target_dir / "release" / "examples" / "tls_load"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def server(cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"{cmd[1]} did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, int(line.split()[1])


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


def one_case(
    tool: Path, direction: str, nbytes: int, certs: Path | None, suite: str, rounds: int, sizes: str
) -> dict[str, float | str]:
    sink, sink_port = server([str(tool), "sink", direction, str(nbytes)])
    env = dict(os.environ)
    if sizes:
        env["SWIFTFTP_TLS_SIZES"] = sizes
    tls_args = [str(certs / "server.pem"), str(certs / "server.key")] if certs else []
    relay, relay_port = server([str(tool), "relay", str(sink_port), *tls_args], env)
    results = []
    try:
        for _ in range(rounds):
            before = cpu_seconds(relay.pid)
            cmd = [str(tool), "client", str(relay_port), direction, str(nbytes)]
            if certs:
                cmd += [str(certs / "ca.pem"), suite]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
            time.sleep(0.2)  # the relay's last reads and closes
            cpu = cpu_seconds(relay.pid) - before
            _secs, gbit = (float(x) for x in out.split())
            results.append((gbit, cpu / (nbytes / 2**30)))
    finally:
        err = stop(relay)
        stop(sink)
    path = "ktls" if "kernel TLS available" in err and certs else ("rustls" if certs else "splice")
    return {
        "gbit_s": mean(r[0] for r in results),
        "cpu_s_per_gib": mean(r[1] for r in results),
        "rounds": " ".join(f"{r[0]:.2f}" for r in results),
        "path": path,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="plain and AES-128-GCM only")
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30)
    aws = build([], ROOT / "target")
    ring = None if args.quick else build(["ring"], ROOT / "target" / "bench-ring")

    from tests.tlscerts import write

    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp)
        write(certs)
        # (label, tool, certs, suite, sizes)
        cases: list[tuple[str, Path, Path | None, str, str]] = [
            ("plain splice", aws, None, "", ""),
            ("rustls aws-lc-rs AES-128-GCM", aws, certs, "AES_128_GCM", ""),
        ]
        if not args.quick:
            assert ring is not None
            cases += [
                ("rustls aws-lc-rs AES-256-GCM", aws, certs, "AES_256_GCM", ""),
                ("rustls aws-lc-rs CHACHA20", aws, certs, "CHACHA20", ""),
                ("rustls ring AES-128-GCM", ring, certs, "AES_128_GCM", ""),
                ("AES-128 sizes 16,16,64 KiB", aws, certs, "AES_128_GCM", "16,16,64"),
                ("AES-128 sizes 64,64,64 KiB", aws, certs, "AES_128_GCM", "64,64,64"),
                ("AES-128 sizes 256,256,1024 KiB", aws, certs, "AES_128_GCM", "256,256,1024"),
            ]
        print(f"{args.gib:g} GiB per round, {args.rounds} rounds, {os.cpu_count()} CPUs")
        print("| case | path | up Gbit/s | up relay CPU s/GiB | down Gbit/s | down relay CPU s/GiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        for label, tool, case_certs, suite, sizes in cases:
            up = one_case(tool, "up", nbytes, case_certs, suite, args.rounds, sizes)
            down = one_case(tool, "down", nbytes, case_certs, suite, args.rounds, sizes)
            print(
                f"| {label} | {up['path']} | {up['gbit_s']:.2f} | {up['cpu_s_per_gib']:.3f} "
                f"| {down['gbit_s']:.2f} | {down['cpu_s_per_gib']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
