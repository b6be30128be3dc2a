"""Scheduling on learned output lengths, on the real engine over HTTP (issue 18).

Four policies, each in a fresh `fastserve-jax serve` with the bundled demo model, in
interleaved rounds (skip-join-mlfq, predictive, fcfs, srpt, then again):

1. a prelude of --train-requests counting prompts from 64 clients in a closed loop: the
   predictive server's length predictor learns from them (it needs 200 finished requests before it predicts);
   every server gets the same prelude so that they start the burst alike;
2. the measured burst: --num-requests prompts with Poisson arrivals at --overload times the
   capacity a probe measures (fcfs, max-num-seqs clients in a closed loop), lasting at least
   --min-seconds.

Output lengths are heavy-tailed (log-normal, median about 20 tokens, clipped to the demo
model's 2..257). Every request asks for max_tokens 257 except under srpt, which gets its
true length as max_tokens and is the oracle. The predictor never sees the prompt's text: it
reads the model's hidden states (fastserve_jax/predictor.py). Every answer is checked token
for token. It prints per run and as medians: served req/s, mean JCT, p99 JCT, mean latency per
output token, and how much of the distance between skip-join-mlfq and srpt predictive closes,
plus the predictor's quality and upkeep from the server's /metrics.

    python scripts/bench_predictive.py                      # 2 rounds, about 15 minutes on 2 cores
    python scripts/bench_predictive.py --rounds 1 --num-requests 400
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastserve_jax.models import demo_task  # noqa: E402
from fastserve_jax.serve import bench_client  # noqa: E402
from fastserve_jax.serve.bench_answers import answer_problems, raise_on_problems, screen_pairs  # noqa: E402
from fastserve_jax.serve.bench_cmd import DEMO_MAX_TOKENS, LaunchedServer, slo_figures  # noqa: E402
from fastserve_jax.workload import TraceRequest, with_arrivals  # noqa: E402

POLICIES = ("skip-join-mlfq", "predictive", "fcfs", "srpt")
PRELUDE_CLIENTS = 64         # a closed loop, within the server's admission queue
FIGURES = [("throughput_rps", "served req/s", 1), ("e2e_mean", "JCT mean s", 1), ("e2e_p99", "JCT p99 s", 1),
           ("mean_latency_per_token", "ms per token", 1e3)]


def heavy_tailed_lengths(n: int, rng: np.random.Generator) -> list[int]:
    return [int(v) for v in np.clip(np.round(np.exp(rng.normal(3.0, 1.1, n))), 2, DEMO_MAX_TOKENS)]


def workload(n: int, rng) -> list:
    out = []
    for length in heavy_tailed_lengths(n, rng):
        a, b = demo_task.pair_for_output_len(length, rng)
        out.append((dict(prompt=demo_task.make_prompt(a, b), max_tokens=DEMO_MAX_TOKENS, temperature=0,
                         stream=True, stream_options={"include_usage": True}), (a, b)))
    return out


def for_policy(work: list, policy: str) -> list:
    """srpt is the oracle: its requests carry their true length as max_tokens."""
    if policy != "srpt":
        return work
    return [(dict(p, max_tokens=demo_task.answer_num_tokens(a, b)), (a, b)) for p, (a, b) in work]


# counters read before and after the measured burst: their differences go in the results
WINDOWED = {"busy_seconds_total": "busy_seconds", "predictor_upkeep_seconds_total": "window_upkeep_seconds",
            "predictor_train_seconds_total": "window_train_seconds"}


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def serve(policy: str, argv: list[str], prelude: list, work: list, arrivals: list[float] | None,
          concurrency: int | None = None) -> dict:
    server = LaunchedServer(policy, argv)
    try:
        server.wait_ready()
        bad = answer_problems(asyncio.run(bench_client.run_load(server.url, [w[0] for w in prelude], None,
                                                                 PRELUDE_CLIENTS)), prelude, "prelude")
        text = asyncio.run(bench_client.request(server.url, "GET", "/metrics"))[2].decode()
        before = {k: metric(text, f"fastserve_{k}") or 0.0 for k in WINDOWED}
        results = asyncio.run(bench_client.run_load(server.url, [w[0] for w in work], arrivals, concurrency))
        text = asyncio.run(bench_client.request(server.url, "GET", "/metrics"))[2].decode()
    finally:
        server.stop()
    raise_on_problems(policy, server.log.name, bad + answer_problems(results, work))
    server.discard_log()
    m = bench_client.summarize(results)
    m.update(slo_figures(results, []))
    # busy time and the predictor's upkeep over the measured burst alone (the prelude, start-up
    # and the update's compile at the predictor's start are before it)
    for k, name in WINDOWED.items():
        m[name] = (metric(text, f"fastserve_{k}") or 0.0) - before[k]
    for key in ("ready", "trusted", "handed_total", "samples_total", "kendall_tau", "coverage_80", "true_bin_prob", "upkeep_seconds_total",
                "train_seconds_total"):
        m[f"predictor_{key}"] = metric(text, f"fastserve_predictor_{key}")
    return m


def closed(sj: float, pred: float, srpt: float) -> float:
    """Fraction of the distance from skip-join to the oracle that predictive covers."""
    return (sj - pred) / (sj - srpt) if sj != srpt else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--train-requests", type=int, default=260)
    ap.add_argument("--num-requests", type=int, default=4000, help="the most the burst may use (it takes "
                    "overload x capacity x min-seconds)")
    ap.add_argument("--overload", type=float, default=1.5, help="arrival rate over the probed capacity")
    ap.add_argument("--min-seconds", type=float, default=30.0, help="the burst's arrivals span at least this")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench_predictive.json")
    a = ap.parse_args()
    from fastserve_jax import LLM

    t0 = time.monotonic()
    cold = tempfile.mkdtemp(prefix="fsj-predictor-")   # start cold, and leave nothing behind
    atexit.register(shutil.rmtree, cold, True)
    os.environ["FASTSERVE_JAX_PREDICTOR_DIR"] = cold
    os.environ["FASTSERVE_JAX_LENGTHS_DIR"] = os.path.join(cold, "lengths")   # learned lengths too (policy_state.py)
    argv = ["--max-num-seqs", str(a.max_num_seqs), "--max-num-batched-tokens", "512", "--warmup", "full",
            "--max-pending", "8192"]                     # the burst's backlog must not be turned away
    rng = np.random.default_rng(a.seed)
    prelude, work, probe = workload(a.train_requests, rng), workload(a.num_requests, rng), workload(64, rng)
    llm = LLM(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=512, scheduler="fcfs")
    (prelude, work, probe), replaced = screen_pairs(llm, [prelude, work, probe], a.seed)
    del llm
    outs = [demo_task.answer_num_tokens(x, y) for _, (x, y) in work]
    print(f"pool: {len(work)} requests, output tokens median {statistics.median(outs):g}, mean "
          f"{statistics.mean(outs):.1f}, max {max(outs)}; prelude {len(prelude)}; {replaced} pairs screened out",
          flush=True)
    cap = serve("fcfs", argv, [], probe, None, concurrency=a.max_num_seqs)["throughput_rps"]
    rate = a.overload * cap
    work = work[:max(2, min(len(work), int(np.ceil(rate * a.min_seconds))))]   # arrivals span >= min_seconds
    if len(work) < rate * a.min_seconds:
        print(f"warning: {len(work)} requests at {rate:.1f} req/s span less than {a.min_seconds} s; "
              "raise --num-requests", flush=True)
    arrivals = [r.arrival for r in with_arrivals([TraceRequest(0, 1, 1)] * len(work), rate, seed=a.seed)]
    print(f"capacity {cap:.1f} req/s; arrivals Poisson at {rate:.1f} req/s over {arrivals[-1]:.0f} s", flush=True)
    runs = []
    for i in range(a.rounds):
        run = {}
        for policy in POLICIES:
            run[policy] = m = serve(policy, argv, for_policy(prelude, policy), for_policy(work, policy), arrivals)
            extra = (f", predictor tau {m['predictor_kendall_tau']:.2f} from {m['predictor_samples_total']:.0f}, "
                     f"{m['predictor_handed_total']:.0f} predictions handed to the scheduler"
                     if m.get("predictor_kendall_tau") is not None else "")
            print(f"  round {i + 1} {policy}: {m['throughput_rps']:.2f} req/s, JCT mean {m['e2e_mean']:.2f} s, "
                  f"p99 {m['e2e_p99']:.2f} s, {1e3 * m['mean_latency_per_token']:.1f} ms/token{extra}", flush=True)
        runs.append(run)
    print(f"\n{'':14s}" + "".join(f"{p:>16s}" for p in POLICIES) + f"{'closed':>9s}")
    med = {}
    for key, label, scale in FIGURES:
        med[key] = {p: statistics.median(r[p][key] for r in runs) for p in POLICIES}
        gap = closed(med[key]["skip-join-mlfq"], med[key]["predictive"], med[key]["srpt"])
        print(f"{label:14s}" + "".join(f"{scale * med[key][p]:16.3g}" for p in POLICIES)
              + (f"{gap:9.0%}" if key in ("e2e_mean", "mean_latency_per_token") else ""))
    thr = med["throughput_rps"]["predictive"] / med["throughput_rps"]["fcfs"]
    pred = runs[-1]["predictive"]
    if not any(r["predictive"].get("predictor_handed_total") for r in runs):
        print("no prediction reached the scheduler (the quality gate stayed closed): predictive scheduled as "
              "skip-join-mlfq, so 'closed' measures run-to-run noise, not prediction")
    upkeep = pred["window_upkeep_seconds"] / pred["busy_seconds"]
    train = pred["window_train_seconds"] / pred["busy_seconds"]
    print(f"predictive/fcfs served req/s {thr:.3f}; predictor (last round): kendall tau "
          f"{pred['predictor_kendall_tau']}, central-80% coverage {pred['predictor_coverage_80']}, learned from "
          f"{pred['predictor_samples_total']} requests; upkeep on the engine thread {upkeep:.2%} of busy time, "
          f"training thread {train:.2%}, both over the measured burst (last round; client side, over HTTP)")
    with open(a.json, "w") as f:
        json.dump(dict(args=vars(a), capacity_rps=cap, rate=rate, runs=runs, medians=med,
                       wall_seconds=time.monotonic() - t0), f, indent=1, default=float)
    print(f"wall time {time.monotonic() - t0:.0f} s; figures in {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
