"""Paged attention in plain jnp (jittable on every backend), plus rotary embeddings.

A launch is a batch of R rows of Q query tokens each ("rows" layout):

- decode launch:  R = sequences, Q = 1; each row gathers its own sequence's blocks.
- prefill launch: R = 1, Q = packed tokens of several sequences (segments); the row gathers
  the blocks of all its segments, and the mask keeps each segment to its own keys.

Query token (r, i) may attend key (r, j) iff they belong to the same segment and
pos(key) <= pos(query). Keys beyond a sequence's written length always have a larger
position than any of its queries, so stale slots in a partly filled block are never read.

KV cache layout (per K and V):  (L, num_blocks, block_size, n_kv_heads, head_dim).
Block 0 is the null block (the KV manager's NULL_BLOCK, never handed out): padding tokens
write there and padding block-table entries point there; its owner segment is -2, which
matches no query.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fastserve_jax.models.paged_attention import paged_attention, tuning

_NEG = -1e30


class KVCache(NamedTuple):
    k: jax.Array  # (L, num_blocks, block_size, Hkv, D)
    v: jax.Array  # (L, num_blocks, block_size, Hkv, D)


class AttnBatch(NamedTuple):
    """Where each query token sits and which cache blocks a row reads.

    positions, seg, slots: (R, Q) int32 -- position in its sequence, segment id within the
      row (-1 = padding), flat cache slot to write its K/V (block * block_size + offset).
    block_ids, block_seg, block_pos: (R, NB) int32 -- blocks to gather, the segment owning
      each (-2 for padding), and the position of each block's first token.
    In dense mode (training, reference forward) block_ids is None and keys are the row's
    own tokens.
    """

    positions: jax.Array
    seg: jax.Array
    slots: jax.Array | None = None
    block_ids: jax.Array | None = None
    block_seg: jax.Array | None = None
    block_pos: jax.Array | None = None


def dense_batch(tokens_shape: tuple[int, int]) -> AttnBatch:
    """Causal batch over whole rows starting at position 0 (one segment per row)."""
    r, q = tokens_shape
    pos = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32), (r, q))
    return AttnBatch(positions=pos, seg=jnp.zeros((r, q), jnp.int32))


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """Inverse frequencies, with linear or Llama-3 scaling when given (config.RopeScaling; same
    formulas as HF)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is not None and scaling.rope_type == "linear":
        inv = inv / scaling.factor
    elif scaling is not None:
        low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wl = 2 * np.pi / inv
        scaled = np.where(wl > low_wl, inv / scaling.factor, inv)
        smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_mid = (wl >= high_wl) & (wl <= low_wl)
        inv = np.where(is_mid, mid, scaled)
    return inv.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: (R, Q, H, D); positions: (R, Q). Half-rotation convention (HF Llama)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (R, Q, D/2)
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _attend(q, k, v, q_pos, q_seg, k_pos, k_seg, scale):
    """q: (R, Q, H, D); k, v: (R, K, Hkv, D); positions/segments per token. -> (R, Q, H, D)."""
    r, nq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(r, nq, hkv, h // hkv, d)
    s = jnp.einsum("rqhgd,rkhd->rhgqk", qg, k, preferred_element_type=jnp.float32) * scale
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_pos[:, None, :] <= q_pos[:, :, None])
    s = jnp.where(mask[:, None, None], s, _NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("rhgqk,rkhd->rqhgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(r, nq, h, d).astype(q.dtype)


class HeadSharding(NamedTuple):
    """How a tensor-parallel stage splits the attention heads, for the Pallas kernels: each
    device runs the kernel on its own query heads over its own KV heads (`jax.shard_map`),
    reading its shard of the cache in place. sharding/layout.ModelLayout.head_sharding builds
    it from the rules table (query heads over tp_kv x tp_rep, KV heads over tp_kv)."""

    mesh: Mesh
    heads: tuple[str, ...]       # mesh axes that split the query heads
    kv_heads: tuple[str, ...]    # mesh axes that split the KV heads and the cache
    # Mesh axes that split the groups of a device's several KV heads (12 query heads over 6 KV
    # heads at tp=4: a device holds KV heads 0-2 and query heads 3-5, of groups 1, 2, 2);
    # empty where each device holds whole groups or a single KV head.
    spread: tuple[str, ...] = ()


def shard_heads(fn, heads: HeadSharding):
    """fn(q, k_cache, v_cache, positions, seg, block_ids, block_seg, block_pos) run per head
    shard: q and the output split on their head axis, the caches on their KV-head axis, the
    launch's positions and block table whole on every device.

    The kernel maps query heads to KV heads by GQA groups, in order, so a device's own heads
    must form such groups: they do when it holds whole groups or one KV head. Where `spread`
    splits its KV heads' groups over n devices, the device's h query heads are the slice
    [i*h, (i+1)*h) of its KV heads' groups' n*h query heads (i: its index along `spread`); the
    kernel then runs on all n*h, its own in place and zeros elsewhere, and its own are sliced
    back out: n times the attention arithmetic, the same KV reads."""
    q = PartitionSpec(None, None, heads.heads or None, None)
    cache = PartitionSpec(None, None, None, heads.kv_heads or None, None)

    def in_groups(qs, *rest):
        n = int(np.prod([heads.mesh.shape[a] for a in heads.spread]))
        h, at = qs.shape[2], jax.lax.axis_index(heads.spread) * qs.shape[2]
        groups = jnp.zeros((*qs.shape[:2], n * h, qs.shape[3]), qs.dtype)
        out = fn(jax.lax.dynamic_update_slice_in_dim(groups, qs, at, axis=2), *rest)
        return jax.lax.dynamic_slice_in_dim(out, at, h, axis=2)
    return jax.shard_map(in_groups if heads.spread else fn, mesh=heads.mesh, out_specs=q,
                         in_specs=(q, cache, cache) + (PartitionSpec(),) * 5, check_vma=False)


PALLAS_KERNELS = ("triton", "mosaic")


def pallas_kernel() -> str:
    """The kernel the "pallas" backend runs: "mosaic" (paged_attention_tpu.py) on a TPU,
    "triton" (paged_attention.py) elsewhere, in interpret mode on a CPU. The environment
    variable FASTSERVE_JAX_PALLAS_KERNEL names one instead; on a CPU either runs in its
    interpret mode, which is how the tests run the TPU kernel."""
    platform = jax.default_backend()
    kernel = os.environ.get("FASTSERVE_JAX_PALLAS_KERNEL") or ("mosaic" if platform == "tpu" else "triton")
    if kernel not in PALLAS_KERNELS:
        raise ValueError(f"FASTSERVE_JAX_PALLAS_KERNEL must be one of {', '.join(PALLAS_KERNELS)}, got {kernel!r}")
    if platform != "cpu" and (kernel == "mosaic") != (platform == "tpu"):
        raise ValueError(f"FASTSERVE_JAX_PALLAS_KERNEL={kernel} does not run on {platform} (only in interpret mode "
                         "on a CPU); unset it")
    return kernel


def attention(q, k, v, batch: AttnBatch, cache: KVCache | None, layer, backend: str = "reference",
              heads: HeadSharding | None = None):
    """Write this launch's K/V into the cache, then attend over the launch's blocks: gathered
    into a new array ("reference"), or read in place by a Pallas kernel ("pallas",
    pallas_kernel(): Triton or Mosaic; interpret mode on CPU; needs a static `layer`), per
    head shard where `heads` says the stage is tensor parallel.

    q: (R, Q, H, D); k, v: (R, Q, Hkv, D); layer: scalar index into the cache.
    Returns (out (R, Q, H, D), cache).
    """
    assert backend in ("reference", "pallas"), f"unknown attention backend {backend!r}"
    scale = 1.0 / np.sqrt(q.shape[-1])
    if cache is None:
        out = _attend(q, k, v, batch.positions, batch.seg, batch.positions, batch.seg, scale)
        return out, None
    bs = cache.k.shape[2]
    blk, off = batch.slots // bs, batch.slots % bs
    kc = cache.k.at[layer, blk, off].set(k.astype(cache.k.dtype))
    # values finite: a block's stale tail is masked, with weight 0, and 0 x NaN would be NaN in
    # the next request given that block (until 2026-12-07 one request's NaN did that)
    vc = cache.v.at[layer, blk, off].set(jnp.nan_to_num(v).astype(cache.v.dtype))
    if backend == "pallas":
        if not isinstance(layer, int):
            raise TypeError("the pallas attention backend needs a static layer index (the per-layer serving "
                            "path, sharding/pipeline.stage_forward), not a traced one (nn.scan)")
        if pallas_kernel() == "mosaic":
            from fastserve_jax.models.paged_attention_tpu import paged_attention_tpu as kernel   # TPU only: ~50 ms to import
        else:
            kernel = functools.partial(paged_attention, tune=tuning())
        kernel = functools.partial(kernel, layer=layer, interpret=jax.default_backend() == "cpu")
        out = (kernel if heads is None else shard_heads(kernel, heads))(
            q, kc, vc, batch.positions, batch.seg, batch.block_ids, batch.block_seg, batch.block_pos)
        return out, KVCache(kc, vc)
    return gathered_attention(q, kc, vc, batch, layer), KVCache(kc, vc)


def gathered_attention(q, kc, vc, batch: AttnBatch, layer):
    """The reference path's read: each row's blocks gathered from the caches (L, num_blocks,
    block_size, Hkv, D) into a new (R, NB x block_size, Hkv, D) array, then attended over."""
    r, nb = batch.block_ids.shape
    bs = kc.shape[2]
    kg = kc[layer, batch.block_ids].reshape(r, nb * bs, *kc.shape[3:])  # (R, NB*bs, Hkv, D)
    vg = vc[layer, batch.block_ids].reshape(r, nb * bs, *vc.shape[3:])
    k_pos = (batch.block_pos[:, :, None] + jnp.arange(bs, dtype=jnp.int32)).reshape(r, nb * bs)
    k_seg = jnp.repeat(batch.block_seg, bs, axis=1)
    return _attend(q, kg.astype(q.dtype), vg.astype(q.dtype), batch.positions, batch.seg, k_pos, k_seg,
                   1.0 / np.sqrt(q.shape[-1]))
