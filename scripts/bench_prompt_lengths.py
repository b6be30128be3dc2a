"""The real engine on templated traffic: `predictive`, ranking on its own prompt-length
predictions, against skip-join-mlfq and fcfs, in process with the bundled demo model.

Templated traffic: a few "applications", each with its own prompt size and answer length
(the Azure trace's shape, docs/scheduling.md "Predicted output lengths"). The prompts are
token ids of the application's size and the answer length is set by max_tokens with
ignore_eos, so the engine schedules exactly these lengths (the demo model's text is not
checked here; the answers' lengths are). Each round runs every policy in turn (each round
starting with the next policy) on a fresh engine with fresh learned-length and predictor
directories (nothing carried between them):
a warm-up batch of --warm requests from the same applications, from which the policies
learn (predictive's gate opens on them), then a burst of --num-requests submitted at once.
Figures over the burst: mean latency per output token (JCT / tokens, FastServe's figure),
mean and p99 JCT, and throughput (requests over the span from the burst's submission to its
last finish; and the first 90% of them over the span to theirs, which leaves out the drain
at the end, where a policy that ran the short requests first has the long ones left in a
batch no longer full), with each policy's ratio to fcfs's in the same round and the medians
over rounds.

    python scripts/bench_prompt_lengths.py                      # 3 rounds, ~2 min on 2 cores
    python scripts/bench_prompt_lengths.py --rounds 1 --num-requests 60 --warm 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

POLICIES = ("fcfs", "skip-join-mlfq", "predictive")
APPS = ((6, 90), (24, 8), (48, 30), (80, 4))              # (prompt tokens, answer tokens)


def requests(n: int, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """n prompts (token ids) and their answer lengths, apps drawn at random, answers within
    +-20% of their application's."""
    prompts, lengths = [], []
    for a in rng.integers(0, len(APPS), n):
        p, o = APPS[a]
        prompts.append([int(t) for t in rng.integers(3, 20, p)])
        lengths.append(max(1, int(round(o * rng.uniform(0.8, 1.2)))))
    return prompts, lengths


def run_policy(policy: str, a: argparse.Namespace, seed: int) -> dict:
    from fastserve_jax import LLM, SamplingParams

    rng = np.random.default_rng(seed)                     # the same requests for every policy
    warm, burst = requests(a.warm, rng), requests(a.num_requests, rng)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FASTSERVE_JAX_LENGTHS_DIR"] = os.path.join(tmp, "lengths")
        os.environ["FASTSERVE_JAX_PREDICTOR_DIR"] = os.path.join(tmp, "predictor")
        llm = LLM(scheduler=policy, max_num_seqs=a.max_num_seqs, num_device_blocks=a.device_blocks,
                  swap_policy=a.swap_policy, warmup="full")
        sp = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in warm[1]]
        llm.generate(warm[0], sp)
        t0 = time.monotonic()
        outs = llm.generate(burst[0], [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0) for n in burst[1]])
        done = sorted(o.metrics.finish_time - t0 for o in outs)
        span, span90 = done[-1], done[int(0.9 * len(done)) - 1]
        sched = llm.engine.scheduler
        gate = getattr(getattr(sched, "prompts", None), "tau", float("nan"))
        ranked = getattr(sched, "warmup", 0) is None
        llm.engine.close()
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != burst[1]:
        raise RuntimeError(f"{policy}: answers of other lengths than asked")
    jct = np.array([o.metrics.latency for o in outs])
    return dict(lpt=float(np.mean(jct / np.array(got))), jct=float(jct.mean()), p99=float(np.percentile(jct, 99)),
                rps=len(outs) / span, rps90=int(0.9 * len(outs)) / span90, gate=gate, ranked=ranked)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--warm", type=int, default=120, help="requests the policies learn from before the burst")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--device-blocks", type=int, default=128, help="device KV blocks of 16 tokens")
    ap.add_argument("--swap-policy", default="proactive", choices=["proactive", "reactive", "recompute"])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES[1:]), choices=POLICIES[1:],
                    help="the policies run beside fcfs")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if min(a.rounds, a.num_requests, a.warm) < 1:
        ap.error("--rounds, --num-requests and --warm must be at least 1")
    print(f"applications (prompt -> answer tokens): {', '.join(f'{p} -> {o}' for p, o in APPS)}; burst of "
          f"{a.num_requests} after {a.warm} to learn from; {a.max_num_seqs} sequences, {a.device_blocks} device blocks, "
          f"{a.swap_policy}")
    ratios: dict[str, dict[str, list[float]]] = {p: {"lpt": [], "jct": [], "p99": [], "rps": [], "rps90": []}
                                                 for p in POLICIES}
    for r in range(a.rounds):
        order = ["fcfs"] + a.policies
        order = order[r % len(order):] + order[:r % len(order)]          # each round starts with another
        res = {p: run_policy(p, a, a.seed + r) for p in order}
        f = res["fcfs"]
        for p in ["fcfs"] + a.policies:
            m = res[p]
            for k in ("lpt", "jct", "p99"):
                ratios[p][k].append(f[k] / m[k])
            for k in ("rps", "rps90"):
                ratios[p][k].append(m[k] / f[k])
            print(f"round {r} {p:15s} latency/token {m['lpt'] * 1e3:7.2f} ms  mean JCT {m['jct']:6.3f} s  p99 "
                  f"{m['p99']:6.3f} s  {m['rps']:6.1f} req/s  | vs fcfs: latency/token {f['lpt'] / m['lpt']:.2f}x "
                  f"better, mean JCT {m['jct'] / f['jct']:.2f}x, p99 {m['p99'] / f['p99']:.2f}x, throughput "
                  f"{m['rps'] / f['rps']:.3f}x (to the 90th percentile finish {m['rps90'] / f['rps90']:.3f}x)" + (f"  (gate {m['gate']:.2f}, ranked: {m['ranked']})"
                                                   if p == "predictive" else ""), flush=True)
    print("\nmedians over rounds, against fcfs in the same round:")
    for p in a.policies:
        q = {k: statistics.median(v) for k, v in ratios[p].items()}
        print(f"  {p:15s} latency per token {q['lpt']:.2f}x better, mean JCT {1 / q['jct']:.2f}x fcfs's, p99 "
              f"{1 / q['p99']:.2f}x, throughput {q['rps']:.3f}x ({q['rps90']:.3f}x to the 90th percentile finish)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
