"""The engine on the server's thread against the engine in a process of its own
(`serve --engine-process`), on the burst of scripts/bench_preemption.py, in one run.

Interleaved pairs of fresh servers (thread, process, thread, ...; the same policy, burst,
arrivals and pools), every answer checked token for token. Per pair: served req/s, latency
per output token, mean and p99 JCT, TTFT, and the engine's own seconds per iteration (its
busy counter over its iterations, from /metrics); the median of the per-pair ratios
process/thread, since this VM's speed drifts between pairs.

    python scripts/bench_frontend.py                        # skip-join-mlfq, 3 pairs
    python scripts/bench_frontend.py --policy fcfs --pairs 5 --rate 250
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_preemption import add_burst_args, burst_rate, burst_setup, print_paired, serve_burst  # noqa: E402

from fastserve_jax.workload import with_arrivals  # noqa: E402

MODES = {"thread": (), "process": ("--engine-process",)}
FIGURES = [("throughput_rps", "served req/s", 1), ("mean_latency_per_token", "ms per token", 1e3),
           ("e2e_mean", "JCT mean s", 1), ("e2e_p99", "JCT p99 s", 1), ("ttft_mean", "TTFT mean s", 1),
           ("iteration_seconds", "ms per iteration", 1e3), ("iterations", "iterations", 1)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved thread / process runs (default 3)")
    ap.add_argument("--policy", default="skip-join-mlfq")
    add_burst_args(ap)
    ap.add_argument("--json", default="bench_frontend.json", help="where the figures go")
    a = ap.parse_args()
    if a.pairs < 1 or a.num_requests < 2:
        ap.error("--pairs >= 1 and --num-requests >= 2")
    b = burst_setup(a)
    b.llm = None
    runs = []
    try:
        capacity, rate = burst_rate(a, b)
        arrivals = [r.arrival for r in with_arrivals(b.sized, rate, seed=a.seed)]
        print(f"arrivals: Poisson at {rate:.2f} req/s, the last at {arrivals[-1]:.1f} s; policy {a.policy}", flush=True)
        for i in range(a.pairs):
            pair = {}
            for mode, extra in MODES.items():
                pair[mode] = m = serve_burst(a.policy, b.argv, b.warm, b.work, arrivals, serve_argv=extra)
                print(f"  pair {i + 1} {mode}: {m['throughput_rps']:.2f} req/s, "
                      f"{1e3 * m['mean_latency_per_token']:.1f} ms/token, JCT mean {m['e2e_mean']:.2f} s, "
                      f"{1e3 * m['iteration_seconds']:.2f} ms/iteration", flush=True)
            runs.append(pair)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"\n== the engine on the server's thread vs in its own process ({a.policy}, demo model, over HTTP)")
    medians = print_paired(runs, FIGURES, "thread", "process", ("thread", "process", "p/t"))
    with open(a.json, "w") as f:
        json.dump(dict(args=vars(a), capacity_rps=capacity, rate=rate, runs=runs, medians=medians), f, indent=1,
                  default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
