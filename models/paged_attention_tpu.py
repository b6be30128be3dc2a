"""Paged attention as a Pallas kernel for TPUs (the Mosaic lowering).

The same contract as paged_attention.py (the Triton kernel) and the reference path in
attention.py: decode (Q = 1) and packed, segment-masked prefill over the cache layout
(L, num_blocks, block_size, Hkv, D), each row's live blocks read in place through the block
table, never gathered into a new array.

What Mosaic needs that Triton does not: the block table must be in scalar memory before the
kernel runs, and the caches stay in HBM, where a program may only reach them by DMA. So:

- The block table (ids, owning segments, first positions) and each row's live block count
  are scalar-prefetch operands (PrefetchScalarGridSpec), in SMEM.
- The caches are `pl.ANY` operands. A program of grid (R rows, Hkv KV heads, query tiles)
  copies one block of its KV head at a time, the strided (block_size, D) slab
  `cache[layer, block, :, head]`, into one of two VMEM buffers, and starts the copy of the
  next block before it works on the current one (double buffering).
- Per block, an online softmax in fp32 as in the Triton kernel: scores (block_m, block_size),
  masked to the query's segment and to keys at or before its position; a query with no
  visible key (padding) gets 0.
- Query tiles hold up to MAX_TILE query rows (a row's Q tokens x the G query heads of the
  group, token-major, as in the Triton kernel), a multiple of 8 (the sublane count). Their
  positions and segments come as (M, 1) columns so that every VMEM block is two-dimensional.

No context splits (flash-decoding): a TPU core runs its programs one after another, so
splitting a row's blocks over programs adds no parallelism there. Not tuned: one 16-token
block per copy is a small DMA; reading several blocks per step, as the shipped
`ragged_paged_attention` does, is the first thing to try on a TPU.

Tested on CPU in Pallas's TPU interpret mode (DMAs, semaphores and scalar prefetch are
simulated) against the reference path, and lowered for TPU from CPU with jax.export
(tests/test_paged_attention.py); it has not run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from fastserve_jax.models.paged_attention import from_query_rows, query_rows

_NEG = -1e30
SUBLANES = 8
MAX_TILE = 128       # query rows per program


def _kernel(ids_ref, bseg_ref, bpos_ref, nblk_ref, q_ref, qpos_ref, qseg_ref, k_hbm, v_hbm, o_ref,
            kbuf, vbuf, sem, *, layer: int, scale: float, block_size: int):
    """One (row r, KV head h, query tile) program over the row's live blocks."""
    r, h = pl.program_id(0), pl.program_id(1)
    n = nblk_ref[r]
    q = q_ref[...]                                          # (block_m, D), KV dtype
    qpos, qseg = qpos_ref[...], qseg_ref[...]               # (block_m, 1)
    offs = jax.lax.broadcasted_iota(jnp.int32, (1, block_size), 1)

    def copies(j, slot):
        b = ids_ref[r, j]
        return (pltpu.make_async_copy(k_hbm.at[layer, b, :, h], kbuf.at[slot], sem.at[0, slot]),
                pltpu.make_async_copy(v_hbm.at[layer, b, :, h], vbuf.at[slot], sem.at[1, slot]))

    @pl.when(n > 0)
    def _first():
        for c in copies(0, 0):
            c.start()

    def body(j, carry):
        m, l, acc = carry
        slot = jax.lax.rem(j, 2)

        @pl.when(j + 1 < n)
        def _next():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        k, v = kbuf[slot], vbuf[slot]                       # (block_size, D)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        mask = (qseg == bseg_ref[r, j]) & (bpos_ref[r, j] + offs <= qpos)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(axis=-1, keepdims=True), acc * corr + pv

    block_m, d = q.shape
    init = (jnp.full((block_m, 1), _NEG, jnp.float32), jnp.zeros((block_m, 1), jnp.float32),
            jnp.zeros((block_m, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n, body, init)
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)


@functools.partial(jax.jit, static_argnames=("layer", "interpret"))
def paged_attention_tpu(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, seg: jax.Array,
                        block_ids: jax.Array, block_seg: jax.Array, block_pos: jax.Array, layer: int,
                        interpret: bool = False) -> jax.Array:
    """Attention of q over the blocks a launch names, read in place from the caches; the
    arguments and result as paged_attention.paged_attention's. `interpret`: run in Pallas's
    TPU interpret mode (on CPU)."""
    r, nq, h, d = q.shape
    _, _, bs, hkv, _ = k_cache.shape
    rows = nq * (h // hkv)
    block_m = min(-(-rows // SUBLANES) * SUBLANES, MAX_TILE)
    qh, qpos, qseg, nblk = query_rows(q.astype(k_cache.dtype), positions, seg, block_seg, hkv, block_m)
    m = qh.shape[2]
    column = pl.BlockSpec((None, block_m, 1), lambda i, j, t, *_: (i, t, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(r, hkv, m // block_m),
        in_specs=[pl.BlockSpec((None, None, block_m, d), lambda i, j, t, *_: (i, j, t, 0)), column, column,
                  pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, None, block_m, d), lambda i, j, t, *_: (i, j, t, 0)),
        scratch_shapes=[pltpu.VMEM((2, bs, d), k_cache.dtype), pltpu.VMEM((2, bs, d), v_cache.dtype),
                        pltpu.SemaphoreType.DMA((2, 2))])
    o = pl.pallas_call(
        functools.partial(_kernel, layer=layer, scale=1.0 / float(np.sqrt(d)), block_size=bs),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((r, hkv, m, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="fastserve_paged_attention_tpu",
    )(block_ids, block_seg, block_pos, nblk, qh, qpos[..., None], qseg[..., None], k_cache, v_cache)
    return from_query_rows(o, q)
