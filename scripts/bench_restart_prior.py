"""A restart's learned lengths as a prior, in the simulator: how much a policy that learns
output lengths gains or loses by starting from lengths a previous run saved, against a cold
start, when the saved lengths come from the same traffic and when from other traffic.

The engine saves the lengths its policy learned and restores them on a restart
(policy_state.py). They stand in until as many of the new run's own requests have finished
as a cold start learns from, then they are dropped (scheduler/length_window.py). For each
target trace of scripts/repro_fastserve.py (400 requests, OPT-13B, batch 16, full device
KV, or a tenth with --memory tenth; proactive swapping) at --loads x its capacity, each policy runs cold and from the
output lengths of 2,000 requests of each trace drawn with another seed; the table gives
mean JCT and mean latency per token over the cold run's (1.00: the prior changed nothing).

    python scripts/bench_restart_prior.py --jobs 2        # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastserve_jax.cost_model import CostModel  # noqa: E402
from fastserve_jax.sim import SimConfig, simulate  # noqa: E402
from fastserve_jax.workload import capacity_rps, with_arrivals  # noqa: E402
from repro_fastserve import COST, DEFAULT_WORKLOADS, MEMORY, workloads  # noqa: E402

POLICIES = ("skip-join-mlfq", "gittins")


def _run(job: tuple) -> tuple:
    target, prior, policy, load, memory = job
    cost = CostModel.load(COST)
    trace = workloads(400)[target]
    dev, host = MEMORY[memory]
    cfg = SimConfig(16, 2048, 16, dev, host_kv_capacity_tokens=host, swap_policy="proactive")
    if prior:
        cfg = replace(cfg, prior_lengths=tuple(r.output_tokens for r in workloads(2000, seed=7)[prior]))
    rate = load * capacity_rps(trace, cost, 16, (cfg.num_blocks(cost) - 1) * 16)
    m = simulate(with_arrivals(trace, rate, seed=0), policy, cost, cfg).metrics()
    return job[:4], m["mean_jct"], m["mean_latency_per_token"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.9, 3.0])
    ap.add_argument("--workloads", nargs="+", default=list(DEFAULT_WORKLOADS))
    ap.add_argument("--memory", choices=sorted(MEMORY), default="full",
                    help="device KV at the cost model's size or at a tenth (repro_fastserve.MEMORY)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    priors = (None, *a.workloads)
    jobs = [(t, p, pol, x, a.memory) for t in a.workloads for p in priors for pol in POLICIES for x in a.loads]
    with concurrent.futures.ProcessPoolExecutor(a.jobs) as pool:
        res = {job: (jct, lpt) for job, jct, lpt in pool.map(_run, jobs)}
    print(f"mean JCT / latency per token with the prior, over the cold start's (same seed, same arrivals; "
          f"{a.memory} device KV)")
    worst = 0.0
    for t in a.workloads:
        for pol in POLICIES:
            for x in a.loads:
                cold = res[(t, None, pol, x)]
                cells = []
                for p in a.workloads:
                    r = [res[(t, p, pol, x)][i] / cold[i] for i in (0, 1)]
                    worst = max(worst, *r)
                    cells.append(f"{p}{'=' if p == t else ''} {r[0]:.2f}/{r[1]:.2f}")
                print(f"{t:6s} {pol:15s} {x:4.1f}x  cold {cold[0]:6.1f} s {1e3 * cold[1]:6.0f} ms | " + "  ".join(cells))
    print(f"worst ratio to the cold start: {worst:.2f} ('=': the prior is from the same trace)")
    return {"|".join(map(str, k)): v for k, v in res.items()}


if __name__ == "__main__":
    main()
