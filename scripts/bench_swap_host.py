"""The swap path's host time per iteration, on bench_swap_burst.py's burst, in process.

Skip-join serves bench_preemption.py's burst (400 chat-like counting answers, a device pool of
a quarter of their KV) with `proactive` swapping and with `recompute`, each run a fresh, fully
warmed engine, rounds alternating. Proactive runs twice: with this backend's copy path and
with the other one. The copies are fused into the compiled gather and scatter on the CPU
(kv_transfer.FUSED_PLATFORMS) and are `jax.device_put`s both ways elsewhere, so on a GPU the
second run tries the fused path there (a run that fails is reported, and the rest go on).
The swap path's calls are timed
by wrapping them (SwapCopies.ahead, its issue, land and on_demand, SwapPolicy.plan_ahead), and
each run prints their host milliseconds per iteration beside the engine's phases and served
rate. Every answer is checked.

    python scripts/bench_swap_host.py                  # 2 rounds
    python scripts/bench_swap_host.py --rounds 3 --num-requests 200
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

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
    a = ap.parse_args(argv)
    rate = a.rate if a.rate is not None else 300.0
    b = bp.burst_setup(a)
    arrivals = [r.arrival for r in with_arrivals(b.sized, rate, seed=a.seed)]
    spent = timed_calls()
    shipped = kv_transfer.FUSED_PLATFORMS
    platform = jax.devices()[0].platform
    others = tuple(p for p in shipped if p != platform)
    paths = {"fused": (*others, platform), "device_put": others}        # FUSED_PLATFORMS for each path here
    default = "fused" if platform in shipped else "device_put"
    other = "device_put" if default == "fused" else "fused"
    variants = [("proactive", f"{default} (this backend's path)", paths[default]),
                ("proactive", other, paths[other]), ("recompute", "", shipped)]
    try:
        for rnd in range(a.rounds):
            for swap, label, platforms in variants:
                kv_transfer.FUSED_PLATFORMS = platforms
                argv_ = [swap if x == "proactive" else x for x in b.argv]      # burst_setup's --swap-policy
                spent.clear()
                try:
                    llm = bp.local_engine(argv_, "skip-join-mlfq", warmup="full")
                    m = engine_in_process(lambda p: llm, b.work, arrivals, "skip-join-mlfq")
                except Exception as e:                                      # the other path may not run here
                    print(f"round {rnd + 1} skip-join/{swap} {label}: failed: {type(e).__name__}: {e}"[:600], flush=True)
                    continue
                its = m["iterations"]
                host = " ".join(f"{name} {spent[name] / its * 1e3:.3f}" for _, name in TIMED)
                print(f"round {rnd + 1} skip-join/{swap}{' ' + label if label else ''}: "
                      f"{m['throughput_rps']:.1f} req/s, {m['mean_latency_per_token'] * 1e3:.2f} ms per token\n"
                      f"    {work_line(m)}\n    swap path host ms per iteration: {host}", flush=True)
    finally:
        kv_transfer.FUSED_PLATFORMS = shipped
    return 0


if __name__ == "__main__":
    sys.exit(main())
