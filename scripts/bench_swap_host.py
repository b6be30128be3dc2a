"""The swap path's host time per iteration, on bench_swap_burst.py's burst, in process.

Skip-join serves bench_preemption.py's burst (400 chat-like counting answers, a device pool of
a quarter of their KV) with `proactive` swapping and with `recompute`, each run a fresh, fully
warmed engine, rounds alternating. Proactive runs three times: with the backend's choice of
copy path per swap (kv_transfer.FUSED_MAX_BYTES: the demo model's swaps are small, so fused
everywhere, and the first two runs are the same path: an A/A pair that shows the noise), and
with every swap forced through the fused path and through `jax.device_put`s (a run that fails
is reported, and the rest go on).
`--fcfs` adds fcfs with recompute, the issue's baseline. The swap path's calls are timed by
wrapping them (SwapCopies.ahead, its issue, land and on_demand, SwapPolicy.plan_ahead), and
each run prints their host milliseconds per iteration beside the engine's phases and served
rate; the end prints each variant's medians against the recompute rows. Every answer is checked.

    python scripts/bench_swap_host.py                  # 2 rounds
    python scripts/bench_swap_host.py --rounds 3 --num-requests 200 --fcfs
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_preemption as bp  # noqa: E402
from bench_swap_burst import work_line  # noqa: E402
from sim_fidelity_in_process import engine_in_process  # noqa: E402

from fastserve_jax.runner import kv_transfer  # noqa: E402
from fastserve_jax.swap_copies import SwapCopies  # noqa: E402
from fastserve_jax.swap_policy import SwapPolicy  # noqa: E402
from fastserve_jax.workload import with_arrivals  # noqa: E402

TIMED = ((SwapCopies, "ahead"), (SwapCopies, "issue"), (SwapCopies, "land"), (SwapCopies, "on_demand"),
         (SwapPolicy, "plan_ahead"))


def timed_calls() -> collections.Counter:
    """Wrap TIMED's methods so that each call adds its wall time (seconds) to the returned counter
    under the method's name (ahead includes plan_ahead and issue)."""
    spent: collections.Counter = collections.Counter()
    for cls, name in TIMED:
        fn = getattr(cls, name)

        def timed(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                spent[_name] += time.perf_counter() - t0
        setattr(cls, name, timed)
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bp.add_burst_args(ap)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fcfs", action="store_true", help="also run fcfs with recompute (the issue's baseline) "
                                                         "each round, and compare the medians with it")
    a = ap.parse_args(argv)
    rate = a.rate if a.rate is not None else 300.0
    b = bp.burst_setup(a)
    arrivals = [r.arrival for r in with_arrivals(b.sized, rate, seed=a.seed)]
    spent = timed_calls()
    variants = [("skip-join-mlfq", "proactive", path) for path in ("backend", "fused", "device_put")]
    variants.append(("skip-join-mlfq", "recompute", "backend"))
    if a.fcfs:
        variants.append(("fcfs", "recompute", "backend"))
    served: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for rnd in range(a.rounds):
        for policy, swap, path in variants:
            argv_ = [swap if x == "proactive" else x for x in b.argv]      # burst_setup's --swap-policy
            name = f"{policy.removesuffix('-mlfq')}/{swap}{'' if swap == 'recompute' else ' ' + path}"
            spent.clear()
            try:
                with kv_transfer.forced_copy_path(path):
                    llm = bp.local_engine(argv_, policy, warmup="full")
                m = engine_in_process(lambda p: llm, b.work, arrivals, policy)
            except Exception as e:                                      # a forced path may not run here
                print(f"round {rnd + 1} {name}: failed: {type(e).__name__}: {e}"[:600], flush=True)
                continue
            its = m["iterations"]
            served[name].append((m["throughput_rps"], m["mean_latency_per_token"]))
            host = " ".join(f"{fn} {spent[fn] / its * 1e3:.3f}" for _, fn in TIMED)
            print(f"round {rnd + 1} {name}: "
                  f"{m['throughput_rps']:.1f} req/s, {m['mean_latency_per_token'] * 1e3:.2f} ms per token\n"
                  f"    {work_line(m)}\n    swap path host ms per iteration: {host}", flush=True)
    print_medians(served)
    return 0


def print_medians(served: dict[str, list[tuple[float, float]]]) -> None:
    """Each variant's median served rate and latency per token, and both against the fcfs/recompute
    and skip-join/recompute rows where they ran."""
    med = {k: (statistics.median(r for r, _ in v), statistics.median(t for _, t in v)) for k, v in served.items()}
    print("\nmedians")
    for k, (rate, lat) in med.items():
        vs = "".join(f"; vs {b}: {rate / med[b][0]:.3f}x rate, {med[b][1] / lat:.2f}x lower ms/token"
                     for b in ("fcfs/recompute", "skip-join/recompute") if b in med and b != k)
        print(f"  {k:45} {rate:6.1f} req/s {lat * 1e3:7.2f} ms/token ({len(served[k])} runs){vs}")


if __name__ == "__main__":
    sys.exit(main())
