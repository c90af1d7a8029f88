"""Throughput of the relay backends against no relay and haproxy (splice), on loopback.

    pytest benches/ --benchmark-json=bench.json && python benches/report.py bench.json

Each case moves 1 GiB with Debian's iperf3 (client and server in their own
processes) through one session, or through 8 parallel sessions; the relay
(python or rust backend, or haproxy 2.6 in ``mode tcp`` with splice and one
thread) runs in a process of its own. ``extra_info`` records Gbit/s as iperf3's
receiver measured it and the relay process's CPU seconds per GiB.
``SWIFTFTP_BENCH_GIB`` changes the volume.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from statistics import mean
from typing import Any

import pytest

from conftest import Target, cpu_seconds  # benches/ is on sys.path (no package)

KINDS = ["direct", "python", "rust", "haproxy"]
# haproxy runs one thread (nbthread 1); the rust relay one worker per CPU by default,
# and here also with one worker, for a like-for-like figure.
PARALLEL_KINDS = [*KINDS, "rust-1worker"]
GIB = float(os.environ.get("SWIFTFTP_BENCH_GIB", "1"))
# Few rounds keep the whole run to a few minutes; the python relay is ~10x slower.
ROUNDS = {"direct": 3, "python": 1, "rust": 3, "haproxy": 3, "rust-1worker": 3}


def _iperf3(tools: dict[str, str], port: int, streams: int) -> dict[str, Any]:
    cmd = [tools["iperf3"], "-c", "127.0.0.1", "-p", str(port), "-J"]
    cmd += ["-n", f"{int(GIB * 1024)}M", "-P", str(streams)]
    for _ in range(20):
        out = subprocess.run(cmd, capture_output=True, timeout=300, text=True)
        result = json.loads(out.stdout or "{}")
        error = result.get("error", "") if out.returncode == 0 else out.stderr or out.stdout
        if "busy" in error:
            # The server may still be closing the previous test down.
            time.sleep(0.1)
            continue
        if error or "sum_received" not in result.get("end", {}):
            raise RuntimeError(f"iperf3 failed ({out.returncode}): {error}")
        return result["end"]
    raise RuntimeError("iperf3 server stayed busy")


def _machine() -> str:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs {model}, Linux {platform.release()}"


def _measure(
    benchmark: Any, tools: dict[str, str], target: Target, streams: int
) -> Callable[[], None]:
    rounds: list[dict[str, float]] = []

    def one_round() -> None:
        before = cpu_seconds(target.pid) if target.pid else 0.0
        end = _iperf3(tools, target.port, streams)
        cpu = cpu_seconds(target.pid) - before if target.pid else 0.0
        received = end["sum_received"]
        gib = received["bytes"] / 2**30
        rounds.append(
            {
                "gbit_s": received["bits_per_second"] / 1e9,
                "cpu_s_per_gib": cpu / gib if target.pid else 0.0,
                "gib": gib,
            }
        )

    benchmark.pedantic(one_round, rounds=ROUNDS[target.kind], iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        relay=target.kind,
        sessions=streams,
        gbit_s=round(mean(r["gbit_s"] for r in rounds), 2),
        gbit_s_rounds=[round(r["gbit_s"], 2) for r in rounds],
        cpu_s_per_gib=round(mean(r["cpu_s_per_gib"] for r in rounds), 3) if target.pid else None,
        gib_per_round=round(mean(r["gib"] for r in rounds), 3),
        machine=_machine(),
    )
    return one_round


@pytest.mark.parametrize("target", KINDS, indirect=True)
def test_throughput(benchmark: Any, tools: dict[str, str], target: Target) -> None:
    """1 GiB through one session."""
    _measure(benchmark, tools, target, streams=1)
    assert benchmark.extra_info["gbit_s"] > 0


@pytest.mark.parametrize("target", PARALLEL_KINDS, indirect=True)
def test_throughput_parallel(benchmark: Any, tools: dict[str, str], target: Target) -> None:
    """1 GiB in all through 8 sessions at once (iperf3 -P 8)."""
    _measure(benchmark, tools, target, streams=8)
    assert benchmark.extra_info["gbit_s"] > 0
