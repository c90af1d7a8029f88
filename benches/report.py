"""Print the figures of a ``pytest benches/ --benchmark-json=FILE`` run, and the ratios.

    python benches/report.py FILE

One line per benchmark (Gbit/s as iperf3's receiver measured it, the relay
process's CPU seconds per GiB), then for the one-session and the 8-session
cases the ratios rust/direct, rust/haproxy and rust/python (and, for the
8-session case, rust with one worker against haproxy's one thread). Then the
latency table (benches/test_latency.py) with each target against ProFTPD's
mod_proxy, the FTPS table (benches/test_ftps_throughput.py) and the density
table (benches/test_density.py) with issue 10's targets.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def report(data: dict[str, Any]) -> list[str]:
    """The report's lines for the parsed benchmark JSON ``data``."""
    lines: list[str] = []
    machine = ""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "gbit_s" not in info or "ftps_target" in info:
            continue  # the FTPS rows have a table of their own
        machine = info.get("machine", machine)
        group, _, kind = bench["name"].partition("[")
        kind = kind.rstrip("]")
        groups.setdefault(group, {})[kind] = info
        cpu = info.get("cpu_s_per_gib")
        cpu_text = f"{cpu:.3f} CPU s/GiB" if cpu is not None else "(no relay)"
        rounds = ", ".join(f"{g:.1f}" for g in info.get("gbit_s_rounds", []))
        lines.append(
            f"{bench['name']:<40} {info['gbit_s']:6.2f} Gbit/s  {cpu_text:<18}"
            f" sessions={info.get('sessions')} rounds=[{rounds}]"
        )
    for group, kinds in groups.items():
        rust = kinds.get("rust", {})
        r_gbit, r_cpu = rust.get("gbit_s"), rust.get("cpu_s_per_gib")
        parts = [
            f"rust/{other} {_ratio(r_gbit, kinds.get(other, {}).get('gbit_s'))}"
            for other in ("direct", "haproxy", "python")
        ]
        haproxy = kinds.get("haproxy", {})
        cpu = _ratio(r_cpu, haproxy.get("cpu_s_per_gib"))
        lines.append(f"{group}: " + ", ".join(parts) + f"; CPU/GiB rust/haproxy {cpu}")
        if one := kinds.get("rust-1worker"):
            lines.append(
                f"{group}, rust with 1 worker (haproxy has 1 thread): "
                f"rust/haproxy {_ratio(one['gbit_s'], haproxy.get('gbit_s'))}; "
                f"CPU/GiB rust/haproxy {_ratio(one.get('cpu_s_per_gib'), haproxy.get('cpu_s_per_gib'))}"
            )
    lines += latency_report(data)
    lines += ftps_report(data)
    lines += density_report(data)
    if machine:
        lines.append(f"machine: {machine}")
    return lines


def latency_report(data: dict[str, Any]) -> list[str]:
    """The login and small-file table, and the ratios to mod_proxy."""
    rows = {b["extra_info"]["latency_target"]: b["extra_info"] for b in data.get("benchmarks", [])
            if "latency_target" in b.get("extra_info", {})}
    if not rows:
        return []
    lines = [f"{'target':<10} {'login p50 ms':>12} {'login p99 ms':>12} {'logins/s':>9} "
             f"{'1-byte RETR p50 ms':>19}"]
    for kind, info in rows.items():
        lines.append(f"{kind:<10} {info['login_p50_ms']:>12.2f} {info['login_p99_ms']:>12.2f} "
                     f"{info['logins_per_s']:>9.0f} {info['retr_p50_ms']:>19.2f}")
    peer = rows.get("mod_proxy")
    if peer:
        for kind in ("agent", "field"):
            if info := rows.get(kind):
                lines.append(
                    f"{kind}/mod_proxy: login p50 {_ratio(info['login_p50_ms'], peer['login_p50_ms'])}, "
                    f"logins/s {_ratio(info['logins_per_s'], peer['logins_per_s'])}, "
                    f"1-byte RETR {_ratio(info['retr_p50_ms'], peer['retr_p50_ms'])}"
                )
    return lines


def ftps_report(data: dict[str, Any]) -> list[str]:
    """The FTPS table (benches/test_ftps_throughput.py) and our FTPS against mod_proxy's."""
    rows = {(b["extra_info"]["ftps_target"], b["extra_info"]["ftps_direction"]): b["extra_info"]
            for b in data.get("benchmarks", []) if "ftps_target" in b.get("extra_info", {})}
    if not rows:
        return []
    lines = [f"{'FTPS target':<16} {'direction':<9} {'Gbit/s':>7} {'proxy CPU s/GiB':>16}"]
    for (kind, direction), info in sorted(rows.items(), key=lambda r: (r[0][1], r[0][0])):
        lines.append(f"{kind:<16} {direction:<9} {info['gbit_s']:>7.2f} {info['cpu_s_per_gib']:>16.3f}")
    for direction in ("retr", "stor"):
        ours, peer = rows.get(("node-ftps", direction)), rows.get(("mod_proxy-ftps", direction))
        if ours and peer:
            lines.append(
                f"{direction.upper()} node-ftps/mod_proxy-ftps: {_ratio(ours['gbit_s'], peer['gbit_s'])} "
                f"throughput, {_ratio(ours['cpu_s_per_gib'], peer['cpu_s_per_gib'])} CPU/GiB"
            )
    return lines


#: The density bench's figures, their units, and the target each is held to (None: none).
DENSITY = [
    ("rss_per_device_kib", "RSS per idle device, KiB", "<= 4"),
    ("idle_cpu_percent", "node CPU idle, %", "<= 1"),
    ("cpu_ms_per_first_login", "CPU per first login, ms", "<= 0.3"),
    ("first_wave_logins_per_s", "first wave, logins/s", None),
    ("storm_logins_per_s", "reconnect storm, logins/s", ">= 3000 at 15000"),
    ("cpu_ms_per_storm_login", "CPU per storm login, ms", None),
    ("rss_after_over_before", "RSS after leaving / before", "<= 1.2"),
    ("rss_per_control_kib", "RSS per idle control connection, KiB", "<= 8"),
]


def density_report(data: dict[str, Any]) -> list[str]:
    """One column per device count (benches/test_density.py), one row per figure."""
    runs = sorted((b["extra_info"]["density"] for b in data.get("benchmarks", [])
                   if "density" in b.get("extra_info", {})), key=lambda f: f["devices"])
    if not runs:
        return []
    lines = [f"{'density':<38} " + " ".join(f"{run['devices']:>8}" for run in runs) + "  target"]
    for key, label, target in DENSITY:
        cells = " ".join(f"{run[key]:>8}" if key in run else f"{'-':>8}" for run in runs)
        lines.append(f"{label:<38} {cells}  {target or ''}")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        data = json.load(f)
    print("\n".join(report(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
