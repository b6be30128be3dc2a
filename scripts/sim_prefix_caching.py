"""Prefix caching in the simulator: what it changes for skip-join and fcfs, past capacity and
with device memory tight (docs/prefix_caching.md, "In the simulator").

The first --requests rows of the trace (default the shared Azure conversation trace) that fit
5,933 tokens, the --cost-model (default OPT-13B on an A100), batch 16, 2,048 tokens per
iteration, 16-token blocks, Poisson arrivals at each --loads multiple of the capacity without
caching, each prompt's first --shared-prefix-tokens shared within one of --prefix-groups
groups (SimConfig.prompt_ids). Per load and device KV (the cost model's, and a tenth of it,
with the host pools of scripts/repro_fastserve.py): skip-join-mlfq with proactive swapping
and fcfs with recompute, each with caching off and on, per arrival seed. Prints one row per
load: the medians over seeds (and each seed's figure) of skip-join's latency per output
token, throughput and mean JCT with caching over without, fcfs's latency per token on over
off, and skip-join over fcfs with caching on both (latency per token fcfs / skip-join, and
throughput), with skip-join's hit rate; then skip-join with caching, proactive swapping over
recomputation (latency per token recompute / proactive, and throughput: where a swap-out copies
shared blocks that a dropped request would find again, recomputation may win). Deterministic.

    python scripts/sim_prefix_caching.py                    # ~1.5 min on one core
    python scripts/sim_prefix_caching.py --loads 8 --prefix-groups 1 --shared-prefix-tokens 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastserve_jax import AZURE_TRACE  # noqa: E402
from fastserve_jax.cost_model import CostModel  # noqa: E402
from fastserve_jax.sim import SimConfig, simulate  # noqa: E402
from fastserve_jax.workload import capacity_rps, load_trace, with_arrivals  # noqa: E402

TRACE = AZURE_TRACE        # shipped with the package (fastserve_jax/traces)
MAX_TOKENS = 5933                               # as repro_fastserve.py: the tenth-memory runs serve the same requests
LAT, THR = "mean_latency_per_token", "throughput_rps"


def row(trace, cost, kv_tokens: int, host_tokens: int, load: float, seeds, shared: int, groups: int) -> dict:
    cap = capacity_rps(trace, cost, 16, kv_tokens or cost.kv_capacity_tokens, 2048)
    acc: dict[str, list[float]] = {k: [] for k in ("sj_lat", "sj_thr", "sj_jct", "fcfs_lat", "gain_lat", "gain_thr", "hit",
                                                     "swap_lat", "swap_thr")}
    for seed in seeds:
        arrivals = with_arrivals(trace, load * cap, seed=seed)
        m = {}
        for policy, swap in (("fcfs", "recompute"), ("skip-join-mlfq", "proactive")):
            for caching in (False, True):
                cfg = SimConfig(16, 2048, 16, kv_capacity_tokens=kv_tokens, host_kv_capacity_tokens=host_tokens,
                                swap_policy=swap, enable_prefix_caching=caching, shared_prefix_tokens=shared,
                                prefix_groups=groups)
                m[(policy, caching)] = simulate(arrivals, policy, cost, cfg).metrics()
        cfg = SimConfig(16, 2048, 16, kv_capacity_tokens=kv_tokens, swap_policy="recompute", enable_prefix_caching=True,
                        shared_prefix_tokens=shared, prefix_groups=groups)
        r1 = simulate(arrivals, "skip-join-mlfq", cost, cfg).metrics()        # a dropped request finds its prefix
        s0, s1, f0, f1 = m[("skip-join-mlfq", False)], m[("skip-join-mlfq", True)], m[("fcfs", False)], m[("fcfs", True)]
        for k, v in (("sj_lat", s1[LAT] / s0[LAT]), ("sj_thr", s1[THR] / s0[THR]), ("sj_jct", s1["mean_jct"] / s0["mean_jct"]),
                     ("fcfs_lat", f1[LAT] / f0[LAT]), ("gain_lat", f1[LAT] / s1[LAT]), ("gain_thr", s1[THR] / f1[THR]),
                     ("hit", s1["prefix_cache_hit_rate"]), ("swap_lat", r1[LAT] / s1[LAT]), ("swap_thr", s1[THR] / r1[THR])):
            acc[k].append(v)
    return acc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--cost-model", default="opt-13b-a100")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--loads", type=float, nargs="+", default=[0.8, 1.5, 4.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--shared-prefix-tokens", type=int, default=512)
    ap.add_argument("--prefix-groups", type=int, default=4)
    a = ap.parse_args(argv)
    cost = CostModel.load(a.cost_model)
    rows, _ = load_trace(a.trace)
    trace = [t for t in rows if t.prompt_tokens + t.output_tokens <= MAX_TOKENS][:a.requests]
    print(f"{len(trace)} requests of {os.path.basename(a.trace)}, {cost.name}, a {a.shared_prefix_tokens}-token prefix "
          f"in {a.prefix_groups} group(s), seeds {a.seeds}; skip-join-mlfq/proactive and fcfs/recompute\n")
    print("| device KV | load | skip-join: caching on / off, latency per token | throughput | mean JCT | fcfs (recompute): "
          "on / off, latency per token | skip-join over fcfs, both with caching: latency per token | throughput | hit rate "
          "| skip-join with caching, proactive over recompute: latency per token | throughput |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for memory, kv_tokens, host_tokens in (("full", 0, 68_000), ("a tenth", cost.kv_capacity_tokens // 10, 41_943)):
        for load in a.loads:
            acc = row(trace, cost, kv_tokens, host_tokens, load, a.seeds, a.shared_prefix_tokens, a.prefix_groups)
            cell = lambda k: f"{statistics.median(acc[k]):.2f}x ({', '.join(f'{v:.2f}' for v in acc[k])})"  # noqa: E731
            print(f"| {memory} | {load:g}x | {cell('sj_lat')} | {cell('sj_thr')} | {cell('sj_jct')} | {cell('fcfs_lat')} | "
                  f"{cell('gain_lat')} | {cell('gain_thr')} | {statistics.median(acc['hit']):.2f} | {cell('swap_lat')} | "
                  f"{cell('swap_thr')} |", flush=True)


if __name__ == "__main__":
    main()
