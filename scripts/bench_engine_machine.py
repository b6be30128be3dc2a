"""This machine's roofline for scripts/bench_engine.py: memory bandwidth, matmul rates (a large
square and each decode-step shape), the bytes and FLOPs of one decode step and of the whole
workload, and the decode roofline that holds them against a measured step; device_rates is
scripts/device_check.py's ceilings on an accelerator."""

from __future__ import annotations

import statistics
import time

import numpy as np

from bench_engine_workload import Workload


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
    numpy's BLAS), and of each decode-step shape at `batch` with the weight (out, in) as the
    model stores it (models/linear.py), plus their count-weighted rate (the best a decode
    step built of these XLA dots can do)."""
    import jax
    import jax.numpy as jnp

    from fastserve_jax.models.linear import linear

    def rate(m, k, n, reps, weight_out_in=False):
        a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, k) if weight_out_in else (k, n), jnp.float32)
        fn = linear if weight_out_in else jnp.dot
        dot = jax.jit(fn).lower(a, b).compile()
        dot(a, b).block_until_ready()
        t = best_of(lambda: dot(a, b).block_until_ready(), reps)
        return t, 2 * m * k * n / t / 1e9

    _, xla_peak = rate(square, square, square, repeats)
    a = np.random.default_rng(0).standard_normal((square, square), dtype=np.float32)
    a @ a
    blas_peak = 2 * square ** 3 / best_of(lambda: a @ a, repeats) / 1e9
    shapes, total_t, total_f = {}, 0.0, 0.0
    for m, k, n, count in decode_gemms(model_cfg, batch):
        t, r = rate(m, k, n, 4 * repeats, weight_out_in=True)
        shapes[f"{m}x{k}x{n}"] = r
        total_t += count * t
        total_f += count * 2 * m * k * n
    return dict(square_size=square, square_gflops=max(xla_peak, blas_peak), square_xla_gflops=xla_peak,
                square_numpy_gflops=blas_peak, decode_shapes_gflops=shapes,
                decode_mix_gflops=total_f / total_t / 1e9, decode_mix_seconds=total_t)


def decode_cost(model_cfg, param_tree, batch: int, context: float) -> dict:
    """Bytes and FLOPs of one decode step: every weight is read once except the embedding
    table, of which only `batch` rows are gathered, unless the output head is tied to it;
    each sequence reads `context` tokens of K and V."""
    import jax

    leaves = jax.tree_util.tree_leaves_with_path(param_tree)
    embed = sum(x.nbytes for p, x in leaves if "embed_tokens" in jax.tree_util.keystr(p))
    if model_cfg.tie_word_embeddings:
        embed = 0
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



def machine_rates(model_cfg, batch: int) -> dict:
    """Bandwidth and matmul rates, measured now (the run takes them before and after)."""
    return dict(bandwidth=measure_bandwidth(), matmul=measure_matmul(model_cfg, batch))


def decode_roofline(model_cfg, param_tree, dec: dict, before: dict, after: dict) -> dict:
    """The decode step `dec` (measure_decode_step) against this machine's roofline: bytes over
    the best bandwidth, FLOPs over the best square-matmul rate (and over the decode shapes'
    rate), and each step against the matmul rate timed right after it."""
    bw1, bw2, mm1, mm2 = before["bandwidth"], after["bandwidth"], before["matmul"], after["matmul"]
    bw = max(bw1["best"], bw2["best"])
    mm = mm1 if mm1["square_gflops"] >= mm2["square_gflops"] else mm2
    mix = max(mm1["decode_mix_gflops"], mm2["decode_mix_gflops"])
    cost = decode_cost(model_cfg, param_tree, dec["batch"], dec["mean_context"])
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
    return roofline


def device_rates(copy_bytes: int, square: int, dtype) -> dict:
    """HBM GB/s and bf16 peak, each the best the device showed: x + 1 over a large array (reads
    and writes every byte), a sum over it (reads only), torch's copy_ where torch sees a GPU; a
    square matmul in `dtype` through XLA and through torch. The fastest is the ceiling."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((copy_bytes // 2,), jnp.bfloat16)
    rate = {}
    for name, fn, moved in [("copy", lambda a: a + jnp.ones((), a.dtype), 2),     # bytes moved per byte of x
                            ("sum", lambda a: jnp.sum(a, dtype=jnp.float32), 1)]:
        f = jax.jit(fn)
        f(x).block_until_ready()
        rate[f"{name}_gbs"] = moved * copy_bytes / best_of(lambda: f(x).block_until_ready(), 10) / 1e9
    a = jax.random.normal(jax.random.key(0), (square, square), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    rate["xla_matmul_tflops"] = 2 * square ** 3 / best_of(lambda: dot(a, a).block_until_ready(), 10) / 1e12
    x = a = None                     # frees the arrays before torch allocates its own
    if jax.devices()[0].platform == "gpu":       # torch shares the GPU; its kernels may be the faster ones
        try:
            rate.update(torch_rates(copy_bytes, square, "cuda"))
        except Exception as e:                   # no torch, or no CUDA build of it: XLA's figures stand
            rate["torch_error"] = repr(e)
    return dict(rate, bandwidth_gbs=max(v for k, v in rate.items() if k.endswith("gbs")), copy_bytes=copy_bytes,
                peak_tflops=max(v for k, v in rate.items() if k.endswith("tflops")), square=square)


def torch_rates(copy_bytes: int, square: int, device: str) -> dict:
    """torch's copy_ GB/s (reads + writes) and bf16 square matmul TFLOP/s on `device`, best of 10."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    u = torch.empty_like(t)
    m = torch.randn(square, square, dtype=torch.bfloat16, device=device)
    out = dict(torch_copy_gbs=2 * copy_bytes / best_of(lambda: (u.copy_(t), sync()), 10) / 1e9,
               torch_matmul_tflops=2 * square ** 3 / best_of(lambda: (m @ m, sync()), 10) / 1e12)
    t = u = m = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
