"""The Pallas paged-attention kernels (interpret mode on CPU: Triton's, and the TPU kernel in
Pallas's TPU interpret mode) against the reference jnp path.

Launches are built by hand in the launch builder's layout (runner/launch.py): decode rows
with ragged context lengths and a padding row (null block only), and packed prefill rows
holding chunks of several sequences, one of them a later chunk of a longer prompt (chunked
prefill: its queries read blocks an earlier launch wrote). Both backends write the same K/V
and must agree on every real query token: 1e-5 in float32; in bfloat16 2e-2 absolute (the
kernel keeps scores and the output accumulator in fp32 as the reference does, but sums in
another order over blocks, so results differ by a few bf16 ulps of O(1) values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax.models.attention import AttnBatch, KVCache, attention

L, NUM_BLOCKS, BS, D = 2, 40, 4, 16
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


@pytest.fixture(params=["triton", "mosaic"])
def kernel(request, monkeypatch):
    """The test on both kernels (attention.pallas_kernel)."""
    monkeypatch.setenv("FASTSERVE_JAX_PALLAS_KERNEL", request.param)
    return request.param


def _tables(rng, lengths):
    """Distinct non-null blocks per sequence, enough for `lengths` tokens."""
    free = list(rng.permutation(np.arange(1, NUM_BLOCKS)))
    return [np.array([free.pop() for _ in range(-(-n // BS))], np.int32) for n in lengths]


def _decode_batch(rng, lengths, rows):
    """One decode row per context length (its last token is the query), padded to `rows`."""
    tables = _tables(rng, lengths)
    nb = max(len(t) for t in tables) + 1
    pos, seg, slots = np.zeros((rows, 1), np.int32), np.full((rows, 1), -1, np.int32), np.zeros((rows, 1), np.int32)
    ids, bseg = np.zeros((rows, nb), np.int32), np.full((rows, nb), -2, np.int32)
    for i, (n, t) in enumerate(zip(lengths, tables)):
        p = n - 1
        pos[i], seg[i], slots[i] = p, 0, t[p // BS] * BS + p % BS
        ids[i, :len(t)], bseg[i, :len(t)] = t, 0
    bpos = np.broadcast_to(np.arange(nb, dtype=np.int32) * BS, (rows, nb)).copy()
    return AttnBatch(pos, seg, slots, ids, bseg, bpos)


def _prefill_batch(rng, chunks, rows, q):
    """Chunks (start position, tokens) of several sequences packed into rows of q tokens; each
    row reads, per sequence it holds, that sequence's blocks up to its last token there."""
    tables = _tables(rng, [p0 + n for p0, n in chunks])
    t = rows * q
    pos, seg, slots = np.zeros(t, np.int32), np.full(t, -1, np.int32), np.zeros(t, np.int32)
    row_blocks = [[] for _ in range(rows)]
    at = 0
    for i, ((p0, n), table) in enumerate(zip(chunks, tables)):
        p = np.arange(p0, p0 + n, dtype=np.int32)
        pos[at:at + n], seg[at:at + n], slots[at:at + n] = p, i, table[p // BS] * BS + p % BS
        for row in range(at // q, (at + n - 1) // q + 1):
            last = min(at + n, (row + 1) * q) - 1
            row_blocks[row].append((i, table[:-(-(p0 + last - at + 1) // BS)]))
        at += n
    nb = max(sum(len(tb) for _, tb in rb) for rb in row_blocks) + 2
    ids, bseg, bpos = np.zeros((rows, nb), np.int32), np.full((rows, nb), -2, np.int32), np.zeros((rows, nb), np.int32)
    for row, rb in enumerate(row_blocks):
        at = 0
        for i, tb in rb:
            ids[row, at:at + len(tb)], bseg[row, at:at + len(tb)] = tb, i
            bpos[row, at:at + len(tb)] = np.arange(len(tb)) * BS
            at += len(tb)
    return AttnBatch(pos.reshape(rows, q), seg.reshape(rows, q), slots.reshape(rows, q), ids, bseg, bpos)


def _both(batch: AttnBatch, heads: int, kv_heads: int, dtype: str, layer: int = 1, seed: int = 0):
    """(reference output, kernel output, real-token mask) for one launch on a random cache."""
    rng = np.random.default_rng(seed)
    r, nq = batch.positions.shape
    draw = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype)
    cache = KVCache(draw(L, NUM_BLOCKS, BS, kv_heads, D), draw(L, NUM_BLOCKS, BS, kv_heads, D))
    q, k, v = draw(r, nq, heads, D), draw(r, nq, kv_heads, D), draw(r, nq, kv_heads, D)
    b = AttnBatch(*(jnp.asarray(a) for a in batch))
    run = jax.jit(lambda q, k, v, b, c, backend: attention(q, k, v, b, c, layer, backend), static_argnums=5)
    ref, ref_cache = run(q, k, v, b, cache, "reference")
    out, out_cache = run(q, k, v, b, cache, "pallas")
    np.testing.assert_array_equal(np.asarray(ref_cache.k, np.float32), np.asarray(out_cache.k, np.float32))
    return np.asarray(ref, np.float32), np.asarray(out, np.float32), np.asarray(batch.seg) >= 0


# Each GQA group once and each dtype at least once per kernel in the default suite; the other
# three pairs (0.5-1.8 s each in interpret mode) run with -m slow.
DECODE_CASES = [pytest.param(h, kv, dtype, marks=() if (i + (dtype == "bfloat16")) % 2 == 0 else pytest.mark.slow)
                for i, (h, kv) in enumerate([(4, 4), (8, 2), (6, 1)]) for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize("heads,kv_heads,dtype", DECODE_CASES)
def test_decode_matches_reference(heads, kv_heads, dtype, kernel):
    """GQA groups 1, 4 and 6 (not a power of two), ragged lengths incl. a one-token context
    and a full last block, and a padding row that reads only the null block."""
    batch = _decode_batch(np.random.default_rng(1), [1, 7, 12, 23], rows=5)
    ref, out, real = _both(batch, heads, kv_heads, dtype)
    np.testing.assert_allclose(out[real], ref[real], atol=TOL[dtype], rtol=0)
    assert np.all(out[~real] == 0)          # padding gets zeros, never NaN


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_chunked_prefill_matches_reference(dtype, kernel):
    """Three sequences packed over two rows of 16 tokens: a second chunk of a 13-token prompt
    (positions 9-12, reading the blocks its first chunk wrote), a fresh 15-token prompt that
    spans both rows, a fresh 6-token one, and 7 padding tokens."""
    batch = _prefill_batch(np.random.default_rng(2), [(9, 4), (0, 15), (0, 6)], rows=2, q=16)
    ref, out, real = _both(batch, 8, 2, dtype)
    np.testing.assert_allclose(out[real], ref[real], atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_a_blocks_stale_nan_tail_reaches_no_output(backend, monkeypatch):
    """An 8-token request whose values are NaN (a prompt read out of the embedding, values
    that overflowed) fills two blocks; a 5-token request given the same blocks next attends
    over their stale tail, masked with weight 0: its output stays finite (until 2026-12-07 the
    stale NaN, times 0, made it NaN: the cache now keeps written values finite)."""
    monkeypatch.setenv("FASTSERVE_JAX_PALLAS_KERNEL", "triton")
    first, second = (AttnBatch(*(jnp.asarray(a) for a in _prefill_batch(np.random.default_rng(3), [(0, n)], rows=1,
                                                                         q=8))) for n in (8, 5))
    assert (first.block_ids[:, :2] == second.block_ids[:, :2]).all()
    zeros = jnp.zeros((L, NUM_BLOCKS, BS, 2, D), jnp.float32)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 8, h, D), dtype=np.float32)) for h in (4, 2, 2))
    run = jax.jit(lambda q, k, v, b, c: attention(q, k, v, b, c, 1, backend))
    _, cache = run(q, k, jnp.full_like(v, jnp.nan), first, KVCache(zeros, zeros))
    out, _ = run(q, k, v, second, cache)
    assert np.isfinite(np.asarray(out)[np.asarray(second.seg) >= 0]).all()


def test_query_tiles_split_a_long_row(kernel):
    """A row of 64 tokens x 4 query heads per KV head is 256 query rows: four tiles of 64
    (Triton), two of 128 (TPU)."""
    batch = _prefill_batch(np.random.default_rng(3), [(0, 40), (5, 24)], rows=1, q=64)
    ref, out, real = _both(batch, 8, 2, "float32")
    np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=0)


def _check_block_walks():
    """The kernel against the reference (fp32) where a walk over blocks can go wrong: decode
    rows of 1, 2, 3 and 6 live blocks of 4 tokens, the same with the longest row filling the
    block table (no padding column after it), and a packed prefill; nothing non-finite."""
    decode = _decode_batch(np.random.default_rng(1), [1, 7, 12, 23], rows=5)
    full = decode._replace(block_ids=decode.block_ids[:, :-1], block_seg=decode.block_seg[:, :-1],
                           block_pos=decode.block_pos[:, :-1])
    for batch in (decode, full, _prefill_batch(np.random.default_rng(2), [(9, 4), (0, 15), (0, 6)], rows=2, q=16)):
        ref, out, real = _both(batch, 8, 2, "float32")
        np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=0)
        assert np.all(np.isfinite(out))


@pytest.mark.parametrize("keys", [pytest.param(4, marks=pytest.mark.slow), 12,     # 3 blocks a step: partial
                                  pytest.param(16, marks=pytest.mark.slow)])       # steps in the default suite
def test_tpu_kernel_in_steps_of_several_blocks(keys, monkeypatch):
    """The Mosaic kernel copying and scoring 1, 3 or 4 blocks of 4 tokens per step (the
    default, 128 keys, takes these launches' rows in one step): decode rows of 1, 2, 3 and 6
    live blocks end on a full step, a partial one, or within the first, also where the longest
    row fills the block table (no padding column after it); and a packed prefill."""
    import functools

    import fastserve_jax.models.paged_attention_tpu as tpu

    monkeypatch.setenv("FASTSERVE_JAX_PALLAS_KERNEL", "mosaic")
    monkeypatch.setattr(tpu, "paged_attention_tpu", functools.partial(tpu.paged_attention_tpu, keys_per_step=keys))
    _check_block_walks()


@pytest.mark.parametrize("tune", ["blocks_per_step=2,min_programs=1", "blocks_per_step=1,min_programs=128",
                                  "blocks_per_step=3,min_programs=64"])
def test_triton_kernel_tuning(tune, monkeypatch):
    """The Triton kernel's knobs (FASTSERVE_JAX_TRITON_TUNING) away from the defaults (4 blocks
    per step, 512 programs: every other test runs them): 1, 2 or 3 blocks per loop step,
    with no context split, the first written split and many splits (each a multiple of the step,
    the last one partly past the table): decode rows of 1, 2, 3 and 6 live blocks, the table
    with and without a padding column after the longest, and a packed prefill."""
    import fastserve_jax.models.attention as attention_module
    from fastserve_jax.models.paged_attention import paged_attention, tuning

    monkeypatch.setenv("FASTSERVE_JAX_PALLAS_KERNEL", "triton")
    monkeypatch.setenv("FASTSERVE_JAX_TRITON_TUNING", tune)
    seen = []
    monkeypatch.setattr(attention_module, "paged_attention", lambda *a, **kw: seen.append(kw["tune"]) or
                        paged_attention(*a, **kw))
    _check_block_walks()
    assert seen and set(seen) == {tuning()} and tuning() != type(tuning())()


@pytest.mark.parametrize("bad", ["blocks_per_step=0", "blocks=4", "min_programs=x"])
def test_triton_tuning_refuses_bad_settings(bad, monkeypatch):
    from fastserve_jax.models.paged_attention import tuning

    monkeypatch.setenv("FASTSERVE_JAX_TRITON_TUNING", bad)
    with pytest.raises(ValueError, match="FASTSERVE_JAX_TRITON_TUNING"):
        tuning()


def test_traced_layer_is_refused():
    batch = AttnBatch(*(jnp.asarray(a) for a in _decode_batch(np.random.default_rng(4), [3], rows=1)))
    z = jnp.zeros((L, NUM_BLOCKS, BS, 1, D))
    with pytest.raises(TypeError, match="static layer index"):
        jax.jit(lambda i: attention(jnp.zeros((1, 1, 1, D)), jnp.zeros((1, 1, 1, D)), jnp.zeros((1, 1, 1, D)),
                                    batch, KVCache(z, z), i, "pallas"))(jnp.int32(0))


@pytest.mark.parametrize("q_len,tune", [(1, ()), (64, ()), (1, (4, 512, 8, 3))])
def test_kernel_lowers_to_triton_for_cuda(q_len, tune):
    """Cross-lowered on CPU for a GPU: the kernel goes through Pallas's Triton lowering (not
    Mosaic GPU), in bf16 with 7 query heads per KV head, and exports the way the engine's
    program cache exports it. (Triton's own compile to PTX happens on a GPU, untested here.)
    It lowers under an abstract CUDA device: jax 0.11 will not lower a GPU kernel on a machine
    without one otherwise (0.10 did not ask)."""
    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from fastserve_jax.models.paged_attention import Tuning, paged_attention
    from fastserve_jax.runner.export_cache import DISABLED_CHECKS

    r, nb = 2, 4
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    cache = jax.ShapeDtypeStruct((L, NUM_BLOCKS, 16, 2, 64), jnp.bfloat16)
    args = (jax.ShapeDtypeStruct((r, q_len, 14, 64), jnp.bfloat16), cache, cache,
            i32(r, q_len), i32(r, q_len), i32(r, nb), i32(r, nb), i32(r, nb))
    fn = jax.jit(lambda *a: paged_attention(*a, layer=1, tune=Tuning(*tune)))
    gpu = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                                                    platform="cuda"))
    with use_abstract_mesh(gpu):
        exp = export.export(fn, platforms=["cuda"], disabled_checks=DISABLED_CHECKS)(*args)
    assert "__gpu$xla.gpu.triton" in exp.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_every_layer_runs_one_kernel_program(platform):
    """The layer is an input of the kernel, not a constant of its IR: a launch's layers lower to
    the same Triton (GPU) or Mosaic (TPU) program, one compile rather than one per layer (the
    H200 run of 2026-12-04 spent 58 s compiling 9 Pallas launches of Llama-3-8B's 32 layers
    when each layer was its own program, 37 s on the reference path)."""
    import re

    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from fastserve_jax.models.paged_attention import paged_attention
    from fastserve_jax.models.paged_attention_tpu import paged_attention_tpu
    from fastserve_jax.runner.export_cache import DISABLED_CHECKS

    kernel, kind, d = {"cuda": (paged_attention, "NVIDIA H200", 64), "tpu": (paged_attention_tpu, "TPU v5 lite", 128)}[
        platform]
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    cache = jax.ShapeDtypeStruct((L, NUM_BLOCKS, 16, 2, d), jnp.bfloat16)
    args = (jax.ShapeDtypeStruct((2, 1, 4, d), jnp.bfloat16), cache, cache, i32(2, 1), i32(2, 1), i32(2, 4),
            i32(2, 4), i32(2, 4))
    fn = jax.jit(lambda *a: [kernel(*a, layer=layer) for layer in range(L)])
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(device_kind=kind, num_cores=None,
                                                                     platform=platform))
    with use_abstract_mesh(mesh):
        txt = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)(*args).mlir_module()
    calls = [ln for ln in txt.splitlines() if "__gpu$xla.gpu.triton" in ln or "tpu_custom_call" in ln]
    programs = {re.sub(r"%[\w#:]+", "", ln.split("{", 1)[1]) for ln in calls}     # the call's config, not its operands
    assert L > 1 and len(calls) == L and len(programs) == 1


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kv_heads", [4, 8])
def test_kernels_lower_per_head_shard_under_tensor_parallelism(platform, kv_heads):
    """Cross-lowered on CPU as tensor-parallel launches at tp=8 (tp_kv=4 x tp_rep=2), the way
    the engine wraps them (attention.shard_heads): 32 query heads over 4 KV heads (each device
    holds 1 KV head and 4 of its 8 query heads), and over 8 KV heads (each device holds 2 KV
    heads and half of each one's group: HeadSharding.spread). Each device's call reads its own
    shard of the cache in place, and the Triton grid has rows x its KV heads programs, not
    rows x all of them."""
    import re

    from jax import export
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    from fastserve_jax.models.attention import HeadSharding, shard_heads
    from fastserve_jax.models.paged_attention import paged_attention
    from fastserve_jax.models.paged_attention_tpu import paged_attention_tpu
    from fastserve_jax.runner.export_cache import DISABLED_CHECKS

    kernel, kind, d = {"cuda": (paged_attention, "NVIDIA H200", 64),
                       "tpu": (paged_attention_tpu, "TPU v5 lite", 128)}[platform]
    r, nb = 2, 4
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    cache = jax.ShapeDtypeStruct((L, NUM_BLOCKS, 16, kv_heads, d), jnp.bfloat16)
    args = (jax.ShapeDtypeStruct((r, 1, 32, d), jnp.bfloat16), cache, cache, i32(r, 1), i32(r, 1), i32(r, nb), i32(r, nb),
            i32(r, nb))
    # Auto axes, as the engine's meshes have (jax 0.11 makes an AbstractMesh's axes Explicit by default)
    mesh = AbstractMesh((4, 2), ("tp_kv", "tp_rep"), axis_types=(AxisType.Auto,) * 2,
                        abstract_device=AbstractDevice(device_kind=kind, num_cores=None, platform=platform))
    heads = HeadSharding(mesh, ("tp_kv", "tp_rep"), ("tp_kv",), () if kv_heads == 4 else ("tp_rep",))
    fn = jax.jit(shard_heads(functools.partial(kernel, layer=1), heads))
    with use_abstract_mesh(mesh):
        text = export.export(fn, platforms=[platform], disabled_checks=DISABLED_CHECKS)(*args).mlir_module()
    call = next(ln for ln in text.splitlines() if "__gpu$xla.gpu.triton" in ln or "tpu_custom_call" in ln)
    assert ("triton" in call) == (platform == "cuda")
    own = kv_heads // 4                   # the device's KV heads, read in place from its shard of the cache
    assert f"tensor<{L}x{NUM_BLOCKS}x16x{own}x{d}xbf16>" in call and f"x16x{kv_heads}x{d}xbf16" not in call
    if platform == "cuda":
        assert re.search(r"grid_x = (\d+)", call).group(1) == str(r * own)     # rows x own KV heads


@pytest.mark.parametrize("q_len,rows,blocks", [(1, 2, 4), (512, 1, 40)])
def test_tpu_kernel_lowers_to_mosaic(q_len, rows, blocks):
    """Cross-lowered on CPU for a TPU, as the engine's program cache exports it: the kernel
    goes through Pallas's Mosaic lowering (scalar prefetch, DMAs from the caches left in HBM)
    in bf16 with 7 query heads per KV head and head_dim 128, for a decode launch and a 512-token
    prefill. (Mosaic's own compile happens on a TPU, untested here.)"""
    from jax import export

    from fastserve_jax.models.paged_attention_tpu import paged_attention_tpu
    from fastserve_jax.runner.export_cache import DISABLED_CHECKS

    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    cache = jax.ShapeDtypeStruct((L, NUM_BLOCKS, 16, 2, 128), jnp.bfloat16)
    args = (jax.ShapeDtypeStruct((rows, q_len, 14, 128), jnp.bfloat16), cache, cache,
            i32(rows, q_len), i32(rows, q_len), i32(rows, blocks), i32(rows, blocks), i32(rows, blocks))
    exp = export.export(jax.jit(lambda *a: paged_attention_tpu(*a, layer=1)), platforms=["tpu"],
                        disabled_checks=DISABLED_CHECKS)(*args)
    assert "tpu_custom_call" in exp.mlir_module()
