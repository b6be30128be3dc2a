"""Async scheduling against the synchronous engine loop, side by side in one run.

With `async_scheduling` the engine plans, assembles and dispatches iteration N+1 while the
device runs iteration N (the next decode launch reads N's sampled tokens on the device), then
reads N's tokens while N+1 runs. This script measures what that buys on this machine, where
it is hardest to hide host time and where memory is tight:

- the bundled demo model, in process (no HTTP), engines fully warmed up before timing;
- cells: fcfs and skip-join-mlfq, each with ample device KV and with a tight device pool (half
  of what max-num-seqs requests of the burst's mean length hold, and at least its longest
  request's; proactive swapping to a host pool four times as large), plus one request alone
  (batch 1, where host time is the largest share);
- the burst: --num-requests counting prompts at once, output lengths chat-like
  (workload.chat_output_lengths: 2..257 tokens, skewed short with a long tail);
- sync and async engines of each cell built once, then --rounds interleaved runs (sync, async,
  sync, async, ...) on the same burst; medians and each round's ratio;
- async's token ids must equal sync's in every run; answers the demo model itself gets wrong
  (a few of its long counts) are counted and printed, not hidden.

Per cell it prints output tokens/s, wall ms per iteration, iterations, mean JCT and the
engine's split of an iteration (schedule, assemble, device, postprocess, ms per iteration;
under async the device phase is mostly waiting for the batch dispatched one iteration before).

    python scripts/bench_async.py                      # ~3 min on a 2-core CPU
    python scripts/bench_async.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fastserve_jax import LLM, SamplingParams  # noqa: E402
from fastserve_jax.models import demo_model_path, demo_task  # noqa: E402
from fastserve_jax.models.tokenizer import load_tokenizer  # noqa: E402
from fastserve_jax.stats import PHASES  # noqa: E402
from fastserve_jax.workload import TraceRequest, chat_output_lengths, kv_blocks  # noqa: E402

BLOCK = 16


def burst(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return [demo_task.pair_for_output_len(int(k), rng) for k in chat_output_lengths(n, seed=seed)]


def run_once(llm: LLM, pairs: list[tuple[int, int]]) -> dict:
    e = llm.engine
    st = e.stats
    before = {k: getattr(st, k) for k in (*PHASES, "iterations")}
    params = [SamplingParams(max_tokens=demo_task.answer_num_tokens(a, b), temperature=0) for a, b in pairs]
    t0 = time.perf_counter()
    outs = llm.generate([demo_task.make_prompt(a, b) for a, b in pairs], params)
    wall = time.perf_counter() - t0
    wrong = sum(not demo_task.check_answer(a, b, o.text) for (a, b), o in zip(pairs, outs))
    its = st.iterations - before["iterations"]
    tokens = sum(len(o.token_ids) for o in outs)
    return dict(wrong=wrong, tokens_per_s=tokens / wall, wall_s=wall, iterations=its, ms_per_iteration=wall / its * 1e3,
                mean_jct_s=statistics.fmean(o.metrics.finish_time - o.metrics.arrival_time for o in outs),
                phases_ms={k: (getattr(st, k) - before[k]) / its * 1e3 for k in PHASES},
                token_ids=[o.token_ids for o in outs])


def cell(name: str, kw: dict, pairs: list[tuple[int, int]], rounds: int) -> dict:
    engines = {a: LLM(None, warmup="full", async_scheduling=a, **kw) for a in (False, True)}
    for llm in engines.values():                     # one untimed pass: caches, allocator, profile
        run_once(llm, pairs[:8])
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(rounds):
        for a in (False, True):
            runs[a].append(run_once(engines[a], pairs))
    if any(r["token_ids"] != runs[False][0]["token_ids"] for r in runs[True]):
        raise SystemExit(f"{name}: async scheduling's tokens differ from the synchronous engine's")
    med = {a: {k: statistics.median(r[k] for r in rs) for k in ("tokens_per_s", "ms_per_iteration", "iterations",
                                                                  "mean_jct_s")} for a, rs in runs.items()}
    for a, rs in runs.items():
        med[a]["phases_ms"] = {k: statistics.median(r["phases_ms"][k] for r in rs) for k in PHASES}
    ratios = [b["tokens_per_s"] / s["tokens_per_s"] for s, b in zip(runs[False], runs[True])]
    out = dict(name=name, requests=len(pairs), wrong_answers=runs[True][0]["wrong"], sync=med[False], asynchronous=med[True],
               tokens_per_s_ratios=ratios, median_ratio=statistics.median(ratios),
               swapped_blocks={m: engines[a].engine.stats.swap_out_blocks for a, m in ((False, "sync"), (True, "async"))})
    report(out)
    return out


def report(c: dict) -> None:
    print(f"\n{c['name']} ({c['requests']} requests, {c['wrong_answers']} answered wrong by the demo model in "
          f"both modes; blocks swapped out in all: sync {c['swapped_blocks']['sync']}, async {c['swapped_blocks']['async']})")
    print(f"  {'':6} {'tok/s':>8} {'ms/iter':>8} {'iters':>6} {'JCT s':>7}   "
          + " ".join(f"{k:>11}" for k in PHASES) + "  (ms per iteration)")
    for label, m in (("sync", c["sync"]), ("async", c["asynchronous"])):
        print(f"  {label:6} {m['tokens_per_s']:8.0f} {m['ms_per_iteration']:8.3f} {m['iterations']:6.0f} "
              f"{m['mean_jct_s']:7.3f}   " + " ".join(f"{m['phases_ms'][k]:11.3f}" for k in PHASES))
    print(f"  async / sync tokens/s: median {c['median_ratio']:.3f}x, rounds "
          + ", ".join(f"{r:.3f}" for r in c["tokens_per_s_ratios"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write every figure here")
    a = ap.parse_args()
    pairs = burst(a.num_requests, a.seed)
    tok = load_tokenizer(demo_model_path())
    reqs = [TraceRequest(0.0, len(tok.encode(demo_task.make_prompt(x, y))), demo_task.answer_num_tokens(x, y))
            for x, y in pairs]
    per = kv_blocks(reqs, BLOCK)
    pool = max(max(per) + 1, int(0.5 * statistics.fmean(per) * a.max_num_seqs))
    base = dict(max_model_len=512, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=512, block_size=BLOCK)
    print(f"demo model, in process, {a.rounds} interleaved rounds per cell; tight pool: {pool} device blocks "
          f"of {BLOCK} tokens ({a.max_num_seqs} requests of the burst's mean length hold {statistics.fmean(per) * a.max_num_seqs:.0f})")
    cells = [cell("batch 1: one request of 257 tokens, fcfs", dict(base, scheduler="fcfs"),
                  [demo_task.pair_for_output_len(257, np.random.default_rng(a.seed))], a.rounds)]
    for sched in ("fcfs", "skip-join-mlfq"):
        cells.append(cell(f"{sched}, ample device KV", dict(base, scheduler=sched), pairs, a.rounds))
        cells.append(cell(f"{sched}, tight device KV, proactive swapping",
                          dict(base, scheduler=sched, num_device_blocks=pool + 1, num_host_blocks=4 * pool,
                               swap_policy="proactive"), pairs, a.rounds))
    if a.json:
        for c in cells:
            for m in (c["sync"], c["asynchronous"]):
                m.pop("token_ids", None)
        with open(a.json, "w") as f:
            json.dump(dict(machine=os.uname().nodename, cells=cells), f, indent=1)


if __name__ == "__main__":
    main()
