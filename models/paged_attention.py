"""Paged attention as a Pallas kernel that reads KV blocks in place through the block table.

Same contract as the reference path in attention.py (`AttnBatch`, rows layout, masks), for
decode (Q = 1) and packed, segment-masked prefill (Q = prefill tile) alike, over the
existing cache layout (L, num_blocks, block_size, Hkv, D): no gather of a row's context
into a new array. Where the reference copies R x NB x block_size x Hkv x D per layer and
then reads it, the kernel reads each block once, straight from the cache.

Grid: (R rows, Hkv KV heads, M / block_m query tiles, context splits). One program holds a tile of
block_m "query rows" of one KV head: the row's Q tokens x G = H / Hkv query heads of the
group, flattened (token-major) and padded to a power of two (Triton wants power-of-two
tile shapes and dot operands of at least 16 rows). It walks the row's live blocks (the
leading entries of block_ids whose block_seg is not -2: the launch builder packs them at
the front), loads block b's (block_size, D) slab of its head for K and V, and keeps an
online softmax (running max m, sum l, accumulator acc in fp32):

    s   = (q @ k.T) * scale                   (block_m, block_size), fp32 accumulation
    s   = where(same segment & pos(key) <= pos(query), s, -inf)
    acc = acc * exp(m_old - m_new) + p @ v    p = exp(s - m_new), cast to the KV dtype as the
                                              reference casts its probabilities
A query with no visible key (padding) gets 0, never NaN, so nothing non-finite reaches
the null block. A decode launch splits each row's blocks over several programs
(flash-decoding) so that a small batch still fills the device; `_combine` merges them.

Static knobs (`Tuning`; the environment variable FASTSERVE_JAX_TRITON_TUNING, e.g.
`blocks_per_step=4,min_programs=512`, sets them for the engine): `blocks_per_step`, the
blocks each loop step loads before it updates the softmax (more loads in flight per
program; a step past the row's last block is masked), `min_programs`, the program count
a decode launch splits its rows' blocks up to, and Triton's `num_warps` and `num_stages`.
The defaults (4, 512, 4, 2) are the fastest of the nine settings scripts/device_check.py
timed on an H200 (2026-12-04, docs/attention.md; the kernel as first written was 1, 128, 4, 2).

The kernel is written for the Triton (GPU) lowering and runs anywhere in interpret mode
(`interpret=True`; CPU tests). TPUs run paged_attention_tpu.py instead: Mosaic reaches a
cache left in HBM only by DMA, with the block table in scalar memory.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NEG = -1e30
MIN_TILE = 16        # Triton's dot wants every operand dimension >= 16
MAX_TILE = 64        # query rows per program: keeps the fp32 accumulator within registers
TUNING_ENV = "FASTSERVE_JAX_TRITON_TUNING"


class Tuning(NamedTuple):
    blocks_per_step: int = 4    # blocks loaded per loop step before the softmax update
    min_programs: int = 512     # a decode launch splits each row's blocks until it has about this many programs
    num_warps: int = 4          # Triton's, per program
    num_stages: int = 2         # Triton's software pipelining of the block loop

    def describe(self) -> str:
        return f"b{self.blocks_per_step}p{self.min_programs}w{self.num_warps}s{self.num_stages}"


def tuning() -> Tuning:
    """The kernel's knobs: the defaults, or FASTSERVE_JAX_TRITON_TUNING
    (`blocks_per_step=N,min_programs=N,num_warps=N,num_stages=N`, any may be left out);
    ValueError on anything else."""
    text = os.environ.get(TUNING_ENV, "").strip()
    if not text:
        return Tuning()
    values = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in Tuning._fields or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{TUNING_ENV} takes {'=N,'.join(Tuning._fields)}=N (N >= 1), got {text!r}")
        values[name] = int(value)
    return Tuning(**values)


def _kernel(q_ref, qpos_ref, qseg_ref, ids_ref, bseg_ref, bpos_ref, nblk_ref, layer_ref, k_ref, v_ref, o_ref, m_ref,
            l_ref, *, scale: float, block_size: int, chunk: int, per_step: int):
    """One (row r, KV head h, query tile, context split s) program: blocks [s*chunk, (s+1)*chunk)
    of the row's live ones, `per_step` of them per loop step (chunk is a multiple of it).
    Writes its normalised output and its softmax max and sum."""
    r, h, split = pl.program_id(0), pl.program_id(1), pl.program_id(3)
    q = q_ref[...]                                          # (block_m, D), KV dtype
    qpos = qpos_ref[...]                                    # (block_m,)
    qseg = qseg_ref[...]
    offs = jnp.arange(block_size, dtype=jnp.int32)
    block_m, d = q.shape
    first = split * chunk
    end = jnp.minimum(nblk_ref[r], first + chunk)           # past the split's last live block
    last_col = ids_ref.shape[1] - 1
    layer = layer_ref[0]                                    # an input, so every layer's kernel is one program

    def body(step, carry):
        m, l, acc = carry
        scores, values, masks = [], [], []
        for u in range(per_step):                           # all loads of the step are issued together
            j = first + step * per_step + u
            col = jnp.minimum(j, last_col)                  # a step's tail past the table reads its last column
            b = ids_ref[r, col]
            k = k_ref[layer, b, :, h, :]                    # (block_size, D) straight from the cache
            values.append(v_ref[layer, b, :, h, :])
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            kpos = bpos_ref[r, col] + offs
            mask = (qseg[:, None] == bseg_ref[r, col]) & (kpos[None, :] <= qpos[:, None]) & (j < end)
            scores.append(jnp.where(mask, s, _NEG))
            masks.append(mask)
        m_new = m
        for s in scores:
            m_new = jnp.maximum(m_new, s.max(axis=-1))
        corr = jnp.exp(m - m_new)
        l, acc = l * corr, acc * corr[:, None]
        for s, v, mask in zip(scores, values, masks):
            p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
            l = l + p.sum(axis=-1)
            acc = acc + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                            preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((block_m,), _NEG, jnp.float32), jnp.zeros((block_m,), jnp.float32),
            jnp.zeros((block_m, d), jnp.float32))
    steps = jnp.maximum(end - first + per_step - 1, 0) // per_step
    m, l, acc = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = acc / jnp.where(l > 0, l, 1.0)[:, None]
    m_ref[...] = m
    l_ref[...] = l


def _combine(o, m, l):
    """Merge the context splits (axis 2): o (R, Hkv, S, M, D) normalised per split, m and l
    (R, Hkv, S, M). A split that saw no visible key has l = 0 and weighs nothing."""
    w = jnp.where(l > 0, l * jnp.exp(m - m.max(axis=2, keepdims=True)), 0.0)
    total = w.sum(axis=2)
    return (o * w[..., None]).sum(axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("layer", "interpret", "tune"))
def paged_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, positions: jax.Array, seg: jax.Array,
                    block_ids: jax.Array, block_seg: jax.Array, block_pos: jax.Array, layer: int,
                    interpret: bool = False, tune: Tuning = Tuning()) -> jax.Array:
    """Attention of q over the blocks a launch names, read in place from the caches.

    q: (R, Q, H, D); k_cache, v_cache: (L, num_blocks, block_size, Hkv, D), this launch's
    K/V already written; positions, seg: (R, Q) and block_ids, block_seg, block_pos:
    (R, NB), as in attention.AttnBatch; layer: static index into L (the serving launches
    run their layers as an unrolled loop, sharding/pipeline.py); tune: the kernel's knobs
    (`tuning()`). Returns (R, Q, H, D) in q's dtype.
    """
    r, nq, h, d = q.shape
    _, _, bs, hkv, _ = k_cache.shape
    rows = nq * (h // hkv)                                  # query rows per (row, KV head)
    block_m = min(max(_pow2(rows), MIN_TILE), MAX_TILE)
    qh, qpos, qseg, nblk = query_rows(q.astype(k_cache.dtype), positions, seg, block_seg, hkv, block_m)
    m = qh.shape[2]
    # Context splits (flash-decoding): a decode launch with few rows would otherwise run only
    # R x Hkv programs, too few to fill a GPU; a prefill launch has enough query tiles.
    nb = block_ids.shape[1]
    programs = r * hkv * (m // block_m)
    per_step = tune.blocks_per_step
    splits = 1 if nq > 1 else min(nb, max(1, tune.min_programs // programs))
    chunk = _cdiv(_cdiv(nb, splits), per_step) * per_step   # blocks per split, a multiple of per_step
    splits = _cdiv(nb, chunk)                               # none left empty by the rounding
    whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, t, s: (0,) * a.ndim)
    # the whole cache, indexed by the layer inside the kernel: with the layer in the BlockSpec
    # each of a launch's layers was its own Triton program (the IR differed by that constant),
    # compiled separately on the GPU
    cache_spec = whole(k_cache)
    layer_arr = jnp.full((1,), layer, jnp.int32)
    per_split = lambda *tail: pl.BlockSpec((None, None, None, block_m, *tail),
                                           lambda i, j, t, s: (i, j, s, t, *(0,) * len(tail)))
    o, m_, l_ = pl.pallas_call(
        functools.partial(_kernel, scale=1.0 / float(np.sqrt(d)), block_size=bs, chunk=chunk, per_step=per_step),
        grid=(r, hkv, m // block_m, splits),
        in_specs=[pl.BlockSpec((None, None, block_m, d), lambda i, j, t, s: (i, j, t, 0)),
                  pl.BlockSpec((None, block_m), lambda i, j, t, s: (i, t)),
                  pl.BlockSpec((None, block_m), lambda i, j, t, s: (i, t)),
                  whole(block_ids), whole(block_seg), whole(block_pos), whole(nblk), whole(layer_arr),
                  cache_spec, cache_spec],
        out_specs=[per_split(d), per_split(), per_split()],
        out_shape=[jax.ShapeDtypeStruct((r, hkv, splits, m, d), jnp.float32),
                   jax.ShapeDtypeStruct((r, hkv, splits, m), jnp.float32),
                   jax.ShapeDtypeStruct((r, hkv, splits, m), jnp.float32)],
        interpret=interpret,
        # Triton, not Mosaic GPU (pallas_call's default on GPU, which would stage each
        # BlockSpec'd block, here the whole cache, through shared memory)
        compiler_params=pltriton.CompilerParams(num_warps=tune.num_warps, num_stages=tune.num_stages),
        name="fastserve_paged_attention",
    )(qh, qpos, qseg, block_ids, block_seg, block_pos, nblk, layer_arr, k_cache, v_cache)
    return from_query_rows(o[:, :, 0] if splits == 1 else _combine(o, m_, l_), q)


def query_rows(q: jax.Array, positions: jax.Array, seg: jax.Array, block_seg: jax.Array, hkv: int, block_m: int):
    """A launch's queries as the kernels tile them: per (row, KV head) the row's Q tokens x G
    query heads of the group, token-major, padded to a multiple of block_m. Returns qh (R, Hkv,
    M, D), each query row's position and segment (R, M; padding: segment -1), and each row's
    live block count (R,): the launch builder packs a row's live blocks at the front."""
    r, nq, h, d = q.shape
    g = h // hkv
    rows = nq * g
    m = -(-rows // block_m) * block_m
    # (R, Q, Hkv, G, D) -> (R, Hkv, Q*G, D)
    qh = q.reshape(r, nq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(r, hkv, rows, d)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, m - rows), (0, 0)))
    qpos = jnp.pad(jnp.repeat(positions, g, axis=1), ((0, 0), (0, m - rows)))
    qseg = jnp.pad(jnp.repeat(seg, g, axis=1), ((0, 0), (0, m - rows)), constant_values=-1)
    return qh, qpos, qseg, (block_seg != -2).sum(axis=1).astype(jnp.int32)


def from_query_rows(o: jax.Array, q: jax.Array) -> jax.Array:
    """The kernels' output (R, Hkv, M, D) back to q's shape (R, Q, H, D) and dtype."""
    r, nq, h, d = q.shape
    hkv = o.shape[1]
    g = h // hkv
    out = o[:, :, :nq * g].reshape(r, hkv, nq, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(r, nq, h, d).astype(q.dtype)
