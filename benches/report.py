"""Print the figures of a ``pytest benches/ --benchmark-json=FILE`` run, and the ratios.

    python benches/report.py FILE

One line per benchmark (Gbit/s as iperf3's receiver measured it, the relay
process's CPU seconds per GiB), then for the one-session and the 8-session
cases the ratios rust/direct, rust/haproxy and rust/python (and, for the
8-session case, rust with one worker against haproxy's one thread).
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
        if "gbit_s" not in info:
            continue
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
    if machine:
        lines.append(f"machine: {machine}")
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
