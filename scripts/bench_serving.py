"""Replay a scaled-down slice of the Azure trace against the real engine, one policy after
another in the same process, with the bundled demo model.

Each trace request becomes a counting prompt whose answer has the trace's output length
(scaled by --output-scale, clipped to what the demo model supports); prompts are the
task's own (about 8 tokens), so prompt lengths do not follow the trace. Arrivals are
Poisson at --load times the capacity the engine's own profiled cost model implies for
this workload (fastserve_jax.workload.capacity_rps), or at --rate. Every answer is checked.

    python scripts/bench_serving.py                       # all five policies, 60 requests
    python scripts/bench_serving.py --policy fcfs --policy skip-join-mlfq --load 0.9 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastserve_jax import LLM, SamplingParams  # noqa: E402
from fastserve_jax.metrics import summarize  # noqa: E402
from fastserve_jax.scheduler import POLICIES  # noqa: E402
from fastserve_jax.workload import TraceRequest, capacity_rps, load_trace, with_arrivals  # noqa: E402
from models import demo_task  # noqa: E402

DEMO_MAX_TOKENS = 257   # the shipped demo model answers spans B - A <= 255: 256 numbers + EOS
TRACE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "traces", "azure_conv_2023.csv")


def build_workload(trace: str, n: int, output_scale: float, seed: int, tokenizer):
    rows, _ = load_trace(trace)
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in rng.choice(len(rows), n, replace=False)]
    out = []
    for r in picked:
        a, b = demo_task.pair_for_output_len(min(DEMO_MAX_TOKENS, max(2, round(r.output_tokens * output_scale))), rng)
        prompt = demo_task.make_prompt(a, b)
        out.append((prompt, (a, b), TraceRequest(0.0, len(tokenizer.encode(prompt)), demo_task.answer_num_tokens(a, b))))
    return out


def replay(llm: LLM, work, arrivals: list[float], policy: str) -> dict:
    """Feed requests at their arrival times (relative to now) while stepping the engine."""
    eng = llm.engine
    eng.set_scheduler(policy)
    start = time.monotonic()
    pending = sorted(range(len(work)), key=lambda i: arrivals[i])
    reqs = {}
    k = 0
    while k < len(pending) or eng.has_unfinished():
        now = time.monotonic() - start
        while k < len(pending) and arrivals[pending[k]] <= now:
            i = pending[k]
            prompt, _, tr = work[i]
            # max_tokens is the exact answer length: EOS ends every request there, and the
            # srpt oracle reads it as the true output length.
            reqs[i] = eng.add_request(prompt, SamplingParams(max_tokens=tr.output_tokens, temperature=0),
                                      arrival_time=start + arrivals[i])
            k += 1
        if eng.has_unfinished():
            eng.step()
        elif k < len(pending):
            time.sleep(max(0.0, arrivals[pending[k]] - (time.monotonic() - start)))
    done = [reqs[i] for i in range(len(work))]
    wrong = sum(not demo_task.check_answer(a, b, r.output_text) for r, (_, (a, b), _) in zip(done, work))
    m = summarize(done)
    m.update(wrong_answers=wrong, preemptions=sum(r.num_preemptions for r in done))
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--num-requests", type=int, default=60)
    ap.add_argument("--output-scale", type=float, default=0.5, help="trace output lengths are multiplied by this")
    ap.add_argument("--load", type=float, default=0.9, help="arrival rate as a fraction of the cost model's capacity")
    ap.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (overrides --load)")
    ap.add_argument("--policy", action="append", choices=sorted(POLICIES))
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--num-device-blocks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    policies = a.policy or ["fcfs", "mlfq", "skip-join-mlfq", "gittins", "srpt"]

    t0 = time.perf_counter()
    llm = LLM(max_model_len=1024, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
              num_device_blocks=a.num_device_blocks)
    eng = llm.engine
    print(f"engine: demo model, start {time.perf_counter() - t0:.1f} s, {eng.kv.num_usable_blocks} KV blocks "
          f"of {eng.cfg.block_size}, max_num_seqs {eng.cfg.max_num_seqs}, budget {eng.cfg.max_num_batched_tokens}")
    work = build_workload(a.trace, a.num_requests, a.output_scale, a.seed, llm.tokenizer)
    outs = np.array([w[2].output_tokens for w in work])
    cap = capacity_rps([w[2] for w in work], eng.cost_model, eng.cfg.max_num_seqs,
                       eng.kv.num_usable_blocks * eng.cfg.block_size)
    rate = a.rate or a.load * cap
    print(f"workload: {len(work)} Azure requests, output tokens x{a.output_scale} clipped to "
          f"[2, {DEMO_MAX_TOKENS}]: mean {outs.mean():.0f}, p50 {np.median(outs):.0f}, max {outs.max()}; "
          f"counting prompts of ~{np.mean([w[2].prompt_tokens for w in work]):.0f} tokens")
    print(f"arrivals: Poisson at {rate:.2f} req/s (capacity by the profiled cost model {cap:.2f} req/s; "
          f"load {rate / cap:.2f})")
    arrivals = [r.arrival for r in with_arrivals([w[2] for w in work], rate, seed=a.seed)]
    llm.generate(work[0][0], SamplingParams(max_tokens=4, temperature=0))   # touch every code path once

    results = {}
    for p in policies:
        results[p] = replay(llm, work, arrivals, p)
    cols = ["mean_jct", "p50_jct", "p99_jct", "mean_ttft", "p99_ttft", "mean_tpot", "mean_latency_per_token",
            "throughput_rps", "throughput_tps", "preemptions", "wrong_answers"]
    print(f"\n{'policy':16s}" + "".join(f"{c:>13s}" for c in ["jct mean", "jct p50", "jct p99", "ttft mean",
                                                             "ttft p99", "tpot mean", "lat/token", "req/s",
                                                             "tok/s", "preempt", "wrong"]))
    for p, m in results.items():
        print(f"{p:16s}" + "".join(f"{m[c]:13.3f}" if isinstance(m[c], float) else f"{m[c]:13d}" for c in cols))
    print("(seconds; tpot = (finish - first token) / (tokens - 1); lat/token = mean of jct / output tokens)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rate=rate, capacity=cap, policies=results), f, indent=1)
    return 1 if any(m["wrong_answers"] for m in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
