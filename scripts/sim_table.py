"""Markdown tables from a `fastserve-jax simulate` sweep JSON: one row per load, one column
per policy, for each metric asked (the simulator tables in docs/scheduling_log.md came from here), then
the sweep's summary: goodput and the highest rate with 95% SLO attainment per policy.

    python scripts/sim_table.py out/azure_sweep.json --metric mean_jct --metric mean_latency_per_token
"""

from __future__ import annotations

import argparse
import json

UNITS = {"mean_latency_per_token": ("ms", 1e3), "mean_tpot": ("ms", 1e3), "throughput_rps": ("req/s", 1.0),
         "throughput_tps": ("tokens/s", 1.0), "arrival_rps": ("req/s", 1.0)}
HIGHER_IS_BETTER = {"throughput_rps", "throughput_tps"}


def table(sweep: dict, metric: str) -> str:
    """The best policy (srpt, the oracle, apart) is bold: the lowest figure, or the highest
    throughput. A figure the run had none of (null: a mean TPOT of one-token answers) is "-".
    A one-rate sweep's JSON (a row per policy rather than a list) reads as a sweep of one."""
    runs = {p: ms if isinstance(ms, list) else [ms] for p, ms in sweep.items() if p != "summary"}
    policies = list(runs)
    unit, scale = UNITS.get(metric, ("s", 1.0))
    loads = sorted({m["load"] for p in policies for m in runs[p]}, key=lambda x: (x is None, x))
    lines = [f"| {metric} ({unit}) | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    pick = max if metric in HIGHER_IS_BETTER else min
    for load in loads:
        row = {p: next(m for m in runs[p] if m["load"] == load) for p in policies}
        known = [row[p][metric] for p in policies if p != "srpt" and row[p][metric] is not None]
        best = pick(known) if known else None
        cells = []
        for p in policies:
            if row[p][metric] is None:
                cells.append("-")
                continue
            v = row[p][metric] * scale
            txt = f"{v:.1f}" if v >= 10 else f"{v:.2f}"
            cells.append(f"**{txt}**" if p != "srpt" and row[p][metric] == best else txt)
        first = next(iter(row.values()))
        rate = first["rate"] if first["rate"] is not None else first["offered_rps"]
        label = "the trace's timing" if load is None else f"load {load:.3g}"
        lines.append(f"| {label} ({rate:.2f} req/s) | " + " | ".join(cells) + " |")
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
