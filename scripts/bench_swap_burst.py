"""Proactive swapping against recomputation on bench_preemption.py's burst, in process.

bench_swap.py's engine part has a device pool that cannot hold one batch; this runs the burst
of bench_preemption.py instead (400 chat-like counting answers, 32 sequences, a device pool
of a quarter of the burst's KV, a host pool that holds all of it), where a batch and more
fits. skip-join and fcfs each run with `proactive` and with `recompute`, each run a fresh,
fully warmed engine, rounds alternating; every answer is checked. Prints each run, then the
medians and the ratios of skip-join/proactive to skip-join/recompute and to fcfs/recompute
(vLLM-like).

    python scripts/bench_swap_burst.py                 # 3 rounds at 300 req/s
    python scripts/bench_swap_burst.py --rate 200 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_preemption as bp  # noqa: E402
from sim_fidelity_in_process import engine_in_process  # noqa: E402

from fastserve_jax.stats import PHASES  # noqa: E402
from fastserve_jax.workload import with_arrivals  # noqa: E402

FIGURES = ("throughput_rps", "mean_latency_per_token", "e2e_mean", "e2e_p99")


def work_line(m: dict) -> str:
    """Where one run's time went: iterations, ms per iteration split by EngineStats' phases, tokens
    computed per iteration, and the KV work (blocks swapped, tokens recomputed, stall)."""
    its = m["iterations"]
    phases = " ".join(f"{k} {m[f'{k}_seconds_per_iteration'] * 1e3:.2f}" for k in PHASES)
    return (f"{its} iterations of {m['iteration_seconds'] * 1e3:.2f} ms ({phases}); "
            f"{(m['prefill_tokens'] + m['decode_tokens']) / its:.1f} tokens per iteration "
            f"({m['decode_tokens'] / its:.1f} decode); blocks out {m['swap_out_blocks']}, in {m['swap_in_blocks']}; "
            f"recomputed {m['recomputed_tokens']} tokens; stall {m['swap_stall'] / m['busy_seconds']:.2%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bp.add_burst_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    rate = a.rate if a.rate is not None else 300.0       # several times what the demo engine serves here
    b = bp.burst_setup(a)
    arrivals = [r.arrival for r in with_arrivals(b.sized, rate, seed=a.seed)]
    runs: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(a.rounds):
        for swap in ("proactive", "recompute"):
            argv_ = [swap if x == "proactive" else x for x in b.argv]         # burst_setup's --swap-policy
            for policy in ("skip-join-mlfq", "fcfs"):
                m = engine_in_process(lambda p: bp.local_engine(argv_, p, warmup="full"), b.work, arrivals, policy)
                runs.setdefault((policy, swap), []).append(m)
                print(f"round {rnd + 1} {policy}/{swap}: {m['throughput_rps']:.1f} req/s, "
                      f"{m['mean_latency_per_token'] * 1e3:.2f} ms per token, JCT mean {m['e2e_mean']:.3f} s, "
                      f"p99 {m['e2e_p99']:.3f} s", flush=True)
                print("    " + work_line(m), flush=True)
    med = {k: {f: statistics.median(m[f] for m in ms) for f in FIGURES} for k, ms in runs.items()}
    print(f"\nmedians of {a.rounds} rounds at {rate:g} req/s")
    print(f"  {'':>26}{'req/s':>9}{'ms/token':>10}{'JCT s':>8}{'p99 s':>8}")
    for (policy, swap), m in med.items():
        print(f"  {policy + '/' + swap:>26}{m['throughput_rps']:>9.1f}{m['mean_latency_per_token'] * 1e3:>10.2f}"
              f"{m['e2e_mean']:>8.3f}{m['e2e_p99']:>8.3f}")
    sj = med[("skip-join-mlfq", "proactive")]
    for other in (("skip-join-mlfq", "recompute"), ("fcfs", "recompute")):
        o = med[other]
        print(f"  skip-join/proactive against {'/'.join(other)}: {sj['throughput_rps'] / o['throughput_rps']:.3f}x "
              f"the rate, {o['mean_latency_per_token'] / sj['mean_latency_per_token']:.2f}x lower latency per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
