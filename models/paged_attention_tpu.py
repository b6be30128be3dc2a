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
  walks its row's live blocks KEYS_PER_STEP keys at a time (8 blocks of 16): per step one
  DMA per block of the strided (block_size, D) slab `cache[layer, block, :, head]`, into one
  of two VMEM buffers, and it starts the next step's copies before it works on the current
  one (double buffering). A last step with fewer live blocks copies only those and masks the
  rest.
- Per step, an online softmax in fp32 as in the Triton kernel: scores (block_m, keys),
  masked to the query's segment and to keys at or before its position; a query with no
  visible key (padding) gets 0.
- Query tiles hold up to MAX_TILE query rows (a row's Q tokens x the G query heads of the
  group, token-major, as in the Triton kernel), a multiple of 8 (the sublane count). Their
  positions and segments come as (M, 1) columns so that every VMEM block is two-dimensional.

No context splits (flash-decoding): a TPU core runs its programs one after another, so
splitting a row's blocks over programs adds no parallelism there. Not tuned: 128 keys per
step (scores one lane-tile wide) is a first guess, and each block is still its own DMA of
block_size x D elements (4 KB in bf16 at 16 x 128).

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
KEYS_PER_STEP = 128  # keys (whole blocks) copied and scored per step: 8 blocks of 16, one lane-wide tile


def _kernel(ids_ref, bseg_ref, bpos_ref, nblk_ref, layer_ref, q_ref, qpos_ref, qseg_ref, k_hbm, v_hbm, o_ref,
            kbuf, vbuf, sem, *, scale: float, block_size: int, per_step: int, width: int):
    """One (row r, KV head h, query tile) program over the row's live blocks, `per_step` blocks
    (one key tile of per_step x block_size keys) at a time."""
    r, h = pl.program_id(0), pl.program_id(1)
    n = nblk_ref[r]
    layer = layer_ref[0]                                    # an input, so every layer's kernel is one program
    q = q_ref[...]                                          # (block_m, D), KV dtype
    qpos, qseg = qpos_ref[...], qseg_ref[...]               # (block_m, 1)
    keys = per_step * block_size
    tok = jax.lax.broadcasted_iota(jnp.int32, (1, keys), 1)
    tok_blk, tok_off = jax.lax.div(tok, block_size), jax.lax.rem(tok, block_size)   # (not // and %: those
    row_blk = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (keys, 1), 0), block_size)   # lower through sign)

    def dma(step, slot, action):
        """Start or wait for the copies of the step's live blocks into buffer `slot`."""
        for i in range(per_step):
            j = step * per_step + i

            @pl.when(j < n)
            def _():
                b, dst = ids_ref[r, j], pl.ds(i * block_size, block_size)
                for src, buf, kind in ((k_hbm, kbuf, 0), (v_hbm, vbuf, 1)):
                    c = pltpu.make_async_copy(src.at[layer, b, :, h], buf.at[slot, dst], sem.at[kind, slot, i])
                    c.start() if action == "start" else c.wait()

    @pl.when(n > 0)
    def _first():
        dma(0, 0, "start")

    def body(step, carry):
        m, l, acc = carry
        slot = jax.lax.rem(step, 2)

        @pl.when((step + 1) * per_step < n)
        def _next():
            dma(step + 1, 1 - slot, "start")

        dma(step, slot, "wait")
        live = n - step * per_step                          # live blocks in this step (may exceed per_step)
        kseg = jnp.full((1, keys), -3, jnp.int32)           # -3: no key (no query has that segment)
        kpos = jnp.zeros((1, keys), jnp.int32)
        for i in range(per_step):
            j = jnp.minimum(step * per_step + i, width - 1)
            kseg = jnp.where((tok_blk == i) & (i < live), bseg_ref[r, j], kseg)
            kpos = jnp.where(tok_blk == i, bpos_ref[r, j] + tok_off, kpos)
        k = kbuf[slot]                                      # (keys, D); past `live` blocks: stale
        v = jnp.where(row_blk < live, vbuf[slot], 0)        # stale rows could hold NaN: 0 * NaN
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        mask = (qseg == kseg) & (kpos <= qpos)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l * corr + p.sum(axis=-1, keepdims=True), acc * corr + pv

    block_m, d = q.shape
    init = (jnp.full((block_m, 1), _NEG, jnp.float32), jnp.zeros((block_m, 1), jnp.float32),
            jnp.zeros((block_m, d), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, jax.lax.div(n + per_step - 1, per_step), body, init)
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)


@functools.partial(jax.jit, static_argnames=("layer", "interpret", "keys_per_step"))
def paged_attention_tpu(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, seg: jax.Array,
                        block_ids: jax.Array, block_seg: jax.Array, block_pos: jax.Array, layer: int,
                        interpret: bool = False, keys_per_step: int = KEYS_PER_STEP) -> jax.Array:
    """Attention of q over the blocks a launch names, read in place from the caches; the
    arguments and result as paged_attention.paged_attention's. `interpret`: run in Pallas's
    TPU interpret mode (on CPU). `keys_per_step`: keys copied and scored per step, rounded
    down to whole blocks (at least one), at most the launch's blocks."""
    r, nq, h, d = q.shape
    _, _, bs, hkv, _ = k_cache.shape
    width = block_ids.shape[1]
    per_step = max(1, min(keys_per_step // bs, width))
    rows = nq * (h // hkv)
    block_m = min(-(-rows // SUBLANES) * SUBLANES, MAX_TILE)
    qh, qpos, qseg, nblk = query_rows(q.astype(k_cache.dtype), positions, seg, block_seg, hkv, block_m)
    m = qh.shape[2]
    column = pl.BlockSpec((None, block_m, 1), lambda i, j, t, *_: (i, t, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(r, hkv, m // block_m),
        in_specs=[pl.BlockSpec((None, None, block_m, d), lambda i, j, t, *_: (i, j, t, 0)), column, column,
                  pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((None, None, block_m, d), lambda i, j, t, *_: (i, j, t, 0)),
        scratch_shapes=[pltpu.VMEM((2, per_step * bs, d), k_cache.dtype),
                        pltpu.VMEM((2, per_step * bs, d), v_cache.dtype), pltpu.SemaphoreType.DMA((2, 2, per_step))])
    o = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / float(np.sqrt(d)), block_size=bs, per_step=per_step, width=width),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((r, hkv, m, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="fastserve_paged_attention_tpu",
    )(block_ids, block_seg, block_pos, nblk, jnp.full((1,), layer, jnp.int32), qh, qpos[..., None], qseg[..., None],
      k_cache, v_cache)
    return from_query_rows(o, q)
