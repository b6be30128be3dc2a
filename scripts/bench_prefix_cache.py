"""Prefix caching on and off, side by side in one run, where it helps and where it cannot.

`--enable-prefix-caching` lets a request start past KV blocks of the same prefix already on
the device (fastserve_jax/prefix_cache.py). This script measures what that buys and what it
costs, on the bundled demo model in process (no HTTP), engines fully warmed up before timing:

- shared: every prompt starts with the same few-shot block (counting examples, --prefix-tokens
  long), then its own question; output lengths chat-like (workload.chat_output_lengths);
- shared, short answers: the same block in front of questions answered in 2-9 tokens (scoring,
  classification), where the prefill is nearly all of the work;
- shared, tight KV: the same (chat-like answers) with a device pool of half what max-num-seqs of these requests
  hold (and at least the longest one's), once with recomputation (where a dropped request may
  find its own blocks again) and once with proactive swapping to a host pool four times as
  large (where cached blocks compete with paused requests for the device);
- shared, very tight KV: the same with a pool of 0.15 of that (and at least the longest request's),
  which the shared block's blocks and a few requests fill, proactive and recompute: with caching
  the tight pool above swaps nothing (the block is held once), this one does, and a swapped request
  comes back sharing the blocks of the block the device still holds (prefix_cache.py, `_restore`);
- unshared: the plain counting prompts, which share no full block: caching's cost alone, with
  ample device KV and with a tight pool (sized as above for these requests), proactive, and
  recompute, where a dropped request may find its own blocks again (its prompt and answer so far);
- per cell, an engine without and one with caching, built once, then --rounds interleaved
  runs (off, on, off, on, ...) on the same burst; medians and each round's ratio; each run
  starts with an empty cache (the first requests of the burst compute the shared block);
- the tokens with caching must equal those without in every run (greedy decoding), else the
  script stops. (The demo model counts right only from a bare prompt: behind the few-shot block
  it answers something else, the same with caching and without, so the shared cells check the
  engine's equality, not the model's answer; scripts/soak_server.py checks exact answers of
  requests that share their first blocks.)
- with several --scheduler (default skip-join-mlfq and fcfs), each cell runs every scheduler,
  caching off and on (its engines interleaved the same way), and the report adds skip-join over
  fcfs with caching on: requests/s and mean latency per output token (JCT over output tokens,
  the paper's metric), per round. A policy's gain that caching erased would show there.

Per cell it prints requests/s, output tokens/s, mean time to first token, mean JCT, mean
latency per output token, the prompt tokens each request's first prefill computed (its prompt
less RequestOutput.num_cached_tokens) and the cache's hit rate (tokens found / tokens looked
up, recomputations' lookups included), with each engine's recomputations, blocks swapped out and
in (copied back), and blocks that swap-ins found on the device instead of copying, over all its
runs (the untimed first pass included).

    python scripts/bench_prefix_cache.py                    # ~4 min on a 2-core CPU
    python scripts/bench_prefix_cache.py --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import gc
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
from fastserve_jax.workload import chat_output_lengths  # noqa: E402

BLOCK = 16


def few_shot(tok, tokens: int, seed: int) -> str:
    """Counting examples with their answers, about `tokens` tokens in all."""
    rng = np.random.default_rng(seed + 1)
    text = ""
    while len(tok.encode(text)) < tokens:
        a = int(rng.integers(1, 40))
        b = a + int(rng.integers(3, 12))
        text += f"{demo_task.make_prompt(a, b)} {' '.join(map(str, range(a, b + 1)))}\n"
    return text


def run_once(llm: LLM, prompts: list[str], params: list[SamplingParams]) -> dict:
    e = llm.engine
    llm.reset_prefix_cache()  # every run starts cold: the burst's first requests compute the shared block
    q0, h0 = e.kv.queries, e.kv.hits
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    queries, hits = e.kv.queries - q0, e.kv.hits - h0
    return dict(requests_per_s=len(outs) / wall, tokens_per_s=sum(len(o.token_ids) for o in outs) / wall,
                mean_ttft_s=statistics.fmean(o.metrics.ttft for o in outs),
                mean_jct_s=statistics.fmean(o.metrics.finish_time - o.metrics.arrival_time for o in outs),
                latency_per_token_s=statistics.fmean((o.metrics.finish_time - o.metrics.arrival_time) / len(o.token_ids)
                                                     for o in outs),
                prefilled_per_request=statistics.fmean(len(o.prompt_token_ids) - o.num_cached_tokens for o in outs),
                hit_rate=hits / queries if queries else 0.0, recomputations=e.stats.recomputations,
                token_ids=[o.token_ids for o in outs])


KEYS = ("requests_per_s", "tokens_per_s", "mean_ttft_s", "mean_jct_s", "latency_per_token_s", "prefilled_per_request",
        "hit_rate")


def cell(name: str, kw: dict, prompts: list[str], params: list[SamplingParams], rounds: int,
         schedulers: list[str]) -> dict:
    configs = [(p, c) for p in schedulers for c in (False, True)]
    engines = {k: LLM(None, warmup="full", scheduler=k[0], enable_prefix_caching=k[1], **kw) for k in configs}
    for llm in engines.values():                     # one untimed pass: caches, allocator, profile
        run_once(llm, prompts[:8], params[:8])
    runs: dict[tuple, list[dict]] = {k: [] for k in configs}
    for _ in range(rounds):
        for k in configs:
            runs[k].append(run_once(engines[k], prompts, params))
    first = runs[configs[0]][0]["token_ids"]
    if any(r["token_ids"] != first for rs in runs.values() for r in rs):
        raise SystemExit(f"{name}: the tokens differ between runs (caching on and off, or between schedulers)")
    out = dict(name=name, requests=len(prompts), schedulers={})
    for p in schedulers:
        off, on = runs[(p, False)], runs[(p, True)]
        out["schedulers"][p] = dict(
            off={k: statistics.median(r[k] for r in off) for k in KEYS},
            on={k: statistics.median(r[k] for r in on) for k in KEYS},
            throughput_ratios=[b["requests_per_s"] / a["requests_per_s"] for a, b in zip(off, on)],
            ttft_ratios=[a["mean_ttft_s"] / b["mean_ttft_s"] for a, b in zip(off, on)],
            recomputations={m: engines[(p, c)].engine.stats.recomputations for c, m in ((False, "off"), (True, "on"))},
            swapped_blocks={m: engines[(p, c)].engine.stats.swap_out_blocks for c, m in ((False, "off"), (True, "on"))},
            uploaded_blocks={m: engines[(p, c)].engine.stats.swap_in_blocks for c, m in ((False, "off"), (True, "on"))},
            shared_on_return=engines[(p, True)].engine.kv.swap_in_shared)
    if "fcfs" in schedulers and "skip-join-mlfq" in schedulers:
        out["skip_join_over_fcfs"] = {m: dict(
            throughput=[s["requests_per_s"] / f["requests_per_s"] for f, s in zip(runs[("fcfs", c)],
                                                                                   runs[("skip-join-mlfq", c)])],
            latency_per_token=[f["latency_per_token_s"] / s["latency_per_token_s"]
                               for f, s in zip(runs[("fcfs", c)], runs[("skip-join-mlfq", c)])])
            for c, m in ((False, "off"), (True, "on"))}
    engines.clear()                                  # the next cell's engines need the memory (4 GiB pools)
    gc.collect()
    report(out)
    return out


def report(c: dict) -> None:
    print(f"\n{c['name']} ({c['requests']} requests)")
    print(f"  {'':22} {'req/s':>7} {'tok/s':>7} {'TTFT s':>7} {'JCT s':>7} {'ms/token':>8} {'prefilled/req':>14} "
          f"{'hit rate':>9} {'recomputed':>10} {'swapped out':>11} {'in':>6} {'shared back':>11}")
    for p, r in c["schedulers"].items():
        for label in ("off", "on"):
            m = r[label]
            print(f"  {p + ' ' + label:22} {m['requests_per_s']:7.2f} {m['tokens_per_s']:7.0f} {m['mean_ttft_s']:7.3f} "
                  f"{m['mean_jct_s']:7.3f} {m['latency_per_token_s'] * 1e3:8.2f} {m['prefilled_per_request']:14.1f} "
                  f"{m['hit_rate']:9.3f} {r['recomputations'][label]:10} {r['swapped_blocks'][label]:11} "
                  f"{r['uploaded_blocks'][label]:6} {r['shared_on_return'] if label == 'on' else 0:11}")
        print("  {}: on / off throughput median {:.3f}x (rounds {}); TTFT off / on median {:.3f}x (rounds {})".format(
            p, statistics.median(r["throughput_ratios"]), ", ".join(f"{x:.3f}" for x in r["throughput_ratios"]),
            statistics.median(r["ttft_ratios"]), ", ".join(f"{x:.3f}" for x in r["ttft_ratios"])))
    for m, r in c.get("skip_join_over_fcfs", {}).items():
        print("  caching {}: skip-join / fcfs throughput median {:.3f}x (rounds {}); latency per token fcfs / skip-join "
              "median {:.3f}x (rounds {})".format(
                  m, statistics.median(r["throughput"]), ", ".join(f"{x:.3f}" for x in r["throughput"]),
                  statistics.median(r["latency_per_token"]), ", ".join(f"{x:.3f}" for x in r["latency_per_token"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=384, help="the shared few-shot block's length")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scheduler", action="append", default=None,
                    help="repeatable (default: skip-join-mlfq and fcfs); each runs caching off and on")
    ap.add_argument("--json", default=None, help="also write every figure here")
    a = ap.parse_args()
    a.scheduler = a.scheduler or ["skip-join-mlfq", "fcfs"]
    tok = load_tokenizer(demo_model_path())
    rng = np.random.default_rng(a.seed)
    pairs = [demo_task.pair_for_output_len(int(k), rng) for k in chat_output_lengths(a.num_requests, seed=a.seed)]
    params = [SamplingParams(max_tokens=demo_task.answer_num_tokens(x, y), temperature=0) for x, y in pairs]
    questions = [demo_task.make_prompt(x, y) for x, y in pairs]
    shot = few_shot(tok, a.prefix_tokens, a.seed)
    shared = [shot + q for q in questions]
    lens = [len(tok.encode(p)) + sp.max_tokens for p, sp in zip(shared, params)]
    per = [-(-n // BLOCK) for n in lens]
    pool = max(max(per) + 1, int(0.5 * statistics.fmean(per) * a.max_num_seqs))
    vpool = max(max(per) + 1, int(0.15 * statistics.fmean(per) * a.max_num_seqs))
    uper = [-(-(len(tok.encode(q)) + sp.max_tokens) // BLOCK) for q, sp in zip(questions, params)]
    upool = max(max(uper) + 1, int(0.5 * statistics.fmean(uper) * a.max_num_seqs))
    base = dict(max_model_len=1024, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=512, block_size=BLOCK)
    print(f"demo model, in process, {' and '.join(a.scheduler)}, {a.rounds} interleaved rounds per cell; shared block "
          f"{len(tok.encode(shot))} tokens, prompts {min(len(tok.encode(p)) for p in shared)}-"
          f"{max(len(tok.encode(p)) for p in shared)} tokens; tight pool {pool} device blocks of {BLOCK} tokens "
          f"({a.max_num_seqs} requests of the burst's mean length hold {statistics.fmean(per) * a.max_num_seqs:.0f}); "
          f"very tight: {vpool}; unshared: {upool}")
    tight, vtight = dict(base, num_device_blocks=pool + 1), dict(base, num_device_blocks=vpool + 1)
    short_pairs = [demo_task.pair_for_output_len(int(k), rng) for k in rng.integers(2, 10, a.num_requests)]
    short = ([shot + demo_task.make_prompt(x, y) for x, y in short_pairs],
             [SamplingParams(max_tokens=demo_task.answer_num_tokens(x, y), temperature=0) for x, y in short_pairs])
    cells = [cell("shared prefix, ample device KV", base, shared, params, a.rounds, a.scheduler),
             cell("shared prefix, short answers (2-9 tokens: scoring, classification), ample device KV", base,
                  *short, a.rounds, a.scheduler),
             cell("shared prefix, tight device KV, recompute", dict(tight, swap_policy="recompute", num_host_blocks=0),
                  shared, params, a.rounds, a.scheduler),
             cell("shared prefix, tight device KV, proactive swapping",
                  dict(tight, swap_policy="proactive", num_host_blocks=4 * pool), shared, params, a.rounds, a.scheduler),
             cell("shared prefix, very tight device KV, proactive swapping",
                  dict(vtight, swap_policy="proactive", num_host_blocks=4 * pool), shared, params, a.rounds, a.scheduler),
             cell("shared prefix, very tight device KV, recompute",
                  dict(vtight, swap_policy="recompute", num_host_blocks=0), shared, params, a.rounds, a.scheduler),
             cell("unshared prompts (no full block in common), ample device KV", base, questions, params, a.rounds, a.scheduler),
             cell("unshared prompts, tight device KV, proactive swapping",
                  dict(base, num_device_blocks=upool + 1, num_host_blocks=4 * upool), questions, params, a.rounds, a.scheduler),
             cell("unshared prompts, tight device KV, recompute",
                  dict(base, num_device_blocks=upool + 1, swap_policy="recompute", num_host_blocks=0), questions,
                  params, a.rounds, a.scheduler)]
    if a.json:                                       # the medians hold no token ids
        with open(a.json, "w") as f:
            json.dump(dict(machine=os.uname().nodename, settings=vars(a), cells=cells), f, indent=1)


if __name__ == "__main__":
    main()
