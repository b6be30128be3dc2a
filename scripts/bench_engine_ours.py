"""fastserve-jax's side of scripts/bench_engine.py: the engine built as the benchmark sizes it,
the trace run through the engine loop (each iteration timed, with the launches it ran), and
the decode step at a fixed batch, each step paired with a matmul timed right after it."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np

from bench_engine_machine import best_of
from bench_engine_workload import VOCAB_LO, Workload

MAX_NUM_SEQS = 32
BLOCK_SIZE = 16


def compile_cache_entries(path: str | None) -> int:
    return len(os.listdir(path)) if path and os.path.isdir(path) else 0


def launch_name(key) -> str:
    """A launch key (runner/keys.py) as report text: 'decode 32 rows x 8 blocks'."""
    if key.kind == "decode":
        return f"decode {key.rows} rows x {key.blocks} blocks"
    return f"prefill {key.tokens} tokens x {key.blocks} blocks"


def launch_counts(launches: dict) -> list[list]:
    """EngineStats.launches as JSON-ready [kind, size, blocks, count] rows (launch_key_to_wire)."""
    from fastserve_jax.runner.keys import launch_key_to_wire

    return sorted([*launch_key_to_wire(k), n] for k, n in launches.items())


def make_llm(path: str, wl_max_len: int, max_batched_tokens: int, cache_dir: str | None, scheduler: str,
             async_scheduling: bool | None = None):
    """The engine as the benchmark runs it: 32 sequences, blocks for 32 of the longest; returns
    (llm, seconds to construct it, compiled launch and sampler executables)."""
    from fastserve_jax import LLM

    blocks_per_seq = -(-wl_max_len // BLOCK_SIZE)
    t0 = time.perf_counter()
    llm = LLM(path, max_model_len=wl_max_len, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=max_batched_tokens,
              block_size=BLOCK_SIZE, num_device_blocks=MAX_NUM_SEQS * blocks_per_seq + 1,
              compilation_cache_dir=cache_dir, scheduler=scheduler, warmup="full", async_scheduling=async_scheduling)
    construct = time.perf_counter() - t0
    runner = llm.engine.runner
    n_compiled = len(runner.samplers) + sum(len(st.compiled) for st in runner.stages)
    return llm, construct, n_compiled


def run_ours(llm, wl: Workload, scheduler: str) -> tuple[dict, list[list[int]]]:
    """The workload through the engine loop (as LLM.generate drives it) twice: the first pass
    after the engine's start, then the timed one, every `step()` timed with the launches it
    ran. XLA:CPU sets up a launch's YNNPACK dots on its first execution (about 1.7 ms per dot,
    0.1-0.15 s per launch of a 12-layer model; docs/performance.md section 6), so the first
    pass is slower; its wall time is kept as `first_pass_wall_s`. Returns the figures and each
    request's tokens (the two passes' must agree)."""
    from fastserve_jax import SamplingParams
    from fastserve_jax.engine import EngineStats
    from fastserve_jax.runner.keys import launch_key_to_wire

    eng = llm.engine
    eng.set_scheduler(scheduler)
    warm = [wl.prompts[0][:8], wl.prompts[1][:8]]
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert not eng.has_unfinished(), "run the trace on an idle engine"
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in wl.out_lens]

    def serve():
        eng.stats = eng.copies.stats = EngineStats()     # the swap copies count into the same object
        log: list[tuple[tuple, float]] = []     # which launches each iteration ran, and its wall time
        t0 = time.perf_counter()
        reqs = [eng.add_request(p, sp) for p, sp in zip(wl.prompts, params)]
        while eng.has_unfinished():
            before = dict(eng.stats.launches)
            t = time.perf_counter()
            eng.step()
            dt = time.perf_counter() - t
            ran = [k for k, v in eng.stats.launches.items() if v != before.get(k, 0)]
            log.append((tuple(sorted(ran, key=launch_key_to_wire)), dt))
        outs = [eng.output_of(r) for r in reqs]
        return time.perf_counter() - t0, outs, log

    first_wall, first_outs, _ = serve()
    wall, outs, step_log = serve()
    assert [list(o.token_ids) for o in outs] == [list(o.token_ids) for o in first_outs], "the two passes differ"
    st = eng.stats
    tokens = [list(o.token_ids) for o in outs]
    n_out = sum(len(t) for t in tokens)
    assert n_out == wl.num_output_tokens, f"generated {n_out} tokens, wanted {wl.num_output_tokens}"
    it = st.iterations
    single: dict = {}
    for keys, dt in step_log:
        if len(keys) == 1:
            single.setdefault(keys[0], []).append(dt)
    decode_only = sum(dt for keys, dt in step_log if keys and all(k.kind == "decode" for k in keys))
    with_prefill = sum(dt for keys, dt in step_log if any(k.kind == "prefill" for k in keys))
    return dict(scheduler=scheduler, wall_s=wall, first_pass_wall_s=first_wall, output_tokens=n_out,
                decode_only_steps_s=decode_only, steps_with_prefill_s=with_prefill,
                single_launch_step_ms={launch_name(k): dict(n=len(v), median=1e3 * statistics.median(v))
                                       for k, v in sorted(single.items(), key=lambda kv: launch_key_to_wire(kv[0]))},
                tokens_per_s=n_out / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall, iterations=it,
                schedule_s=st.schedule, assemble_s=st.assemble, device_s=st.device, postprocess_s=st.postprocess,
                host_s=st.host, host_ms_per_iter=1e3 * st.host / it, device_ms_per_iter=1e3 * st.device / it,
                host_frac_of_step=st.host / (st.host + st.device),
                launches={launch_name(k): st.launches[k] for k in sorted(st.launches, key=launch_key_to_wire)},
                launch_counts=launch_counts(st.launches),
                ttft_p50_s=statistics.median(o.metrics.ttft for o in outs),
                latency_p50_s=statistics.median(o.metrics.latency for o in outs)), tokens


def measure_decode_step(llm, batch: int, prompt_len: int, new_tokens: int, seed: int, probe_size: int = 1024) -> dict:
    """`batch` requests with short prompts; once all are decoding, time each `engine.step()`
    (of an engine without async scheduling: a step is then the whole launch, dispatch to tokens).

    Each step is paired with a square matmul timed right after it (best of 2), so every
    step has the machine's matmul rate of that moment beside it (the machine is shared)."""
    import jax
    import jax.numpy as jnp

    from fastserve_jax import SamplingParams
    from fastserve_jax.engine import EngineStats

    dot = jax.jit(jnp.dot)
    a = jax.random.normal(jax.random.key(0), (probe_size, probe_size), jnp.float32)
    dot(a, a).block_until_ready()
    probe_flops = 2 * probe_size ** 3

    eng = llm.engine
    vocab = eng.model_cfg.vocab_size
    rng = np.random.default_rng(seed + 1)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    reqs = [eng.add_request(rng.integers(VOCAB_LO, vocab, size=prompt_len).tolist(), sp) for _ in range(batch)]
    while any(r.is_prefilling for r in reqs):
        eng.step()
    eng.stats = eng.copies.stats = EngineStats()
    steps, ctx, rates = [], [], []
    while any(not r.finished for r in reqs):
        ctx.append(statistics.mean(r.num_tokens for r in reqs))
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
        rates.append(probe_flops / best_of(lambda: dot(a, a).block_until_ready(), 2) / 1e9)
    st = eng.stats
    decode_keys = [k for k in st.launches if k.kind == "decode"]
    assert all(k.rows == batch for k in decode_keys) and len(decode_keys) == len(st.launches), st.launches
    it = st.iterations
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, steps=len(steps),
                max_blocks=max(k.blocks for k in decode_keys),
                step_ms_median=1e3 * statistics.median(steps), step_ms_best=1e3 * min(steps),
                step_ms_mean=1e3 * statistics.mean(steps),
                mean_context=statistics.mean(ctx), step_s=steps, paired_matmul_gflops=rates,
                host_ms_per_iter=1e3 * st.host / it,
                schedule_ms=1e3 * st.schedule / it, assemble_ms=1e3 * st.assemble / it,
                postprocess_ms=1e3 * st.postprocess / it, device_ms_per_iter=1e3 * st.device / it,
                host_frac_of_step=st.host / (st.host + st.device),
                launches={launch_name(k): v for k, v in st.launches.items()})

