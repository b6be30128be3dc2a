"""What MLFQ charges a batch, on the real engine, in process: its time by the cost model
(Scheduler.service, the default since 2026-12-03) against its measured seconds (before).

skip-join-mlfq serves bench_preemption.py's burst (400 chat-like counting requests, a device
pool of a quarter of their live KV, the host pool on) at --overload times the capacity of an
in-process fcfs generate, or at --rate. Four configurations take turns, --rounds times each,
a fresh engine per run: charged by the model or by the clock, each with no stall and with a
busy host stall of --stall ms inside every iteration (what a garbage collection or the HTTP
server's thread holding the GIL does to the engine's clock). Every answer is checked.

Prints medians over the rounds (and per-round values) of mean and p99 JCT, latency per
token, served rate and mean time per output token by output length, where a request demoted
too early waits: charged by the clock, a stall counts as service and demotes the running
requests after less work.

    python scripts/bench_service_charge.py                    # 3 rounds, 3 ms stall
    python scripts/bench_service_charge.py --rounds 5 --stall 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastserve_jax.workload import with_arrivals  # noqa: E402
from bench_preemption import add_burst_args, burst_setup, local_engine  # noqa: E402
from bench_tail_guard import probe_capacity  # noqa: E402
from sim_by_length import LENGTH_BUCKETS  # noqa: E402
from sim_fidelity_in_process import engine_in_process  # noqa: E402

FIGURES = (("e2e_mean", "JCT mean s", 1), ("e2e_p99", "JCT p99 s", 1),
           ("mean_latency_per_token", "latency per token ms", 1e3), ("throughput_rps", "served req/s", 1),
           ("iteration_seconds", "ms per iteration", 1e3))


def tpot_by_length(rows: list[list[float]]) -> dict[str, float]:
    """Mean time per output token (s) of the requests in each LENGTH_BUCKETS bucket with more
    than one token; rows: [TTFT, JCT, tokens]."""
    a = np.asarray(rows, float)
    n = a[:, 2]
    out = {}
    for lo, hi in LENGTH_BUCKETS:
        k = (n >= max(lo, 2)) & (n < hi)
        if k.any():
            out[f"tpot {lo}-{min(hi, 10_000) - 1}"] = float(((a[k, 1] - a[k, 0]) / (n[k] - 1)).mean())
    return out


def builder(argv: list[str], charge: str, stall: float):
    """build(policy) for engine_in_process: a fresh engine charged by `charge` ("model" or
    "clock"), whose every dispatch first busy-waits `stall` seconds."""
    def build(policy: str):
        llm = local_engine(argv, policy, "full")
        eng = llm.engine
        if charge == "clock":
            eng.scheduler.service = lambda plan: None          # the engine then charges measured seconds
        if stall > 0:
            dispatch = eng._dispatch

            def stalled(*a):
                t = time.perf_counter()
                while time.perf_counter() - t < stall:
                    pass
                return dispatch(*a)

            eng._dispatch = stalled
        return llm
    return build


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_burst_args(ap)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stall", type=float, default=3.0, help="ms of host stall in every iteration (default 3)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.rounds < 1 or not a.stall >= 0:
        ap.error("--rounds >= 1 and --stall >= 0")
    b = burst_setup(a)
    rate = a.rate or a.overload * probe_capacity(b.llm, b.probe)
    arrivals = [r.arrival for r in with_arrivals(b.sized, rate, seed=a.seed)]
    b.llm = None                                              # one engine at a time from here
    print(f"arrivals: Poisson at {rate:.1f} req/s ({'--rate' if a.rate else f'{a.overload:g}x in-process fcfs'})",
          flush=True)
    configs = [(charge, stall) for stall in (0.0, a.stall / 1e3) for charge in ("model", "clock")]
    runs: dict[str, list[dict]] = {}
    for i in range(a.rounds):
        for charge, stall in configs:
            name = f"{charge}, stall {1e3 * stall:g} ms"
            m = engine_in_process(builder(b.argv, charge, stall), b.work, arrivals, "skip-join-mlfq", per_request=True)
            m.update(tpot_by_length(m.pop("per_request")))
            runs.setdefault(name, []).append(m)
            print(f"  round {i + 1} {name}: {1e3 * m['mean_latency_per_token']:.1f} ms/token, JCT mean "
                  f"{m['e2e_mean']:.3f} s, p99 {m['e2e_p99']:.3f} s", flush=True)
    keys = [(k, label, s) for k, label, s in FIGURES] + [(k, f"{k} ms", 1e3) for k in runs[name][0]
                                                         if k.startswith("tpot ")]
    print(f"\n== skip-join-mlfq in process, medians of {a.rounds} rounds (per-round values in brackets)")
    print(f"{'':24s}" + "".join(f"{n:>26s}" for n in runs))
    medians = {n: {} for n in runs}
    for k, label, s in keys:
        cells = []
        for n, rs in runs.items():
            vals = [s * r[k] for r in rs if k in r]
            medians[n][k] = statistics.median(vals) / s
            cells.append(f"{statistics.median(vals):9.3g} [{' '.join(f'{v:.3g}' for v in vals)}]")
        print(f"{label:24s}" + "".join(f"{c:>26s}" for c in cells))
    out = dict(args=vars(a), engine_argv=b.argv, rate=rate, arrivals=arrivals, runs=runs, medians=medians)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
