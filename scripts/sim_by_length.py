"""Simulator fidelity by output length (part of scripts/sim_fidelity.py): where in a burst the
simulator is off, each request's figures bucketed by its output length, the servers' against the
simulation's."""

from __future__ import annotations

import numpy as np


LENGTH_BUCKETS = ((1, 8), (8, 20), (20, 50), (50, 120), (120, 100_000))


def by_length(runs: list[dict], sims: dict, policy: str) -> list[dict]:
    """Per output-length bucket, the servers' mean TTFT, time per output token and latency per
    token (each request's figures averaged over the runs first) against the simulation's:
    where in the burst the simulator is off. runs: [{policy: {per_request: [[send lag, TTFT,
    JCT, tokens], ...]}}]; sims[policy]["per_request"]: [[TTFT, JCT, tokens], ...]."""
    real = np.array([r[policy]["per_request"] for r in runs], float)
    sim = np.array(sims[policy]["per_request"], float)
    n = real[0, :, 3]
    if not np.array_equal(n, sim[:, 2]):
        raise ValueError("the servers' and the simulation's requests differ in their output lengths")
    figures = {"engine": (real[:, :, 1].mean(0), real[:, :, 2].mean(0)), "sim": (sim[:, 0], sim[:, 1])}
    rows = []
    for lo, hi in LENGTH_BUCKETS:
        k = (n >= lo) & (n < hi)
        if not k.any():
            continue
        row = dict(tokens=(lo, hi), requests=int(k.sum()))
        for who, (ttft, jct) in figures.items():
            row[who] = dict(ttft=float(ttft[k].mean()), tpot=float(((jct - ttft) / np.maximum(n - 1, 1))[k].mean()),
                            latency_per_token=float((jct / n)[k].mean()))
        rows.append(row)
    return rows


def print_by_length(rows: list[dict], policy: str) -> None:
    print(f"{policy} by output length (engine / sim, ms):")
    for r in rows:
        lo, hi = r["tokens"]
        e, s = r["engine"], r["sim"]
        print(f"  {lo:>4d}-{min(hi, 9999) - 1:<4d} tokens {r['requests']:4d} req: " + "  ".join(
            f"{k} {1e3 * e[k]:8.2f} / {1e3 * s[k]:8.2f}" for k in ("ttft", "tpot", "latency_per_token")))
