"""Random templated traffic in the simulator: predictive and gittins (with only their own
prompt-length predictions), skip-join-mlfq and fcfs on workloads the grid does not cover.

Each seed draws 2-8 "applications", each with its own prompt size (5-3,000 tokens) and median
answer (2-800 tokens), and a trace of 150-500 requests from them (prompts within 10% of their
application's, answers log-normal around its median with sigma 0.1, 0.3 or 0.8, prompt +
answer <= 4,000), then a machine (batch 8/16/32 sequences, device KV of the OPT-13B cost
model's size or 20,000 or 8,000 tokens, host KV 20,000 or 68,000, a swap policy) and a load
(0.5x, 0.9x, 1.5x or 4x the capacity the cost model implies). All four policies run the
same requests on the same machine; latency per token and throughput are fcfs's over the
policy's (higher is better) and the policy's over fcfs's, and gittins' mean JCT is given
against the better of fcfs's and skip-join's (its target in the grid: at most 1.05x).

    python scripts/sim_templated.py 0 60 --jobs 2        # seeds 0..59, ~3 min on 2 cores

It prints one line per seed and a summary: where each policy falls below fcfs, where
predictive falls below skip-join, where gittins' mean JCT misses, and the lowest throughput
of each against fcfs.
The measurements and what they say are in docs/scheduling_log.md ("Prompt lengths as the
predictor").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastserve_jax.cost_model import CostModel  # noqa: E402
from fastserve_jax.sim import SimConfig, simulate  # noqa: E402
from fastserve_jax.workload import TraceRequest, capacity_rps, with_arrivals  # noqa: E402

COST = "opt-13b-a100"
POLICIES = (("sj", "skip-join-mlfq"), ("pred", "predictive"), ("git", "gittins"))
MAX_TOKENS = 4000


def draw(seed: int) -> dict:
    """The seed's applications, trace, machine and load."""
    import numpy as np

    rng, r = np.random.default_rng(seed), random.Random(seed)
    apps = [(int(rng.integers(5, 3000)), int(rng.integers(2, 800))) for _ in range(r.choice([2, 3, 5, 8]))]
    n, sigma = r.choice([150, 300, 500]), r.choice([0.1, 0.3, 0.8])
    trace = []
    for a in rng.integers(0, len(apps), n):
        p, m = apps[a]
        prompt = max(1, int(p * rng.uniform(0.9, 1.1)))
        trace.append(TraceRequest(0.0, prompt, max(1, min(MAX_TOKENS - prompt, int(m * rng.lognormal(0, sigma))))))
    cfg = SimConfig(r.choice([8, 16, 32]), 2048, 16, r.choice([0, 20_000, 8_000]),
                    host_kv_capacity_tokens=r.choice([20_000, 68_000]),
                    swap_policy=r.choice(["proactive", "reactive", "recompute"]))
    return dict(apps=apps, trace=trace, cfg=cfg, load=r.choice([0.5, 0.9, 1.5, 4.0]))


def run(seed: int) -> dict:
    cost = CostModel.load(COST)
    d = draw(seed)
    cfg = d["cfg"]
    cap = capacity_rps(d["trace"], cost, cfg.max_num_seqs, (cfg.num_blocks(cost) - 1) * cfg.block_size)
    arrivals = with_arrivals(d["trace"], d["load"] * cap, seed=seed)
    m = {p: simulate(arrivals, p, cost, cfg).metrics() for p in ("fcfs", "skip-join-mlfq", "predictive", "gittins")}
    f = m["fcfs"]
    return dict(seed=seed, apps=d["apps"], swap=cfg.swap_policy, kv=cfg.kv_capacity_tokens or "model's",
                seqs=cfg.max_num_seqs, load=d["load"], n=len(d["trace"]),
                **{f"lpt_{k}": f["mean_latency_per_token"] / m[p]["mean_latency_per_token"]
                   for k, p in POLICIES},
                **{f"thr_{k}": m[p]["throughput_rps"] / f["throughput_rps"] for k, p in POLICIES},
                jct_git=m["gittins"]["mean_jct"] / min(f["mean_jct"], m["skip-join-mlfq"]["mean_jct"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("first", type=int)
    ap.add_argument("end", type=int, help="seeds first..end-1")
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    if a.end <= a.first:
        ap.error("end must be greater than first")
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(run, range(a.first, a.end)))
    print("seed | apps (prompt -> median answer) | swap | device KV | seqs | load | n | "
          "latency per token vs fcfs: skip-join, predictive, gittins | throughput vs fcfs: skip-join, predictive, "
          "gittins | gittins mean JCT vs the better of fcfs and skip-join")
    for r in rows:
        apps = ", ".join(f"{p}->{o}" for p, o in r["apps"])
        print(f"{r['seed']} | {apps} | {r['swap']} | {r['kv']} | {r['seqs']} | {r['load']:g}x | {r['n']} | "
              f"{r['lpt_sj']:.2f}x, {r['lpt_pred']:.2f}x, {r['lpt_git']:.2f}x | {r['thr_sj']:.3f}, {r['thr_pred']:.3f}, "
              f"{r['thr_git']:.3f} | {r['jct_git']:.2f}x")
    print(f"\n{len(rows)} seeds")
    for k, name in POLICIES:
        lose = [r for r in rows if r[f"lpt_{k}"] < 0.97]
        print(f"{name}: latency per token below fcfs's (under 0.97x) in {len(lose)}: "
              + (", ".join(f"seed {r['seed']} {r['lpt_' + k]:.2f}x ({r['swap']})" for r in lose) or "none")
              + f"; median {statistics.median(r['lpt_' + k] for r in rows):.2f}x; lowest throughput "
              f"{min(r['thr_' + k] for r in rows):.3f}")
    behind = [r for r in rows if r["lpt_pred"] < 0.95 * r["lpt_sj"]]
    print(f"predictive more than 5% behind skip-join in {len(behind)}: "
          + (", ".join(f"seed {r['seed']} {r['lpt_pred']:.2f}x against {r['lpt_sj']:.2f}x" for r in behind) or "none"))
    ahead = [r for r in rows if r["lpt_pred"] > 1.05 * r["lpt_sj"]]
    print(f"predictive more than 5% ahead of skip-join in {len(ahead)}")
    miss = [r for r in rows if r["jct_git"] > 1.05]
    print(f"gittins' mean JCT over 1.05x the better of fcfs and skip-join in {len(miss)}: "
          + (", ".join(f"seed {r['seed']} {r['jct_git']:.2f}x ({r['swap']})" for r in miss) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
