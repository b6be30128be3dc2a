"""Markdown tables from a `fastserve-jax simulate` sweep JSON: one row per load, one column
per policy, for each metric asked (the simulator tables in docs/scheduling_log.md came from here), then
the sweep's summary: goodput and the highest rate with 95% SLO attainment per policy.

    python scripts/sim_table.py out/azure_sweep.json --metric mean_jct --metric mean_latency_per_token
"""

from __future__ import annotations

import argparse
import json

UNITS = {"mean_latency_per_token": ("ms", 1e3), "mean_tpot": ("ms", 1e3)}


def table(sweep: dict[str, list[dict]], metric: str) -> str:
    policies = [p for p in sweep if p != "summary"]
    unit, scale = UNITS.get(metric, ("s", 1.0))
    loads = sorted({m["load"] for p in policies for m in sweep[p]})
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


def summary_table(summary: dict[str, dict]) -> str:
    """Rows: goodput, then the rate at 95% attainment per SLO pair; req/s ('≥': every rate met
    it, '-': none did)."""
    policies = list(summary)

    def cell(rate: float | None, s: dict) -> str:
        return "-" if rate is None else f"{'≥' if rate >= s['max_offered_rps'] else ''}{rate:.2f}"

    first = summary[policies[0]]
    lines = ["| req/s | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|",
             f"| goodput (latency/token <= {first['slo_latency_per_token'] * 1e3:.1f} ms) | "
             + " | ".join(cell(summary[p]["goodput_rps"], summary[p]) for p in policies) + " |"]
    for i, pair in enumerate(first["rate_at_95pct"]):
        lines.append(f"| 95% within TTFT {pair['ttft']:g} s, TPOT {pair['tpot']:g} s | "
                     + " | ".join(cell(summary[p]["rate_at_95pct"][i]["rate"], summary[p]) for p in policies) + " |")
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
    if "summary" in sweep:
        print(summary_table(sweep["summary"]))
