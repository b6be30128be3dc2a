"""Throughput, roofline and host-overhead benchmark of fastserve-jax against transformers.

One run, one machine, side by side:

1. a random-weight Llama of ~125M parameters (`models.random_checkpoint` preset
   "llama-125m": hidden 768, 12 layers, 12 query / 4 KV heads, vocab 32000), cached
   under --work-dir;
2. N requests (default 64) drawn (seeded) from ../shared/traces/azure_conv_2023.csv, with
   prompt and output lengths divided by --scale and clipped (printed), random prompt ids,
   greedy, fixed output lengths (ignore_eos);
3. tokens/s of fastserve-jax (`LLM.generate`), of transformers continuous batching (the
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
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_TRACE = os.path.join(REPO, "..", "shared", "traces", "azure_conv_2023.csv")
VOCAB_LO = 3                     # prompt ids are drawn from [VOCAB_LO, vocab): skips pad/bos/eos
ARCH = "llama-125m"


# -- workload -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    out_lens: list[int]
    trace_rows: list[int]
    raw_prompt_lens: list[int]
    raw_out_lens: list[int]
    how: str

    @property
    def num_output_tokens(self) -> int:
        return sum(self.out_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def load_workload(path: str, n: int, scale: float, prompt_clip: tuple[int, int], out_clip: tuple[int, int],
                  vocab: int, seed: int) -> Workload:
    """n trace rows drawn without replacement (seeded), kept in arrival order; lengths scaled."""
    with open(path, newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(rows), size=n, replace=False).tolist())
    raw_p = [rows[i][0] for i in idx]
    raw_d = [rows[i][1] for i in idx]
    p_len = [int(np.clip(round(p / scale), *prompt_clip)) for p in raw_p]
    d_len = [int(np.clip(round(d / scale), *out_clip)) for d in raw_d]
    prompts = [rng.integers(VOCAB_LO, vocab, size=k).tolist() for k in p_len]
    how = (f"{n} of {len(rows)} trace rows (numpy seed {seed}, without replacement, arrival order; all submitted "
           f"at t=0); prompt = clip(round(num_prefill_tokens / {scale:g}), {prompt_clip[0]}, {prompt_clip[1]}), "
           f"output = clip(round(num_decode_tokens / {scale:g}), {out_clip[0]}, {out_clip[1]}); "
           f"prompt ids uniform in [{VOCAB_LO}, {vocab})")
    return Workload(prompts, d_len, idx, raw_p, raw_d, how)


def length_stats(xs: list[int]) -> dict:
    a = np.asarray(xs)
    return dict(sum=int(a.sum()), mean=float(a.mean()), p50=float(np.median(a)), p90=float(np.percentile(a, 90)),
                min=int(a.min()), max=int(a.max()))


def fmt_stats(s: dict) -> str:
    return (f"sum {s['sum']:6d}  mean {s['mean']:6.1f}  p50 {s['p50']:5.0f}  p90 {s['p90']:5.0f}  "
            f"min {s['min']:4d}  max {s['max']:4d}")


def ensure_checkpoint(work_dir: str) -> str:
    path = os.path.join(work_dir, ARCH)
    if not os.path.isfile(os.path.join(path, "config.json")):
        from fastserve_jax.models.random_checkpoint import make_random_checkpoint

        print(f"building random checkpoint {ARCH} in {path} ...", flush=True)
        os.makedirs(work_dir, exist_ok=True)
        make_random_checkpoint(path, ARCH, seed=0)
    return path


# -- machine roofline ---------------------------------------------------------------------------
def best_of(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> dict:
    """GB/s of a jitted reduction (reads only), numpy sum (reads) and numpy copy (reads + writes)."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    x = jnp.arange(n, dtype=jnp.float32)
    red = jax.jit(jnp.sum)
    red(x).block_until_ready()
    t_jax = best_of(lambda: red(x).block_until_ready(), repeats)
    y = np.asarray(x)
    z = np.empty_like(y)
    y.sum()
    t_np_sum = best_of(lambda: y.sum(), repeats)
    np.copyto(z, y)
    t_np_copy = best_of(lambda: np.copyto(z, y), repeats)
    del x, y, z
    out = dict(jax_reduce_read=nbytes / t_jax / 1e9, numpy_sum_read=nbytes / t_np_sum / 1e9,
               numpy_copy_read_write=2 * nbytes / t_np_copy / 1e9)
    out["best"] = max(out.values())
    return out


def decode_gemms(model_cfg, batch: int) -> list[tuple[int, int, int, int]]:
    """(M, K, N, count) of every matmul of one decode step of the Llama (per step, all layers)."""
    h, i, d = model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.head_dim
    q, kv, L = model_cfg.num_heads * d, model_cfg.num_kv_heads * d, model_cfg.num_layers
    return [(batch, h, q, L), (batch, h, kv, 2 * L), (batch, q, h, L), (batch, h, i, 2 * L), (batch, i, h, L),
            (batch, h, model_cfg.vocab_size, 1)]


def measure_matmul(model_cfg, batch: int, square: int = 2048, repeats: int = 5) -> dict:
    """GFLOP/s of a large square float32 matmul (the peak: the faster of XLA's jnp.dot and
    numpy's BLAS), and of each decode-step shape at `batch` compiled as the engine compiles
    its decode launches (xla_flags.py), plus their count-weighted rate (the best a decode
    step built of these XLA dots can do)."""
    import jax
    import jax.numpy as jnp

    from fastserve_jax.xla_flags import launch_compiler_options

    def rate(m, k, n, reps, opts=None):
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
        dot = jax.jit(jnp.dot).lower(a, b).compile(compiler_options=opts or None)
        dot(a, b).block_until_ready()
        t = best_of(lambda: dot(a, b).block_until_ready(), reps)
        return t, 2 * m * k * n / t / 1e9

    _, xla_peak = rate(square, square, square, repeats)
    a = np.random.default_rng(0).standard_normal((square, square), dtype=np.float32)
    a @ a
    blas_peak = 2 * square ** 3 / best_of(lambda: a @ a, repeats) / 1e9
    opts = launch_compiler_options(jax.devices()[0].platform, batch)
    shapes, total_t, total_f = {}, 0.0, 0.0
    for m, k, n, count in decode_gemms(model_cfg, batch):
        t, r = rate(m, k, n, 4 * repeats, opts)
        shapes[f"{m}x{k}x{n}"] = r
        total_t += count * t
        total_f += count * 2 * m * k * n
    return dict(square_size=square, square_gflops=max(xla_peak, blas_peak), square_xla_gflops=xla_peak,
                square_numpy_gflops=blas_peak, decode_shapes_gflops=shapes, decode_compiler_options=opts,
                decode_mix_gflops=total_f / total_t / 1e9, decode_mix_seconds=total_t)


def decode_cost(model_cfg, param_tree, batch: int, context: float) -> dict:
    """Bytes and FLOPs of one decode step: every weight but the embedding table is read once
    (only `batch` embedding rows are gathered); each sequence reads `context` tokens of K and V."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(param_tree)
    embed = sum(x.nbytes for p, x in leaves if "embed_tokens" in jax.tree_util.keystr(p))
    total = sum(x.nbytes for _, x in leaves)
    itemsize = leaves[0][1].dtype.itemsize
    weight_bytes = total - embed
    n_params = weight_bytes // itemsize
    c = model_cfg
    kv_bytes = int(batch * context * 2 * c.num_layers * c.num_kv_heads * c.head_dim * itemsize)
    attn_flops = int(batch * 4 * c.num_layers * c.num_heads * c.head_dim * context)
    return dict(params_total=total // itemsize, params_read=int(n_params), weight_bytes=int(weight_bytes),
                kv_bytes=kv_bytes, gemm_flops=2 * int(n_params) * batch, attn_flops=attn_flops,
                flops=2 * int(n_params) * batch + attn_flops)


def workload_flops(model_cfg, cost: dict, wl: Workload) -> float:
    """Model FLOPs the workload needs, whoever serves it: each request feeds p + n - 1 tokens
    through the layers (the prompt, then every output token but the last), computes n logits
    rows, and each fed token at position t attends t + 1 keys."""
    c = model_cfg
    head = c.hidden_size * c.vocab_size
    body = cost["params_read"] - head
    fed = [len(p) + n - 1 for p, n in zip(wl.prompts, wl.out_lens)]
    attn = sum(4 * c.num_layers * c.num_heads * c.head_dim * f * (f + 1) / 2 for f in fed)
    return 2.0 * body * sum(fed) + 2.0 * head * wl.num_output_tokens + attn


# -- fastserve-jax --------------------------------------------------------------------------------
def compile_cache_entries(path: str | None) -> int:
    return len(os.listdir(path)) if path and os.path.isdir(path) else 0


def make_llm(path: str, wl_max_len: int, args, cache_dir: str | None, scheduler: str):
    from fastserve_jax import LLM

    block = 16
    blocks_per_seq = -(-wl_max_len // block)
    t0 = time.perf_counter()
    llm = LLM(path, max_model_len=wl_max_len, max_num_seqs=32, max_num_batched_tokens=args.max_batched_tokens,
              block_size=block, num_device_blocks=32 * blocks_per_seq + 1,
              compilation_cache_dir=cache_dir, scheduler=scheduler)
    construct = time.perf_counter() - t0
    n_compiled = len(llm.engine.runner._compiled) + sum(len(st.compiled) for st in llm.engine.runner.stages)
    return llm, construct, n_compiled


def run_ours(llm, wl: Workload, scheduler: str) -> dict:
    from fastserve_jax import SamplingParams
    from fastserve_jax.engine import EngineStats

    eng = llm.engine
    eng.set_scheduler(scheduler)
    warm = [wl.prompts[0][:8], wl.prompts[1][:8]]
    llm.generate(warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in wl.out_lens]
    eng.stats = EngineStats()
    step_log: list[tuple[tuple, float]] = []
    plain_step = eng.step

    def timed_step():                       # which launches each iteration ran, and its wall time
        before = dict(eng.stats.launches)
        t = time.perf_counter()
        out = plain_step()
        dt = time.perf_counter() - t
        step_log.append((tuple(sorted(k for k, v in eng.stats.launches.items() if v != before.get(k, 0))), dt))
        return out

    eng.step = timed_step
    try:
        t0 = time.perf_counter()
        outs = llm.generate(wl.prompts, params)
        wall = time.perf_counter() - t0
    finally:
        del eng.step                        # back to the class method
    st = eng.stats
    tokens = [list(o.token_ids) for o in outs]
    n_out = sum(len(t) for t in tokens)
    assert n_out == wl.num_output_tokens, f"generated {n_out} tokens, wanted {wl.num_output_tokens}"
    it = st.iterations
    single: dict[str, list[float]] = {}
    for keys, dt in step_log:
        if len(keys) == 1:
            single.setdefault(str(keys[0]), []).append(dt)
    decode_only = sum(dt for keys, dt in step_log if keys and all(k[0] == "decode" for k in keys))
    with_prefill = sum(dt for keys, dt in step_log if any(k[0] == "prefill" for k in keys))
    return dict(scheduler=scheduler, wall_s=wall, output_tokens=n_out, decode_only_steps_s=decode_only,
                steps_with_prefill_s=with_prefill,
                single_launch_step_ms={k: dict(n=len(v), median=1e3 * statistics.median(v))
                                       for k, v in sorted(single.items())}, tokens_per_s=n_out / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall, iterations=it,
                schedule_s=st.schedule, assemble_s=st.assemble, device_s=st.device, postprocess_s=st.postprocess,
                host_s=st.host, host_ms_per_iter=1e3 * st.host / it, device_ms_per_iter=1e3 * st.device / it,
                host_frac_of_step=st.host / (st.host + st.device), launches={str(k): v for k, v in st.launches.items()},
                ttft_p50_s=statistics.median(o.metrics.ttft for o in outs),
                latency_p50_s=statistics.median(o.metrics.latency for o in outs)), tokens


def measure_decode_step(llm, batch: int, prompt_len: int, new_tokens: int, seed: int, probe_size: int = 1024) -> dict:
    """`batch` requests with short prompts; once all are decoding, time each `engine.step()`.

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
    eng.stats = EngineStats()
    steps, ctx, rates = [], [], []
    while any(not r.finished for r in reqs):
        ctx.append(statistics.mean(r.num_tokens for r in reqs))
        t = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t)
        rates.append(probe_flops / best_of(lambda: dot(a, a).block_until_ready(), 2) / 1e9)
    st = eng.stats
    decode_keys = [k for k in st.launches if k[0] == "decode"]
    assert all(k[1] == batch for k in decode_keys) and len(decode_keys) == len(st.launches), st.launches
    it = st.iterations
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, steps=len(steps),
                max_blocks=max(k[2] for k in decode_keys),
                step_ms_median=1e3 * statistics.median(steps), step_ms_best=1e3 * min(steps),
                step_ms_mean=1e3 * statistics.mean(steps),
                mean_context=statistics.mean(ctx), step_s=steps, paired_matmul_gflops=rates,
                host_ms_per_iter=1e3 * st.host / it,
                schedule_ms=1e3 * st.schedule / it, assemble_ms=1e3 * st.assemble / it,
                postprocess_ms=1e3 * st.postprocess / it, device_ms_per_iter=1e3 * st.device / it,
                host_frac_of_step=st.host / (st.host + st.device), launches={str(k): v for k, v in st.launches.items()})


def profile_decode_parts(llm, batch: int, nb: int, rounds: int) -> dict:
    """Where a decode step's device time goes, with the engine idle (no live requests).

    Timed in interleaved rounds (best of `rounds`), so machine load hits all alike:
    - forward: the engine's compiled decode launch alone (layers unrolled over per-layer
      weight arrays);
    - forward_scan: the same model and launch as one `nn.scan` over stacked weights (the
      engine's layout before; XLA copies each layer's weight slices out of the stack);
    - forward_sample_get: plus the greedy sampler and device_get (what engine.step waits on);
    - gemms: one XLA program of only the step's matmuls, on the same per-layer arrays;
    - gemms_isolated: the same matmuls as separate jitted dots (sum of their times).
    """
    import functools

    import jax
    import jax.numpy as jnp

    from fastserve_jax.sampling import SamplingArrays
    from fastserve_jax.xla_flags import launch_compiler_options
    from fastserve_jax.models import build_model
    from fastserve_jax.models.attention import AttnBatch, KVCache

    opts = launch_compiler_options(jax.devices()[0].platform, batch) or None   # as the engine's decode launches
    made: dict = {}

    def compiled(fn, *args, **jit_kw):
        """fn jitted and compiled for these arguments' shapes with the decode launches' options."""
        key = (fn, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if key not in made:
            made[key] = jax.jit(fn, **jit_kw).lower(*args).compile(compiler_options=opts)
        return made[key](*args)

    eng = llm.engine
    assert not eng.has_unfinished(), "profile with an idle engine: writes go to the null block"
    runner = eng.runner
    bs = runner.bs
    stage = runner.stages[0]
    assert len(runner.stages) == 1, "profile a single-stage (pp=1) engine"
    fwd = stage.compiled[("decode", batch, nb)]
    smp = runner._compiled[("sample", batch, True, False, False)]  # greedy, no logprobs, no penalties
    tokens = np.full((batch, 1), 7, np.int32)
    pos = np.full((batch, 1), nb * bs - 1, np.int32)
    seg = np.zeros((batch, 1), np.int32)
    slots = np.zeros((batch, 1), np.int32)      # every row writes the null block: no live KV is touched
    block_ids = (1 + np.arange(batch * nb, dtype=np.int32).reshape(batch, nb)) % runner.num_blocks
    attn = AttnBatch(pos, seg, slots, block_ids, np.zeros((batch, nb), np.int32),
                     np.broadcast_to(np.arange(nb, dtype=np.int32) * bs, (batch, nb)).copy())
    idx = np.arange(batch, dtype=np.int32)
    sa = SamplingArrays(np.zeros(batch, np.float32), np.zeros(batch, np.int32), np.ones(batch, np.float32),
                        np.zeros(batch, np.uint32), np.zeros(batch, np.int32))

    def forward():
        logits, stage.cache = fwd(stage.params, stage.cache, tokens, attn, idx)
        return logits

    layers = stage.params["layers"]
    ends = {k: v for k, v in stage.params.items() if k != "layers"}
    stacked = {**ends, "layers": jax.tree.map(lambda *ws: jnp.stack(ws), *layers)}
    model = build_model(eng.model_cfg, eng.cfg.dtype)
    scan_apply = functools.partial(model.apply, method=model.__call__)
    scan_cache = KVCache(jnp.copy(stage.cache.k), jnp.copy(stage.cache.v))   # same KV as the engine reads

    def forward_scan():
        nonlocal scan_cache
        logits, scan_cache = compiled(scan_apply, {"params": stacked}, tokens, attn, scan_cache, idx,
                                      donate_argnums=(3,))
        return logits

    per_layer, head = gemm_weights(stage.params)
    gemms_prog = functools.partial(compiled, gemms_fn)
    dot = functools.partial(compiled, jnp.dot)
    x = jax.random.normal(jax.random.key(2), (batch, eng.model_cfg.hidden_size), jnp.float32) * 0.02
    xi = jax.random.normal(jax.random.key(3), (batch, per_layer[0]["d"].shape[0]), jnp.float32) * 0.02

    def isolated():
        out = []
        for w in per_layer:
            out += [dot(x, w[k]).block_until_ready() for k in "qkvogu"]
            out.append(dot(xi, w["d"]).block_until_ready())
        return dot(x, head)

    parts = {"forward": lambda: forward().block_until_ready(),
             "forward_scan": lambda: forward_scan().block_until_ready(),
             "forward_sample_get": lambda: jax.device_get(smp(forward(), sa)),
             "gemms": lambda: gemms_prog(per_layer, head, x).block_until_ready(),
             "gemms_isolated": lambda: isolated().block_until_ready(),
             "lm_head": lambda: dot(x, head).block_until_ready()}
    for fn in parts.values():
        fn()
    scan_diff = float(np.max(np.abs(np.asarray(forward()) - np.asarray(forward_scan()))))
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(rounds):
        for k, fn in parts.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    logits = forward()
    sampler = best_of(lambda: jax.device_get(smp(logits, sa)), rounds)
    out = {f"{k}_ms": 1e3 * min(v) for k, v in times.items()}
    out.update({f"{k}_median_ms": 1e3 * statistics.median(v) for k, v in times.items()})
    del stacked, scan_cache
    return dict(batch=batch, blocks=nb, rounds=rounds, sampler_ms=1e3 * sampler, scan_logits_max_abs_diff=scan_diff, **out)


# -- the step's matmuls alone -----------------------------------------------------------------------
def gemm_weights(params: dict) -> tuple[list[dict], object]:
    """The Llama's matmul weights, per layer (q k v o gate up down), and the head's."""
    per_layer = [{"q": w["attn"]["q_proj"]["kernel"], "k": w["attn"]["k_proj"]["kernel"],
                  "v": w["attn"]["v_proj"]["kernel"], "o": w["attn"]["o_proj"]["kernel"],
                  "g": w["mlp"]["gate_proj"]["kernel"], "u": w["mlp"]["up_proj"]["kernel"],
                  "d": w["mlp"]["down_proj"]["kernel"]} for w in params["layers"]]
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["embed_tokens"]["embedding"].T
    return per_layer, head


def gemms_fn(ws, hd, h, rows: int | None = None):
    """Every matmul of a launch and nothing else: the layers' on h (tokens, hidden), the head's
    on its first `rows` tokens (None: all); attention is replaced by adding K and V to Q."""
    import jax
    import jax.numpy as jnp

    for w in ws:
        q = h @ w["q"]
        kv = h @ w["k"] + h @ w["v"]
        h = h + (q + jnp.tile(kv, q.shape[-1] // kv.shape[-1])) @ w["o"]
        h = h + (jax.nn.silu(h @ w["g"]) * (h @ w["u"])) @ w["d"]
    return h[:rows] @ hd


def matmul_floor(llm, launches: dict, rounds: int = 5) -> dict:
    """Seconds the matmuls of a run's launches take alone: for each launch shape the run used,
    one XLA program of only its matmuls (tokens x every layer weight, logit rows x head),
    compiled with that launch's compiler options, best of `rounds` interleaved rounds, times
    its count. Whatever else a launch does (attention, norms, sampling, the host) comes on top."""
    import ast
    import functools

    import jax
    import jax.numpy as jnp

    from fastserve_jax.xla_flags import launch_compiler_options

    eng = llm.engine
    assert len(eng.runner.stages) == 1, "single-stage (pp=1) engine"
    per_layer, head = gemm_weights(eng.runner.stages[0].params)
    platform = jax.devices()[0].platform
    hidden = eng.model_cfg.hidden_size
    shapes: dict[tuple[int, int], int] = {}
    for key, n in launches.items():
        kind, tokens, _ = ast.literal_eval(key)        # run_ours keys launches by str(tuple)
        rows = tokens if kind == "decode" else eng.cfg.max_prefill_seqs
        shapes[(tokens, rows)] = shapes.get((tokens, rows), 0) + n
    progs = {}
    for tokens, rows in sorted(shapes):
        h = jax.random.normal(jax.random.key(4), (tokens, hidden), jnp.float32) * 0.02
        opts = launch_compiler_options(platform, tokens) or None
        prog = jax.jit(functools.partial(gemms_fn, rows=rows)).lower(per_layer, head, h).compile(
            compiler_options=opts)
        prog(per_layer, head, h).block_until_ready()
        progs[(tokens, rows)] = functools.partial(prog, per_layer, head, h)
    best = dict.fromkeys(progs, float("inf"))
    for _ in range(rounds):
        for shape, run in progs.items():
            best[shape] = min(best[shape], best_of(lambda: run().block_until_ready(), 1))
    per_shape = {f"{t} tokens, {r} logit rows": dict(launches=shapes[(t, r)], best_ms=1e3 * best[(t, r)])
                 for t, r in progs}
    return dict(seconds=sum(shapes[k] * best[k] for k in progs), rounds=rounds, per_shape=per_shape)


# -- transformers ---------------------------------------------------------------------------------
def load_hf(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None   # ignore_eos: always generate the requested length
    return model


def pick_torch_threads(model, choice: str, seed: int) -> dict:
    """torch intra-op threads for the baselines: `choice` is a number, or "auto": time a
    512-token prefill and 4 decode steps at batch 32 with 1 .. cores threads and keep the
    fastest (on a machine shared with busy processes, more threads can be much slower)."""
    import torch

    cores = os.cpu_count() or 1
    if choice != "auto":
        torch.set_num_threads(int(choice))
        return dict(threads=int(choice), probe=None)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(VOCAB_LO, model.config.vocab_size, (1, 512), generator=g)
    probe = {}
    for n in range(1, cores + 1):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(input_ids=prompt[:, :64], logits_to_keep=1)
            t = time.perf_counter()
            model(input_ids=prompt, logits_to_keep=1)
            pre = time.perf_counter() - t
        dec = hf_decode_step(model, 32, 16, steps=4, seed=seed)["step_ms_median"] / 1e3
        probe[n] = dict(prefill_512_s=pre, decode_32_step_s=dec, score_s=pre + 4 * dec)
    best = min(probe, key=lambda n: probe[n]["score_s"])
    torch.set_num_threads(best)
    return dict(threads=best, probe=probe)


def run_hf_continuous(model, wl: Workload, max_batched_tokens: int, max_len: int) -> tuple[dict, list[list[int]]]:
    """transformers continuous batching: the manager `generate_batch` wraps, fed each request
    with its own max_new_tokens (generate_batch itself takes one max_new_tokens for all)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 256
    cb = ContinuousBatchingConfig(max_requests_per_batch=32, max_batch_tokens=max_batched_tokens, page_size=page,
                                  num_blocks=32 * -(-max_len // page) + 8)
    gc = GenerationConfig(do_sample=False, max_new_tokens=max(wl.out_lens), eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gc, continuous_batching_config=cb,
                                                   block=True, timeout=30) as mgr:
        t1 = time.perf_counter()
        ids = [mgr.add_request(p, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
               for i, (p, n) in enumerate(zip(wl.prompts, wl.out_lens))]
        results = {}
        while len(results) < len(ids):
            r = mgr.get_result(timeout=1)
            if r is not None and r.is_finished():
                if r.error is not None:
                    raise RuntimeError(f"transformers CB request {r.request_id} failed: {r.error}")
                results[r.request_id] = r
            elif r is None and not mgr.is_running():
                raise RuntimeError("transformers continuous batching loop stopped before all requests finished")
        wall = time.perf_counter() - t1
        attn_impl = getattr(model.config, "_attn_implementation", "?")
    tokens = [list(results[f"r{i}"].generated_tokens) for i in range(len(wl.prompts))]
    n_out = sum(len(t) for t in tokens)
    assert n_out == wl.num_output_tokens, f"transformers CB generated {n_out}, wanted {wl.num_output_tokens}"
    return dict(wall_s=wall, setup_s=t1 - t0, output_tokens=n_out, tokens_per_s=n_out / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall, attn_implementation=attn_impl,
                config=dict(max_requests_per_batch=32, max_batch_tokens=max_batched_tokens, page_size=page,
                            num_blocks=cb.num_blocks)), tokens


def run_hf_static(model, wl: Workload, batch: int) -> tuple[dict, list[list[int]]]:
    """Plain `generate` in static batches (arrival order), left padded; each batch runs to its
    longest requested output; only requested tokens count as useful."""
    import torch
    from transformers import GenerationConfig

    tokens: list[list[int]] = []
    raw = 0
    t0 = time.perf_counter()
    for s in range(0, len(wl.prompts), batch):
        ps, ns = wl.prompts[s:s + batch], wl.out_lens[s:s + batch]
        width = max(len(p) for p in ps)
        ids = torch.zeros((len(ps), width), dtype=torch.long)
        mask = torch.zeros((len(ps), width), dtype=torch.long)
        for i, p in enumerate(ps):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gc = GenerationConfig(do_sample=False, max_new_tokens=max(ns), min_new_tokens=max(ns), eos_token_id=None,
                              pad_token_id=0)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
        gen = out[:, width:]
        assert gen.shape[1] == max(ns), f"static batch generated {gen.shape[1]} tokens, wanted {max(ns)}"
        raw += gen.numel()
        tokens += [gen[i, :n].tolist() for i, n in enumerate(ns)]
    wall = time.perf_counter() - t0
    n_out = sum(len(t) for t in tokens)
    return dict(wall_s=wall, batch=batch, output_tokens=n_out, raw_generated_tokens=raw,
                tokens_per_s=n_out / wall, raw_tokens_per_s=raw / wall,
                total_tokens_per_s=(n_out + wl.num_prompt_tokens) / wall), tokens


def hf_decode_step(model, batch: int, prompt_len: int, steps: int, seed: int) -> dict:
    """transformers' own forward for one decode step at `batch` (DynamicCache, no padding,
    logits for the last token only): the torch counterpart of our decode launch."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB_LO, model.config.vocab_size, (batch, prompt_len), generator=g)
    cache = DynamicCache(config=model.config)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            t = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t)
    return dict(batch=batch, prompt_len=prompt_len, steps=steps, step_ms_median=1e3 * statistics.median(times),
                step_ms_best=1e3 * min(times))


def run_hf_reference(model, prompt: list[int], n: int) -> list[int]:
    """Unbatched, unpadded greedy generate: the plainest reference."""
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), generation_config=gc)
    return out[0, len(prompt):].tolist()


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical requests, and tokens agreeing before each request's first divergence."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
    total = sum(len(x) for x in a)
    return dict(identical_requests=same, requests=len(a), prefix_tokens=prefix, tokens=total)


# -- report ---------------------------------------------------------------------------------------
def line(label: str, value: str) -> None:
    print(f"  {label:<46} {value}")


def main(argv: list[str] | None = None) -> dict:
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
    args = ap.parse_args(argv)
    q = args.quick
    n_req = args.num_requests or (16 if q else 64)
    scale = args.scale or (16.0 if q else 8.0)
    max_prompt = args.max_prompt or (128 if q else 256)
    max_out = args.max_output or (32 if q else 64)
    dec_tokens = args.decode_tokens or (16 if q else 48)
    DECODE_BATCH, DECODE_PROMPT = 32, 16

    t_start = time.perf_counter()
    import jax

    from fastserve_jax.persistent_cache import enable_compilation_cache
    from fastserve_jax.models.config import ModelConfig

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
    from fastserve_jax.xla_flags import SMALL_LAUNCH_TOKENS, launch_compiler_options

    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(unset)'}; compiler options of launches of <= "
          f"{SMALL_LAUNCH_TOKENS} tokens: {launch_compiler_options(jax.devices()[0].platform, 1) or 'none'}")
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
    llm, construct_s, n_compiled = make_llm(path, max_len, args, cache_dir, policies[0])
    cache_after = compile_cache_entries(None if args.no_compile_cache else cache_dir)
    start = dict(construct_s=construct_s, scheduler=policies[0], warmup_compile_s=llm.engine.warmup_seconds,
                 executables=n_compiled,
                 compile_cache="off" if args.no_compile_cache else cache_dir,
                 cache_entries_before=cache_before, cache_entries_after=cache_after,
                 config=dict(max_model_len=max_len, max_num_seqs=32, max_num_batched_tokens=args.max_batched_tokens,
                             block_size=16, num_device_blocks=llm.engine.kv.num_blocks,
                             decode_batch_buckets=llm.engine.cfg.decode_batch_buckets,
                             prefill_token_buckets=llm.engine.cfg.prefill_token_buckets,
                             block_buckets=llm.engine.cfg.block_buckets))
    print(f"      {construct_s:.1f} s ({n_compiled} executables)", flush=True)
    by_policy, tokens_by_policy = {}, {}
    for policy in policies:
        print(f"      running {n_req} requests, scheduler {policy} ...", flush=True)
        by_policy[policy], tokens_by_policy[policy] = run_ours(llm, wl, policy)
        print(f"      {by_policy[policy]['wall_s']:.1f} s, {by_policy[policy]['tokens_per_s']:.1f} tok/s", flush=True)
    ours, our_tokens = by_policy[policies[0]], tokens_by_policy[policies[0]]

    print("[2/5] roofline: memory bandwidth and matmul rates ...", flush=True)
    bw1 = measure_bandwidth()
    mm1 = measure_matmul(model_cfg, DECODE_BATCH)
    print(f"[3/5] decode step at batch {DECODE_BATCH} ...", flush=True)
    dec = measure_decode_step(llm, DECODE_BATCH, DECODE_PROMPT, dec_tokens, args.seed)
    parts = profile_decode_parts(llm, DECODE_BATCH, dec["max_blocks"], rounds=5)
    print(f"      matmuls of the {ours['scheduler']} run's launches, alone ...", flush=True)
    floor = matmul_floor(llm, ours["launches"])
    bw2 = measure_bandwidth()
    mm2 = measure_matmul(model_cfg, DECODE_BATCH)
    bw = max(bw1["best"], bw2["best"])
    mm = mm1 if mm1["square_gflops"] >= mm2["square_gflops"] else mm2
    mix = max(mm1["decode_mix_gflops"], mm2["decode_mix_gflops"])
    cost = decode_cost(model_cfg, [st.params for st in llm.engine.runner.stages], DECODE_BATCH, dec["mean_context"])
    t_mem = (cost["weight_bytes"] + cost["kv_bytes"]) / (bw * 1e9)
    t_cmp = cost["flops"] / (mm["square_gflops"] * 1e9)
    t_cmp_mix = cost["flops"] / (mix * 1e9)
    roof = max(t_mem, t_cmp)
    roofline = dict(bandwidth_gbs=dict(before=bw1, after=bw2, used=bw), matmul=dict(before=mm1, after=mm2),
                    matmul_peak_gflops=mm["square_gflops"], decode_mix_gflops=mix, cost=cost,
                    t_memory_ms=1e3 * t_mem, t_compute_ms=1e3 * t_cmp, t_compute_decode_shapes_ms=1e3 * t_cmp_mix,
                    roofline_ms=1e3 * roof, bound="compute" if t_cmp >= t_mem else "memory",
                    fraction_median=roof / (dec["step_ms_median"] / 1e3),
                    fraction_best=roof / (dec["step_ms_best"] / 1e3),
                    fraction_vs_decode_shape_rate=max(t_mem, t_cmp_mix) / (dec["step_ms_median"] / 1e3))
    paired = [max(t_mem, cost["flops"] / (g * 1e9)) / t for t, g in zip(dec["step_s"], dec["paired_matmul_gflops"])]
    roofline["fraction_paired_median"] = statistics.median(paired)
    roofline["paired_matmul_gflops_median"] = statistics.median(dec["paired_matmul_gflops"])
    wl_flops = workload_flops(model_cfg, cost, wl)
    print(f"      step {dec['step_ms_median']:.1f} ms median, roofline {1e3 * roof:.1f} ms", flush=True)

    if args.second_start:
        print("      second start (persistent compilation cache) ...", flush=True)
        before = compile_cache_entries(None if args.no_compile_cache else cache_dir)
        llm2, s2, _ = make_llm(path, max_len, args, cache_dir, policies[0])
        start["second_construct_s"] = s2
        start["second_warmup_compile_s"] = llm2.engine.warmup_seconds
        start["second_new_cache_entries"] = compile_cache_entries(
            None if args.no_compile_cache else cache_dir) - before
        del llm2

    hf_cb = hf_static = None
    checks: dict = {}
    if not args.skip_hf:
        import torch

        print("[4/5] transformers continuous batching ...", flush=True)
        model = load_hf(path)
        threads = pick_torch_threads(model, args.torch_threads, args.seed)
        print(f"      torch threads: {threads['threads']}" + (
            "" if threads["probe"] is None else " (probe, s: " + ", ".join(
                f"{n}: prefill {v['prefill_512_s']:.2f} + decode {v['decode_32_step_s']:.2f}"
                for n, v in threads["probe"].items()) + ")"), flush=True)
        hf_cb, cb_tokens = run_hf_continuous(model, wl, args.max_batched_tokens, max_len)
        print(f"      {hf_cb['wall_s']:.1f} s, {hf_cb['tokens_per_s']:.1f} tok/s", flush=True)
        print("[5/5] transformers generate, static batches of 32 ...", flush=True)
        hf_static, st_tokens = run_hf_static(model, wl, 32)
        print(f"      {hf_static['wall_s']:.1f} s, {hf_static['tokens_per_s']:.1f} tok/s", flush=True)
        hf_dec = hf_decode_step(model, DECODE_BATCH, DECODE_PROMPT, steps=8, seed=args.seed)
        ref_ids = sorted(range(len(wl.prompts)), key=lambda i: len(wl.prompts[i]))[:2]
        ref = {i: run_hf_reference(model, wl.prompts[i], wl.out_lens[i]) for i in ref_ids}
        checks = dict(reference_requests={str(i): our_tokens[i] == ref[i] for i in ref_ids},
                      vs_hf_continuous=agreement(our_tokens, cb_tokens),
                      vs_hf_static=agreement(our_tokens, st_tokens),
                      hf_continuous_vs_hf_static=agreement(cb_tokens, st_tokens),
                      torch_threads=torch.get_num_threads(), torch_thread_probe=threads["probe"],
                      hf_decode_step=hf_dec)
        del model

    policy_agreement = {p: agreement(our_tokens, t) for p, t in tokens_by_policy.items() if p != policies[0]}
    for d in (*by_policy.values(), hf_cb, hf_static):
        if d is not None:
            d["model_gflops"] = wl_flops / d["wall_s"] / 1e9
            d["frac_of_peak"] = d["model_gflops"] / roofline["matmul_peak_gflops"]
    report.update(workload_gflop=wl_flops / 1e9, start=start, ours=ours, ours_by_policy=by_policy,
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


def print_report(r: dict) -> None:
    ours, cb, st, rf, dec, parts, start = (r["ours"], r["hf_continuous"], r["hf_static"], r["roofline"], r["decode"],
                                           r["decode_parts"], r["start"])
    n_tok = ours["output_tokens"]
    peak = rf["matmul_peak_gflops"]
    print("\n== results (out tok/s = requested output tokens / wall time of the whole batch; GFLOP/s = model FLOPs "
          "the workload needs / wall time)")
    print(f"  {'system':<44} {'wall s':>7} {'out tok/s':>9} {'all tok/s':>9} {'GFLOP/s':>8} {'% peak':>6} "
          f"{'ours is':>8}")
    rows = [(f"fastserve-jax LLM.generate, {p}", d) for p, d in r["ours_by_policy"].items()]
    if cb:
        rows.append(("transformers continuous batching", cb))
    if st:
        rows.append(("transformers generate, static batches of 32", st))
    for name, d in rows:
        print(f"  {name:<44} {d['wall_s']:7.1f} {d['tokens_per_s']:9.1f} {d['total_tokens_per_s']:9.1f} "
              f"{d['model_gflops']:8.1f} {100 * d['frac_of_peak']:5.0f}% "
              f"{ours['tokens_per_s'] / d['tokens_per_s']:7.2f}x")
    print(f"  (all systems generate the same {n_tok} output tokens from {r['workload']['prompt_stats']['sum']} prompt "
          f"tokens: {r['workload_gflop']:.0f} GFLOP; '% peak' is of the {peak:.1f} GFLOP/s square-matmul rate)")
    if st:
        print(f"  static batches: {st['raw_generated_tokens']} tokens generated in all (padding to each batch's "
              f"longest output), raw {st['raw_tokens_per_s']:.1f} tok/s")
    if cb:
        c = cb["config"]
        print(f"  transformers CB: attn '{cb['attn_implementation']}', max_requests_per_batch "
              f"{c['max_requests_per_batch']}, max_batch_tokens {c['max_batch_tokens']}, page {c['page_size']}, "
              f"{c['num_blocks']} blocks; manager start {cb['setup_s']:.1f} s (not timed)")
    if cb:
        print(f"  bound: at 100% of peak we would be {peak / cb['model_gflops']:.2f}x transformers CB on this machine")
    fl = r["matmul_floor"]
    print(f"  the matmuls of our {ours['scheduler']} run's {sum(ours['launches'].values())} launches, each launch "
          f"shape's matmuls run alone as one XLA program (best of {fl['rounds']} interleaved rounds): "
          f"{fl['seconds']:.1f} s of its {ours['wall_s']:.1f} s (attention, norms, sampling and the host come on top)")
    for shape, v in fl["per_shape"].items():
        print(f"    {shape:<28} {v['launches']:3d} launches x {v['best_ms']:6.1f} ms")
    if cb:
        budget = n_tok / (3 * cb["tokens_per_s"])
        print(f"  3x transformers CB means the whole run in {budget:.1f} s: the matmuls alone take "
              f"{100 * fl['seconds'] / budget:.0f}% of that")
    print(f"  target >= 3x transformers CB: "
          + (f"{'MET' if ours['tokens_per_s'] >= 3 * cb['tokens_per_s'] else 'NOT MET'} "
             f"({ours['tokens_per_s'] / cb['tokens_per_s']:.2f}x)" if cb else "not measured"))

    print("\n== fastserve-jax start")
    line("construct (load + warm-up compile)", f"{start['construct_s']:.1f} s")
    line("warm-up compile", f"{start['warmup_compile_s']:.1f} s, {start['executables']} executables")
    line("persistent compile cache", f"{start['compile_cache']}: {start['cache_entries_before']} entries before, "
         f"{start['cache_entries_after']} after")
    if "second_construct_s" in start:
        line("second start (same process, cache on disk)", f"{start['second_construct_s']:.1f} s "
             f"(warm-up {start['second_warmup_compile_s']:.1f} s, {start['second_new_cache_entries']} new entries)")
    line(f"{ours['scheduler']}: iterations / launches", f"{ours['iterations']} / {sum(ours['launches'].values())}")
    line("time in steps with a prefill / decode-only", f"{ours['steps_with_prefill_s']:.1f} s / "
         f"{ours['decode_only_steps_s']:.1f} s")
    for key, v in ours["single_launch_step_ms"].items():
        line(f"  step with one launch {key}", f"{v['median']:.0f} ms median (n={v['n']})")
    for p, d in r["ours_by_policy"].items():
        line(f"{p}: TTFT p50 / latency p50 (all at t=0)", f"{d['ttft_p50_s']:.2f} s / {d['latency_p50_s']:.2f} s, "
             f"{d['iterations']} iterations")

    c = rf["cost"]
    bwd = rf["bandwidth_gbs"]
    print(f"\n== decode roofline at batch {dec['batch']} (this machine, measured in this run; best of before/after)")
    line("memory bandwidth GB/s (reduce / np.sum / np.copy)",
         f"{bwd['before']['jax_reduce_read']:.1f} / {bwd['before']['numpy_sum_read']:.1f} / "
         f"{bwd['before']['numpy_copy_read_write']:.1f} before; {bwd['after']['jax_reduce_read']:.1f} / "
         f"{bwd['after']['numpy_sum_read']:.1f} / {bwd['after']['numpy_copy_read_write']:.1f} after; "
         f"used {bwd['used']:.1f}")
    m = rf["matmul"]
    line(f"matmul {m['before']['square_size']}^2 float32 GFLOP/s (XLA / numpy BLAS)",
         f"{m['before']['square_xla_gflops']:.1f} / {m['before']['square_numpy_gflops']:.1f} before, "
         f"{m['after']['square_xla_gflops']:.1f} / {m['after']['square_numpy_gflops']:.1f} after; used (peak) "
         f"{rf['matmul_peak_gflops']:.1f}")
    line("decode launches' compiler options", str(m["before"]["decode_compiler_options"] or "XLA defaults"))
    for shape in m["before"]["decode_shapes_gflops"]:
        line(f"matmul {shape} GFLOP/s", f"{m['before']['decode_shapes_gflops'][shape]:.1f} before, "
             f"{m['after']['decode_shapes_gflops'][shape]:.1f} after")
    line("decode-step matmul mix GFLOP/s (count-weighted)", f"{rf['decode_mix_gflops']:.1f}")
    line("weights read per step", f"{c['weight_bytes'] / 1e6:.0f} MB ({c['params_read'] / 1e6:.1f}M of "
         f"{c['params_total'] / 1e6:.1f}M params; embedding table excluded)")
    line("KV read per step", f"{c['kv_bytes'] / 1e6:.1f} MB (mean context {dec['mean_context']:.0f} tokens)")
    line("FLOPs per step", f"{c['flops'] / 1e9:.2f} GFLOP (2 x params x {dec['batch']} + attention "
         f"{c['attn_flops'] / 1e9:.2f})")
    line("bytes / bandwidth", f"{rf['t_memory_ms']:.1f} ms")
    line("FLOPs / peak matmul rate", f"{rf['t_compute_ms']:.1f} ms")
    line("roofline step = max of the two", f"{rf['roofline_ms']:.1f} ms ({rf['bound']}-bound)")
    line("(FLOPs / decode-shape matmul rate)", f"{rf['t_compute_decode_shapes_ms']:.1f} ms")
    line("our decode step (engine.step), median / best",
         f"{dec['step_ms_median']:.1f} / {dec['step_ms_best']:.1f} ms over {dec['steps']} steps")
    line("fraction of roofline, median / best step",
         f"{100 * rf['fraction_median']:.0f}% / {100 * rf['fraction_best']:.0f}%")
    line("fraction, each step vs a matmul timed beside it", f"{100 * rf['fraction_paired_median']:.0f}% median "
         f"(1024^2 matmul {rf['paired_matmul_gflops_median']:.1f} GFLOP/s median over the steps; "
         f"target >= 50%: {'MET' if rf['fraction_paired_median'] >= 0.5 else 'NOT MET'})")
    hd = r["checks"].get("hf_decode_step") if r["checks"] else None
    if hd:
        line("transformers forward, one decode step (median)", f"{hd['step_ms_median']:.1f} ms (batch {hd['batch']}, "
             f"context {hd['prompt_len']}+)")
    line("fraction vs decode-shape matmul rate (median)", f"{100 * rf['fraction_vs_decode_shape_rate']:.0f}%")
    print(f"  where the step goes (idle engine, decode bucket {parts['batch']} x {parts['blocks']} blocks, "
          f"interleaved, best of {parts['rounds']}):")
    pm = lambda k: f"{parts[k + '_ms']:.1f} / {parts[k + '_median_ms']:.1f} ms"
    line("  compiled forward alone (best / median)", pm("forward"))
    line("  same forward as nn.scan over stacked weights", f"{pm('forward_scan')} (logits "
         f"max abs diff {parts['scan_logits_max_abs_diff']:.1e}; unrolled is "
         f"{parts['forward_scan_median_ms'] / parts['forward_median_ms']:.2f}x faster, median)")
    line("  forward + greedy sampler + device_get", pm("forward_sample_get"))
    line("  sampler alone (argmax over 32 x vocab)", f"{parts['sampler_ms']:.1f} ms")
    line("  step's matmuls only, one program", f"{pm('gemms')} = {100 * rf['roofline_ms'] / parts['gemms_ms']:.0f}% / "
         f"{100 * rf['roofline_ms'] / parts['gemms_median_ms']:.0f}% of the roofline")
    line("  same, as separate dots (sum)", f"{parts['gemms_isolated_ms']:.1f} ms "
         f"(of which lm_head {parts['lm_head_ms']:.1f} ms)")
    print("\n== host overhead (schedule + assemble + postprocess) vs device (dispatch .. tokens on host)")
    for name, d in [(f"trace run, {p}", d) for p, d in r["ours_by_policy"].items()] + [
            (f"decode at batch {dec['batch']}", dec)]:
        line(f"{name}: host / device ms per iteration",
             f"{d['host_ms_per_iter']:.2f} / {d['device_ms_per_iter']:.1f} -> host "
             f"{100 * d['host_frac_of_step']:.2f}% of the step")
    line(f"decode: schedule / assemble / postprocess ms", f"{dec['schedule_ms']:.2f} / {dec['assemble_ms']:.2f} / "
         f"{dec['postprocess_ms']:.2f}")
    worst = max([dec["host_frac_of_step"]] + [d["host_frac_of_step"] for d in r["ours_by_policy"].values()])
    line("target host < 10% of step", "MET" if worst < 0.10 else "NOT MET")

    ch = r["checks"]
    if ch or r["policy_agreement"]:
        print("\n== greedy agreement (float32)")
    first = next(iter(r["ours_by_policy"]))
    for p, a in r["policy_agreement"].items():
        line(f"ours {first} vs ours {p}", f"{a['identical_requests']}/{a['requests']} requests identical")
    if ch:
        for i, ok in ch["reference_requests"].items():
            line(f"request {i} vs transformers generate (batch 1)", "identical" if ok else "DIFFERENT")
        for name, key in ((f"ours ({first}) vs transformers CB", "vs_hf_continuous"),
                          (f"ours ({first}) vs static generate", "vs_hf_static"),
                          ("transformers CB vs static generate", "hf_continuous_vs_hf_static")):
            a = ch[key]
            line(name, f"{a['identical_requests']}/{a['requests']} requests identical, "
                 f"{a['prefix_tokens']}/{a['tokens']} tokens before first divergence")
        probe = ch["torch_thread_probe"]
        line("torch threads", str(ch["torch_threads"]) + ("" if not probe else " (probe: " + ", ".join(
            f"{n} -> prefill 512 {v['prefill_512_s']:.2f} s, decode-32 step {v['decode_32_step_s']:.2f} s"
            for n, v in probe.items()) + ")"))
    print(f"\ntotal {r['total_s']:.0f} s; load average {r['load_average_end']:.1f} at the end "
          f"(other processes share this machine)")


if __name__ == "__main__":
    main()
