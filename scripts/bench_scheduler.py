"""Host cost of one schedule() call with many live requests (the issue asks < 1 ms median at 1,000).

    python scripts/bench_scheduler.py [--live 1000] [--iters 2000] [--kv-tokens 0] [--policy P ...]
    python scripts/bench_scheduler.py --simulate [--policy P ...]

For each policy: admit `--live` requests with prompt/output lengths drawn from the Azure
conversation trace's distribution (or a lognormal stand-in when the trace is not beside the
checkout), warm the state up with 300 iterations applied as the engine applies them (so
requests are spread over queues, hold KV, and gittins and skip-join have learned from 2,000
lengths), then time `--iters` further schedule() calls, each followed by the same
application. Finished requests are replaced, so the live count stays at `--live`. Only
schedule() is timed.

--simulate: every host call a policy gets per iteration (schedule, the swap policy's planning,
applying the plan, on_iteration), as fastserve_jax.sim times them, in overload bursts of 400
requests at 3x capacity (the OPT-13B cost model, batch 16, 2,048 tokens, proactive swapping,
the cost model's device KV and a tenth of it; lengths as above, prompt + output <= 5,933
tokens). Prints each policy's host time per iteration (the least of --repeats runs) and a
hash of its decisions (every request's first-token and finish times), so a change meant to
make the policies faster can show both that it did and that it decided nothing differently.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastserve_jax import AZURE_TRACE  # noqa: E402
from fastserve_jax.config import SamplingParams, SchedulerConfig  # noqa: E402
from fastserve_jax.cost_model import CostModel  # noqa: E402
from fastserve_jax.kv_cache import KVManager  # noqa: E402
from fastserve_jax.kv_plan import apply_plan  # noqa: E402
from fastserve_jax.request import Request  # noqa: E402
from fastserve_jax.scheduler import POLICIES, Limits, make_scheduler  # noqa: E402
from fastserve_jax.sim import advance  # noqa: E402

TRACE = AZURE_TRACE        # shipped with the package (fastserve_jax/traces)


def lengths(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    if os.path.isfile(TRACE):
        data = np.loadtxt(TRACE, delimiter=",", skiprows=1, usecols=(1, 2), dtype=int)
        pick = data[rng.integers(0, len(data), n)]
        return pick[:, 0], pick[:, 1]
    return (rng.lognormal(6.8, 0.7, n).astype(int) + 1).clip(1, 4000), (rng.lognormal(4.9, 0.8, n).astype(int) + 1)


class Workload:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = lengths(100_000, self.rng)
        self.i = 0

    def next(self, now: float) -> Request:
        p, o = int(self.pool[0][self.i]), int(self.pool[1][self.i])
        self.i += 1
        return Request(f"r{self.i}", range(p), SamplingParams(max_tokens=o, ignore_eos=True), now)


def bench(policy: str, live: int, iters: int, kv_tokens: int, cost: CostModel) -> list[float]:
    wl = Workload()
    block = 16
    blocks = (kv_tokens // block if kv_tokens else live * 400) + 1
    kv = KVManager(blocks, block)
    sched = make_scheduler(policy, Limits(16, 2048), kv, SchedulerConfig(), cost)
    if policy == "gittins":
        for o in wl.pool[1][-2000:]:
            sched.pooled.append(int(o))
            sched.history[0].append(int(o))
    elif policy == "skip-join-mlfq":                  # protected decodes from the first iteration
        sched.restore_lengths({"pooled": [int(o) for o in wl.pool[1][-2000:]]})
    now = 0.0
    for _ in range(live):
        sched.add(wl.next(now))
    times = []
    for it in range(300 + iters):
        t0 = time.perf_counter()
        plan = sched.schedule(now)
        dt = time.perf_counter() - t0
        if it >= 300:
            times.append(dt)
        apply_plan(plan, kv, now)
        step = 0.02
        now += step
        for r in advance(plan, now):
            kv.free(r)
            sched.remove(r)
            sched.add(wl.next(now))
        sched.on_iteration(plan, step, now)
    assert len(sched) == live
    return times


def simulated_host_time(policies: list[str], repeats: int, cost: CostModel) -> None:
    """--simulate (the module docstring)."""
    import hashlib
    import json

    from fastserve_jax.sim import SimConfig, simulate
    from fastserve_jax.workload import TraceRequest, capacity_rps, with_arrivals
    from repro_fastserve import MAX_TOKENS, MEMORY       # the grid's memories (scripts/ is on sys.path)

    rng = np.random.default_rng(0)
    p, o = lengths(4000, rng)
    trace = [TraceRequest(0.0, int(a), int(b)) for a, b in zip(p, o) if a + b <= MAX_TOKENS][:400]
    print(f"{len(trace)} requests at 3x capacity, proactive swapping; host microseconds per iteration "
          f"(least of {repeats} runs) and a hash of the decisions")
    print(f"{'device KV':>10} {'policy':>15} {'iterations':>10} {'host us':>9}  decisions")
    for memory, (tokens, host) in MEMORY.items():
        cfg = SimConfig(16, 2048, 16, tokens, host_kv_capacity_tokens=host, swap_policy="proactive")
        rate = 3.0 * capacity_rps(trace, cost, 16, (cfg.num_blocks(cost) - 1) * 16)
        for policy in policies:
            host, digests = [], set()
            for _ in range(repeats):
                res = simulate(with_arrivals(trace, rate, seed=0), policy, cost, cfg)
                host.append(res.policy_host_seconds / res.iterations)
                times = [(r.request_id, r.metrics.first_token_time, r.metrics.finish_time) for r in res.requests]
                digests.add(hashlib.md5(json.dumps(times).encode()).hexdigest()[:12])
            assert len(digests) == 1, f"{policy} decided differently in two runs of the same simulation"
            print(f"{memory:>10} {policy:>15} {res.iterations:10d} {min(host) * 1e6:9.1f}  {digests.pop()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--kv-tokens", type=int, default=0, help="KV pool in tokens (0: room for every request)")
    ap.add_argument("--policy", action="append", choices=sorted(POLICIES))
    ap.add_argument("--cost-model", default="opt-13b-a100")
    ap.add_argument("--simulate", action="store_true", help="host time per iteration in simulated bursts (above)")
    ap.add_argument("--repeats", type=int, default=3, help="--simulate: runs per policy, the least time kept")
    a = ap.parse_args()
    cost = CostModel.load(a.cost_model)
    if a.simulate:
        simulated_host_time(a.policy or ["fcfs", "mlfq", "skip-join-mlfq", "gittins"], a.repeats, cost)
        return 0
    lengths_from = (f"the Azure trace ({os.path.normpath(TRACE)})" if os.path.isfile(TRACE) else
                    "log-normal lengths (the Azure trace is not beside this checkout; figures are not "
                    "comparable with runs that had it)")
    print(f"schedule() with {a.live} live requests, max_num_seqs 16, budget 2048, "
          f"KV {'ample' if not a.kv_tokens else f'{a.kv_tokens} tokens'}; lengths from {lengths_from}")
    print(f"{'policy':>15} {'median':>9} {'p90':>9} {'p99':>9}  (ms)")
    worst = 0.0
    for p in a.policy or ["fcfs", "mlfq", "skip-join-mlfq", "gittins", "srpt"]:
        t = sorted(bench(p, a.live, a.iters, a.kv_tokens, cost))
        med = statistics.median(t)
        worst = max(worst, med)
        print(f"{p:>15} {med * 1e3:9.3f} {t[int(0.9 * len(t))] * 1e3:9.3f} {t[int(0.99 * len(t))] * 1e3:9.3f}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
