"""Skip-join's tail guard on the real engine: light-tailed traffic past capacity, in process.

The demo model serves --num-requests counting prompts whose answers have light-tailed lengths
(gamma, mean --mean-output tokens, CV about 0.6, 4-250 tokens: the shape of the Azure
conversation trace's outputs, scaled to what the demo model answers), with Poisson arrivals
at --overload times the capacity a closed fcfs probe measures (or at --rate). Three
configurations take turns on one engine, --rounds times each, on the same requests and
arrivals:
- fcfs;
- skip-join-mlfq;
- skip-join-mlfq with tail_slowdown=0 (no tail guard).

Every answer is checked token for token. Pairs the demo model misses by itself are
replaced first (bench_answers.screen_pairs). Each run also prints the engine's seconds per
iteration and its scheduling phase, the policy's host time.

The starvation limit is what the guard waits for. It is the engine's default: the
simulator's 10 s on OPT-13B scaled to the same number of full-batch decode steps
(scheduler/engine_defaults.py); at --max-num-seqs 16 the demo model decodes about 6x
faster, so it waits about 1.6 s. The figures are medians over the rounds, with the
per-round values, since this VM's speed moves between runs.

    python scripts/bench_tail_guard.py                        # 1,200 requests at 1.2x capacity, 3 rounds
    python scripts/bench_tail_guard.py --rate 65 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fastserve_jax.scheduler.engine_defaults import REFERENCE_ITERATION_SECONDS  # noqa: E402
from fastserve_jax.models import demo_task  # noqa: E402
from fastserve_jax.workload import light_tailed_lengths  # noqa: E402

FIGURES = (("e2e_mean", "JCT mean s"), ("e2e_p99", "JCT p99 s"), ("mean_latency_per_token", "latency per token s"),
           ("throughput_rps", "served req/s"))
GUARD, NO_GUARD = "skip-join-mlfq", "skip-join, no guard"
PHASE_FIGURES = ("iteration_seconds", "schedule_seconds_per_iteration")   # the engine's, per run


def light_tailed_outputs(n: int, mean: float, seed: int) -> np.ndarray:
    """Output lengths in tokens: gamma of shape 2.7 (CV 0.61 before clipping), clipped to 4-250."""
    return light_tailed_lengths(np.random.default_rng([seed, 0x7A11]), n, mean, 4, 250)


def workload(n: int, mean: float, seed: int) -> list:
    """[(payload, (A, B))] as bench_cmd.build_workload makes them: counting prompts whose exact
    answers have light_tailed_outputs' lengths (numbers, then EOS)."""
    rng = np.random.default_rng([seed, 0xC0DE])
    out = []
    for k in light_tailed_outputs(n, mean, seed):
        a, b = demo_task.pair_for_output_len(int(k), rng)
        out.append((dict(prompt=demo_task.make_prompt(a, b), max_tokens=demo_task.answer_num_tokens(a, b)), (a, b)))
    return out


def probe_capacity(llm, work: list) -> float:
    """Requests per second of one closed fcfs generate over `work`."""
    from fastserve_jax import SamplingParams

    llm.engine.set_scheduler("fcfs")
    t0 = time.perf_counter()
    llm.generate([p["prompt"] for p, _ in work], [SamplingParams(max_tokens=p["max_tokens"], temperature=0)
                                                   for p, _ in work])
    return len(work) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1200)
    ap.add_argument("--mean-output", type=float, default=100.0, help="mean output length before clipping (tokens)")
    ap.add_argument("--overload", type=float, default=1.2, help="arrival rate as a multiple of the probed capacity")
    ap.add_argument("--rate", type=float, default=None, help="arrival rate in requests/s (skips the probe)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--starvation-threshold", type=float, default=None,
                    help="seconds (default: the engine's own, 10 s scaled by its full-batch decode time over "
                         "OPT-13B's on an A100, scheduler/engine_defaults.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from fastserve_jax import LLM
    from fastserve_jax.serve.bench_answers import screen_pairs
    from sim_fidelity_in_process import engine_in_process

    # every configuration learns its output lengths afresh, as the simulator does, not from
    # the previous one's or whatever this user's cache last saw (policy_state.py)
    os.environ.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")
    llm = LLM(None, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=512, block_size=16, warmup="full",
              scheduler="fcfs")
    eng = llm.engine
    (work, probe), replaced = screen_pairs(llm, [workload(a.num_requests, a.mean_output, a.seed),
                                                  workload(96, a.mean_output, a.seed + 1)], a.seed)
    eng.set_scheduler("skip-join-mlfq")                        # profiles the engine's cost model, once
    cost, seqs = eng.cost_model, a.max_num_seqs
    guard = dataclasses.replace(eng.policy_config(), **({} if a.starvation_threshold is None else
                                                         dict(starvation_threshold=a.starvation_threshold)))
    threshold = guard.starvation_threshold
    rate = a.rate or a.overload * probe_capacity(llm, probe)
    rng = np.random.default_rng([a.seed, 0xA441])
    arrivals = [float(t) for t in np.cumsum(rng.exponential(1.0 / rate, len(work)))]
    outs = [demo_task.answer_num_tokens(*p) for _, p in work]
    print(f"{len(work)} requests ({replaced} pairs replaced), outputs {min(outs)}-{max(outs)} tokens (mean "
          f"{statistics.mean(outs):.0f}, CV {np.std(outs) / np.mean(outs):.2f}), Poisson at {rate:.1f} req/s over "
          f"{arrivals[-1]:.1f} s; --max-num-seqs {seqs}; starvation threshold {threshold:.2f} s "
          f"(full-batch decode {cost.decode_time(seqs) * 1e3:.2f} ms, OPT-13B's {REFERENCE_ITERATION_SECONDS * 1e3:.2f} ms "
          f"at batch 16)", flush=True)
    configs = {"fcfs": ("fcfs", None), GUARD: ("skip-join-mlfq", guard),
               NO_GUARD: ("skip-join-mlfq", dataclasses.replace(guard, tail_slowdown=0.0))}

    def build(name):
        policy, cfg = configs[name]
        eng.set_scheduler(policy, cfg)
        return llm

    runs = {k: [] for k in configs}
    for r in range(a.rounds):
        for name in configs:
            m = engine_in_process(build, work, arrivals, name)
            runs[name].append({k: m[k] for k in (*dict(FIGURES), *PHASE_FIGURES)})
            print(f"  round {r + 1} {name:20s} " + "  ".join(f"{label} {m[k]:.4g}" for k, label in FIGURES) +
                  f"  ms per iteration {m['iteration_seconds'] * 1e3:.2f} (schedule "
                  f"{m['schedule_seconds_per_iteration'] * 1e3:.2f})", flush=True)
    med = {n: {k: statistics.median(x[k] for x in v) for k in v[0]} for n, v in runs.items()}
    print(f"\nmedians of {a.rounds} rounds (ratios: to fcfs; latency per token as fcfs's / the policy's)")
    print(f"{'':22s}" + "".join(f"{label:>24s}" for _, label in FIGURES))
    for n in configs:
        cells = []
        for k, _ in FIGURES:
            ratio = med["fcfs"][k] / med[n][k] if k == "mean_latency_per_token" else med[n][k] / med["fcfs"][k]
            cells.append(f"{med[n][k]:.4g} ({ratio:.2f}x)")
        print(f"{n:22s}" + "".join(f"{c:>24s}" for c in cells))
    print("ms per iteration (schedule phase), medians: " + "; ".join(
        f"{n} {med[n]['iteration_seconds'] * 1e3:.2f} ({med[n]['schedule_seconds_per_iteration'] * 1e3:.2f})"
        for n in configs))
    paired = {k: [g[k] / o[k] for g, o in zip(runs[GUARD], runs[NO_GUARD])] for k, _ in FIGURES}
    print("guard / no guard, per round: " + "; ".join(f"{label} " + ", ".join(f"{x:.2f}" for x in paired[k])
                                                        for k, label in FIGURES))
    out = dict(rate=rate, starvation_threshold=threshold, replaced=replaced, runs=runs, medians=med)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
