"""Throughput, roofline and host-overhead benchmark of fastserve-jax against transformers.

One run, one machine, side by side:

1. a random-weight Llama of ~125M parameters (`models.random_checkpoint` preset
   "llama-125m": hidden 768, 12 layers, 12 query / 4 KV heads, vocab 32000), cached
   under --work-dir;
2. N requests (default 64) drawn (seeded) from ../shared/traces/azure_conv_2023.csv, with
   prompt and output lengths divided by --scale and clipped (printed), random prompt ids,
   greedy, fixed output lengths (ignore_eos);
3. tokens/s of fastserve-jax (the engine loop `LLM.generate` runs), of transformers continuous batching (the
   manager `generate_batch` wraps, with per-request max_new_tokens) and of plain
   `model.generate` in static batches of 32 (left padding); and the floor our run's launches
   cannot go below with XLA's matmuls: each launch shape's matmuls alone, times its count;
4. the decode roofline of this machine (weight + KV bytes over measured memory bandwidth,
   FLOPs over measured matmul rate) against our measured decode step at batch 32 (each step
   also paired with a matmul timed right after it, since the machine may be shared), with a
   breakdown of where the step goes (forward alone, its matmuls alone, the sampler);
5. host overhead per iteration (schedule + assemble + postprocess) against the step;
6. greedy agreement: our tokens against all three transformers runs.

torch gets its best thread count (probed, see --torch-threads): on a 2-core machine shared
with busy processes, 2 torch threads were measured 4-10x slower than 1.

    python scripts/bench_engine.py                  # full run: ~5 min, +2-3 min on a cold compile cache
    python scripts/bench_engine.py --quick          # 16 requests, shorter lengths (~2.5 min)
    python scripts/bench_engine.py --json out.json  # also write every figure

Modules beside it, one per role: bench_engine_workload.py (trace -> requests, checkpoint,
agreement), bench_engine_machine.py (bandwidth, matmul rates, roofline), bench_engine_ours.py
(our engine: the trace run, the decode step), bench_engine_profile.py (the decode step taken
apart, the matmul floor), bench_engine_hf.py (transformers), bench_engine_report.py (the
printed report). This file parses the options and runs the steps in order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# One module per role, next to this script (scripts/ is on sys.path when it runs).
from bench_engine_hf import run_transformers  # noqa: E402
from bench_engine_machine import decode_roofline, machine_rates, workload_flops  # noqa: E402
from bench_engine_ours import (BLOCK_SIZE, MAX_NUM_SEQS, compile_cache_entries, make_llm,  # noqa: E402
                               measure_decode_step, run_ours)
from bench_engine_profile import matmul_floor, profile_decode_parts  # noqa: E402
from bench_engine_report import print_report  # noqa: E402
from bench_engine_workload import (ARCH, DEFAULT_TRACE, agreement, ensure_checkpoint, fmt_stats,  # noqa: E402
                                   length_stats, load_workload)

DECODE_BATCH, DECODE_PROMPT = 32, 16     # the decode-step measurement: 32 requests, 16-token prompts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/fastserve-bench", help="caches the random checkpoint")
    ap.add_argument("--trace", default=DEFAULT_TRACE)
    ap.add_argument("--quick", action="store_true", help="16 requests, lengths /16, shorter decode measurement")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--scale", type=float, default=None, help="divide trace lengths by this (default 8; quick 16)")
    ap.add_argument("--max-prompt", type=int, default=None, help="clip scaled prompts (default 256; quick 128)")
    ap.add_argument("--max-output", type=int, default=None, help="clip scaled outputs (default 64; quick 32)")
    ap.add_argument("--min-len", type=int, default=8, help="lower clip of prompts and outputs")
    ap.add_argument("--max-batched-tokens", type=int, default=512, help="per-iteration token budget (both engines)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="tokens per request in the batch-32 decode "
                    "measurement (default 48; quick 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-compile-cache", action="store_true", help="disable JAX's persistent compilation cache")
    ap.add_argument("--second-start", action="store_true",
                    help="construct a second LLM afterwards to time a start from the persistent compilation cache")
    ap.add_argument("--schedulers", default="skip-join-mlfq,fcfs",
                    help="our policies to run the trace with, comma-separated; the first is the headline "
                         "(default: the engine's default, then fcfs, like transformers' FIFO)")
    ap.add_argument("--torch-threads", default="auto", help="torch threads for the baselines: a number, or auto "
                    "(probe 1 .. cores and keep the fastest)")
    ap.add_argument("--skip-hf", action="store_true", help="only fastserve-jax and the roofline")
    ap.add_argument("--json", default=None, help="write every figure here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    q = args.quick
    n_req = args.num_requests or (16 if q else 64)
    scale = args.scale or (16.0 if q else 8.0)
    max_prompt = args.max_prompt or (128 if q else 256)
    max_out = args.max_output or (32 if q else 64)
    dec_tokens = args.decode_tokens or (16 if q else 48)

    t_start = time.perf_counter()
    import jax

    from fastserve_jax.models.config import ModelConfig
    from fastserve_jax.runner.persistent_cache import enable_compilation_cache

    path = ensure_checkpoint(args.work_dir)
    model_cfg = ModelConfig.from_pretrained(path)
    wl = load_workload(args.trace, n_req, scale, (args.min_len, max_prompt), (args.min_len, max_out),
                       model_cfg.vocab_size, args.seed)
    max_len = max_prompt + max_out
    cache_dir = "off" if args.no_compile_cache else enable_compilation_cache(None)
    cache_before = compile_cache_entries(None if args.no_compile_cache else cache_dir)

    print("== fastserve-jax benchmark", time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on "
          f"{jax.devices()[0].platform}; load average {os.getloadavg()[0]:.1f} at start")
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(unset)'}")
    print(f"model: {ARCH} random weights, float32 ({path})")
    print(f"workload: {wl.how}")
    print(f"  trace prompt lens : {fmt_stats(length_stats(wl.raw_prompt_lens))}")
    print(f"  trace output lens : {fmt_stats(length_stats(wl.raw_out_lens))}")
    print(f"  scaled prompt lens: {fmt_stats(length_stats([len(p) for p in wl.prompts]))}")
    print(f"  scaled output lens: {fmt_stats(length_stats(wl.out_lens))}")
    print(flush=True)
    report: dict = dict(args=vars(args), workload=dict(
        how=wl.how, num_requests=n_req, scale=scale, prompt_clip=[args.min_len, max_prompt],
        output_clip=[args.min_len, max_out], trace_rows=wl.trace_rows, prompt_lens=[len(p) for p in wl.prompts],
        output_lens=wl.out_lens, prompt_stats=length_stats([len(p) for p in wl.prompts]),
        output_stats=length_stats(wl.out_lens)))

    # fastserve-jax: start (compiles every bucket), the trace, then the batch-32 decode steps.
    print("[1/5] fastserve-jax: start + warm-up compile ...", flush=True)
    policies = [p.strip() for p in args.schedulers.split(",") if p.strip()]
    llm, construct_s, n_compiled = make_llm(path, max_len, args.max_batched_tokens, cache_dir, policies[0])
    cache_after = compile_cache_entries(None if args.no_compile_cache else cache_dir)
    start = dict(construct_s=construct_s, scheduler=policies[0], warmup_compile_s=llm.engine.warmup_seconds,
                 first_runs_s=llm.engine.runner.first_run_seconds, executables=n_compiled,
                 compile_cache="off" if args.no_compile_cache else cache_dir,
                 cache_entries_before=cache_before, cache_entries_after=cache_after,
                 config=dict(max_model_len=max_len, max_num_seqs=MAX_NUM_SEQS,
                             max_num_batched_tokens=args.max_batched_tokens,
                             block_size=BLOCK_SIZE, num_device_blocks=llm.engine.kv.num_blocks,
                             decode_batch_buckets=llm.engine.cfg.decode_batch_buckets,
                             prefill_token_buckets=llm.engine.cfg.prefill_token_buckets,
                             block_buckets=llm.engine.cfg.block_buckets))
    print(f"      {construct_s:.1f} s ({n_compiled} executables)", flush=True)
    by_policy, tokens_by_policy = {}, {}
    for policy in policies:
        print(f"      running {n_req} requests, scheduler {policy} ...", flush=True)
        by_policy[policy], tokens_by_policy[policy] = run_ours(llm, wl, policy)
        print(f"      {by_policy[policy]['wall_s']:.1f} s, {by_policy[policy]['tokens_per_s']:.1f} tok/s (the pass "
              f"before: {by_policy[policy]['first_pass_wall_s']:.1f} s)", flush=True)
    ours, our_tokens = by_policy[policies[0]], tokens_by_policy[policies[0]]

    # the same engine with the synchronous loop: its trace run beside the default's, and the
    # decode step timed as one launch from dispatch to tokens (async overlaps a step with the next)
    sync_llm = make_llm(path, max_len, args.max_batched_tokens, cache_dir, policies[0], async_scheduling=False)[0]
    print(f"      running {n_req} requests, scheduler {policies[0]}, synchronous loop ...", flush=True)
    ours_sync, sync_tokens = run_ours(sync_llm, wl, policies[0])
    print(f"      {ours_sync['wall_s']:.1f} s, {ours_sync['tokens_per_s']:.1f} tok/s (the pass before: "
          f"{ours_sync['first_pass_wall_s']:.1f} s); async scheduling (the default) "
          f"{ours['tokens_per_s'] / ours_sync['tokens_per_s']:.2f}x that", flush=True)

    print("[2/5] roofline: memory bandwidth and matmul rates ...", flush=True)
    rates_before = machine_rates(model_cfg, DECODE_BATCH)
    print(f"[3/5] decode step at batch {DECODE_BATCH} ...", flush=True)
    dec = measure_decode_step(sync_llm, DECODE_BATCH, DECODE_PROMPT, dec_tokens, args.seed)
    parts = profile_decode_parts(sync_llm, DECODE_BATCH, dec["max_blocks"], rounds=5)
    print(f"      matmuls of the {ours['scheduler']} run's launches, alone ...", flush=True)
    floor = matmul_floor(llm, ours["launch_counts"])
    rates_after = machine_rates(model_cfg, DECODE_BATCH)
    params = [st.params for st in llm.engine.runner.stages]
    roofline = decode_roofline(model_cfg, params, dec, rates_before, rates_after)
    wl_flops = workload_flops(model_cfg, roofline["cost"], wl)
    print(f"      step {dec['step_ms_median']:.1f} ms median, roofline {roofline['roofline_ms']:.1f} ms", flush=True)

    if args.second_start:
        print("      second start (persistent compilation cache) ...", flush=True)
        before = compile_cache_entries(None if args.no_compile_cache else cache_dir)
        llm2, s2, _ = make_llm(path, max_len, args.max_batched_tokens, cache_dir, policies[0])
        start["second_construct_s"] = s2
        start["second_warmup_compile_s"] = llm2.engine.warmup_seconds
        start["second_new_cache_entries"] = compile_cache_entries(
            None if args.no_compile_cache else cache_dir) - before
        del llm2

    hf_cb = hf_static = None
    checks: dict = {}
    if not args.skip_hf:
        hf_cb, hf_static, checks = run_transformers(path, wl, our_tokens, args.torch_threads, args.seed,
                                                    args.max_batched_tokens, max_len, DECODE_BATCH, DECODE_PROMPT)

    policy_agreement = {p: agreement(our_tokens, t) for p, t in tokens_by_policy.items() if p != policies[0]}
    policy_agreement[f"{policies[0]}, synchronous loop"] = agreement(our_tokens, sync_tokens)
    for d in (*by_policy.values(), ours_sync, hf_cb, hf_static):
        if d is not None:
            d["model_gflops"] = wl_flops / d["wall_s"] / 1e9
            d["frac_of_peak"] = d["model_gflops"] / roofline["matmul_peak_gflops"]
    report.update(workload_gflop=wl_flops / 1e9, start=start, ours=ours, ours_by_policy=by_policy, ours_sync=ours_sync,
                  policy_agreement=policy_agreement, hf_continuous=hf_cb, hf_static=hf_static,
                  roofline=roofline, decode=dec, decode_parts=parts, matmul_floor=floor, checks=checks,
                  total_s=time.perf_counter() - t_start,
                  load_average_end=os.getloadavg()[0])
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
