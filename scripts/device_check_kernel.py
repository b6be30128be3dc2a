"""Part of scripts/device_check.py: the Triton decode kernel timed alone over its tunings, and
the guard that keeps one failing part of the run from ending it."""

from __future__ import annotations

import functools
import sys
import time

from bench_engine_machine import best_of


def failure(what: str, e: Exception) -> str:
    """Print `what` failed with its traceback's tail, and return a one-line account of it: the
    run goes on, so one failing part (a kernel Triton cannot compile, a backend out of memory)
    leaves the others' figures in the table and the JSON."""
    import traceback

    print(f"!! {what} failed:\n" + "".join(traceback.format_exception(e)[-6:]), file=sys.stderr, flush=True)
    return f"error: {type(e).__name__}: {str(e)[:300]}"


def guarded(what: str, fn, *args):
    """fn(*args), or {"error": ...} if it raises (see failure)."""
    try:
        return fn(*args)
    except Exception as e:
        return {"error": failure(what, e)}


def kernel_sweep(model_cfg, p: dict, dtype: str, rates: dict, deadline: float) -> dict:
    """The Triton decode kernel alone on one layer's cache (models/paged_attention.Tuning), and
    the reference path's gather on the same launches: ms per call and the KV bytes a call must
    read over the measured bandwidth, per (batch, context) in p["kernel_cells"], and each output's
    relative error (||out - ref|| / ||ref||, fp32) against the gather's. Two rounds:
    each (blocks per loop step, programs a launch splits up to) in p["tunings"] at Triton's
    default warps and stages, then the fastest of those with each (warps, stages) in
    p["warps_stages"]. `best`: the least total time over the cells, among the tunings that
    finished every cell."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fastserve_jax.models.attention import AttnBatch, gathered_attention
    from fastserve_jax.models.paged_attention import Tuning, paged_attention

    bs, hkv, h, d = p["block_size"], model_cfg.num_kv_heads, model_cfg.num_heads, model_cfg.head_dim
    interpret = jax.default_backend() == "cpu"
    cells = {}                                    # "BxC" -> (kernel args, KV bytes a call reads)
    for b, c in p["kernel_cells"]:
        per_row = -(-c // bs)
        ids = (1 + np.arange(b * per_row, dtype=np.int32)).reshape(b, per_row)
        key = jax.random.key(b * 7919 + c)
        draw = lambda i, *shape: jax.random.normal(jax.random.fold_in(key, i), shape, dtype)   # noqa: E731
        args = (draw(2, b, 1, h, d), draw(0, 1, b * per_row + 1, bs, hkv, d), draw(1, 1, b * per_row + 1, bs, hkv, d),
                jnp.full((b, 1), c - 1, jnp.int32), jnp.zeros((b, 1), jnp.int32), jnp.asarray(ids),
                jnp.zeros_like(jnp.asarray(ids)),
                jnp.asarray(np.broadcast_to(np.arange(per_row, dtype=np.int32) * bs, (b, per_row)).copy()))
        cells[f"{b}x{c}"] = (args, 2 * b * c * hkv * d * jnp.dtype(dtype).itemsize)
    out: dict[str, dict] = {}
    refs: dict[str, jax.Array] = {}                # the reference gather's output per cell, fp32

    def time_all(name: str, fn) -> None:
        out[name] = {}
        failed = False
        for cell, (args, kv_bytes) in cells.items():
            if time.perf_counter() > deadline or failed:
                out[name][cell] = "skipped (failed above)" if failed else "skipped (time)"
                continue
            try:
                o = fn(*args).astype(jnp.float32)
            except Exception as e:                # a setting Triton cannot compile must not end the run
                out[name][cell], failed = failure(f"kernel {name} at {cell}", e), True
                continue
            if name == "reference":               # it runs first
                refs[cell] = o
            t = best_of(lambda: fn(*args).block_until_ready(), p["steps"])
            out[name][cell] = dict(ms=1e3 * t, kv_bytes=kv_bytes,
                                   bandwidth_fraction=kv_bytes / t / (rates["bandwidth_gbs"] * 1e9))
            if cell in refs:
                out[name][cell]["rel_err"] = float(jnp.linalg.norm(o - refs[cell]) / jnp.linalg.norm(refs[cell]))

    def fastest(names):
        done = [n for n in names if all(isinstance(v, dict) for v in out[n].values())]
        return min(done, key=lambda n: sum(v["ms"] for v in out[n].values())) if done else None

    def sweep(tunings) -> dict[str, Tuning]:
        variants = {t.describe(): t for t in tunings}
        for name, t in variants.items():
            time_all(name, jax.jit(functools.partial(paged_attention, layer=0, interpret=interpret, tune=t)))
        return variants

    time_all("reference", jax.jit(lambda q, kc, vc, pos, seg, ids, bseg, bpos: gathered_attention(
        q, kc, vc, AttnBatch(pos, seg, pos, ids, bseg, bpos), 0)))
    variants = sweep([Tuning(*t) for t in p["tunings"]])
    first = variants.get(fastest(variants))
    if first is not None:
        variants.update(sweep([first._replace(num_warps=w, num_stages=st) for w, st in p["warps_stages"]]))
    best = fastest(variants)
    return dict(cells=out, best=best, best_tuning=dict(variants[best]._asdict()) if best else {})
