"""Does the simulator predict what prefix caching does on the engine? (`fastserve-jax simulate
--enable-prefix-caching --shared-prefix-tokens N`, sim.py, against `--enable-prefix-caching`.)

The demo model in process, --num-requests at once, each prompt a --prefix-tokens few-shot block
(bench_prefix_cache.few_shot) and its own counting question, chat-like answer lengths with
ignore_eos (so that every answer has its planned length: behind the block the demo model does
not count right, and the lengths are what both sides must share). Per policy (skip-join-mlfq,
fcfs) and caching off and on: an engine with an ample device pool, fully warmed up, --rounds
runs from an empty cache (medians), then the simulator on the same requests, the engine's own
limits and its profiled cost model (the skip-join engine's, for both policies), no host pool
(nothing is swapped), the policy's host time charged as it ran (host_time_scale 1), async
scheduling as the engine's. No calibration (scripts/sim_fidelity.py fits a speed, an overhead
and a host scale to a run; here the point is the effect of caching, which the ratios on / off
show with the calibration's errors mostly cancelled).

With --pool-fraction F the device pool is F of what 16 of these requests hold (0.15 is
bench_prefix_cache's very tight cell, which the shared block and a few requests fill), caching is
on, and per policy proactive swapping (host pool four times half of what 16 requests hold) runs
against recomputation: the simulator gets the engine's pools and, for proactive, its copy path
as sim_fidelity.measure_swap times it (latency, bandwidth, host seconds to issue one copy). The
question there is whether the simulator predicts which of the two wins on this machine.

Prints each run's mean JCT, mean latency per output token and mean TTFT, engine and simulator
side by side, then per policy the ratios caching on / off (with --pool-fraction: recompute /
proactive), engine against simulator.

    python scripts/sim_fidelity_prefix.py      # ~40 s on a 2-core CPU with the compile cache warm
    python scripts/sim_fidelity_prefix.py --pool-fraction 0.15
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_prefix_cache import BLOCK, few_shot, run_once  # noqa: E402
from sim_fidelity import async_overlap, measure_swap  # noqa: E402

from fastserve_jax import LLM, SamplingParams  # noqa: E402
from fastserve_jax.kv_sizing import kv_block_bytes  # noqa: E402
from fastserve_jax.models import demo_model_path, demo_task  # noqa: E402
from fastserve_jax.models.tokenizer import load_tokenizer  # noqa: E402
from fastserve_jax.sim import SimConfig, simulate  # noqa: E402
from fastserve_jax.workload import TraceRequest, chat_output_lengths  # noqa: E402

KEYS = ("mean_jct", "mean_latency_per_token", "mean_ttft")                 # the simulator's metrics
ENGINE_KEYS = ("mean_jct_s", "latency_per_token_s", "mean_ttft_s")           # bench_prefix_cache.run_once's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-fraction", type=float, default=0.0,
                    help="0: an ample pool, caching off and on; else a device pool of this fraction of what 16 "
                         "of the requests hold (bench_prefix_cache's very tight cell: 0.15), caching on, proactive "
                         "swapping (host pool 4x the half-pool) against recomputation")
    a = ap.parse_args()
    tok = load_tokenizer(demo_model_path())
    rng = np.random.default_rng(a.seed)
    pairs = [demo_task.pair_for_output_len(int(k), rng) for k in chat_output_lengths(a.num_requests, seed=a.seed)]
    prompts = [few_shot(tok, a.prefix_tokens, a.seed) + demo_task.make_prompt(x, y) for x, y in pairs]
    ids = [tok.encode(p) for p in prompts]
    shared = min(next((j for j, (u, v) in enumerate(zip(ids[0], p)) if u != v), len(p)) for p in ids[1:])
    lens = [demo_task.answer_num_tokens(x, y) for x, y in pairs]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lens]
    trace = [TraceRequest(0.0, len(i), n) for i, n in zip(ids, lens)]
    per = [-(-(len(i) + n) // BLOCK) for i, n in zip(ids, lens)]
    half = max(max(per) + 1, int(0.5 * statistics.fmean(per) * 16))
    if a.pool_fraction:
        pool = max(max(per) + 1, int(a.pool_fraction * statistics.fmean(per) * 16)) + 1
        runs_of = [(p, True, s) for p in ("skip-join-mlfq", "fcfs") for s in ("proactive", "recompute")]
    else:
        pool = 2000
        runs_of = [(p, c, "recompute") for p in ("skip-join-mlfq", "fcfs") for c in (False, True)]
    print(f"demo model, {a.num_requests} requests at once, {shared} prompt tokens shared, {pool - 1} device blocks, "
          f"{a.rounds} engine rounds per run (medians); simulator on the engine's profile (and, swapping, its "
          "measured copies), uncalibrated")
    print(f"  {'':32} {'JCT s':>13} {'ms per token':>15} {'TTFT s':>13}   (engine / simulator)")
    res, profile = {}, None
    for policy, caching, swap in runs_of:
        llm = LLM(None, warmup="full", scheduler=policy, enable_prefix_caching=caching, max_model_len=1024,
                  max_num_seqs=16, max_num_batched_tokens=512, block_size=BLOCK, num_device_blocks=pool,
                  swap_policy=swap, num_host_blocks=4 * half if swap != "recompute" else 0)
        llm.generate(prompts[:8], params[:8])                 # untimed: allocator, profile refined
        runs = [run_once(llm, prompts, params) for _ in range(a.rounds)]     # each from an empty cache
        eng = {k: statistics.median(r[ours] for r in runs) for k, ours in zip(KEYS, ENGINE_KEYS)}
        e, cfg = llm.engine, llm.engine.cfg
        profile = profile or e.cost_model                   # fcfs needs none of its own
        cost = profile
        if swap != "recompute":                             # the engine's own copy path, timed
            latency, bandwidth, issue = measure_swap(e)
            cost = dataclasses.replace(profile, kv_bytes_per_token=kv_block_bytes(e.model_cfg, cfg) // cfg.block_size,
                                       swap_latency=latency, swap_issue_seconds=issue,
                                       swap_bandwidth=min(bandwidth, 1e15))
        sim_cfg = SimConfig(max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                            block_size=cfg.block_size, kv_capacity_tokens=e.kv.num_usable_blocks * cfg.block_size,
                            host_kv_capacity_tokens=e.kv.num_host_blocks * cfg.block_size, swap_policy=swap,
                            host_time_scale=1.0, scheduler_config=e.policy_config(),
                            async_scheduling=bool(cfg.async_scheduling), async_overlap=async_overlap(),
                            enable_prefix_caching=caching, shared_prefix_tokens=shared)
        sim = simulate(trace, policy, cost, sim_cfg).metrics()
        res[(policy, caching, swap)] = eng, sim
        label = f"{policy} {'caching' if caching else 'off'}" + (f" {swap}" if a.pool_fraction else "")
        print(f"  {label:32} {eng['mean_jct']:6.3f}/{sim['mean_jct']:<6.3f} "
              f"{eng['mean_latency_per_token'] * 1e3:7.2f}/{sim['mean_latency_per_token'] * 1e3:<7.2f} "
              f"{eng['mean_ttft']:6.3f}/{sim['mean_ttft']:<6.3f}", flush=True)
        del llm, e
    for policy in ("skip-join-mlfq", "fcfs"):
        if a.pool_fraction:
            what, (e0, s0), (e1, s1) = "recompute / proactive", res[(policy, True, "proactive")], \
                res[(policy, True, "recompute")]
        else:
            what, (e1, s1), (e0, s0) = "caching on / off", res[(policy, True, "recompute")], \
                res[(policy, False, "recompute")]
        print(f"{policy}: {what}, engine vs simulator: " + "; ".join(
            f"{k} {e1[k] / e0[k]:.3f} vs {s1[k] / s0[k]:.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
