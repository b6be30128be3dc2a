"""Markdown tables from a `fastserve-jax simulate` sweep JSON: one row per load, one column
per policy, for each metric asked (the tables in docs/scheduling.md come from here).

    python scripts/sim_table.py out/azure_sweep.json --metric mean_jct --metric mean_latency_per_token
"""

from __future__ import annotations

import argparse
import json

UNITS = {"mean_latency_per_token": ("ms", 1e3), "mean_tpot": ("ms", 1e3)}


def table(sweep: dict[str, list[dict]], metric: str) -> str:
    policies = list(sweep)
    unit, scale = UNITS.get(metric, ("s", 1.0))
    loads = sorted({m["load"] for ms in sweep.values() for m in ms})
    lines = [f"| {metric} ({unit}) | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for load in loads:
        row = {p: next(m for m in sweep[p] if m["load"] == load) for p in policies}
        best = min(row[p][metric] for p in policies if p != "srpt")
        cells = []
        for p in policies:
            v = row[p][metric] * scale
            txt = f"{v:.1f}" if v >= 10 else f"{v:.2f}"
            cells.append(f"**{txt}**" if p != "srpt" and row[p][metric] == best else txt)
        rate = next(iter(row.values()))["rate"]
        lines.append(f"| load {load:.1f} ({rate:.2f} req/s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep")
    ap.add_argument("--metric", action="append")
    a = ap.parse_args()
    with open(a.sweep) as f:
        sweep = json.load(f)
    for metric in a.metric or ["mean_jct", "mean_latency_per_token", "p99_jct", "mean_ttft"]:
        print(table(sweep, metric))
        print()
