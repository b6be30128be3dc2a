"""Where tensor and pipeline parallelism put things, on 8 virtual CPU devices: weights and KV
actually sharded, Megatron's collectives only, layer weights read in place, the rules
table and meshes."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fastserve_jax.llm import LLM
from fastserve_jax.runner.keys import DecodeKey
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.sharding.layout import ModelLayout
from fastserve_jax.sharding.mesh import ParallelConfig, build_meshes, ordered_devices
from fastserve_jax.sharding.rules import ShardingRules
from parallel_setup import KW, four_layer_checkpoints  # noqa: F401  (a fixture)

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")


def _shard_shapes(x) -> set[tuple[int, ...]]:
    return {tuple(s.data.shape) for s in x.addressable_shards}


def test_weights_and_kv_cache_are_sharded_not_replicated(four_layer_checkpoints):
    path = four_layer_checkpoints["llama"]
    # tp=4 over 2 KV heads: KV heads split 2 ways, each held by the 2 devices whose query heads read it
    llm = LLM(path, warmup=False, num_device_blocks=16, tensor_parallel_size=4, pipeline_parallel_size=2, **KW)
    e = llm.engine
    c = e.model_cfg                              # L=4, H=64, 4 heads x 16, 2 KV heads, MLP 128, vocab 256
    assert (e.layout.meshes.tp_kv, e.layout.meshes.tp_rep) == (2, 2)
    for st in e.runner.stages:
        assert len(st.params["layers"]) == 2                                # L/pp separate per-layer trees
        for layer in st.params["layers"]:
            a = layer["attn"]
            assert _shard_shapes(a["q_proj"]["weight"]) == {(16, 64)}       # (Hq*D/tp, H)
            assert _shard_shapes(a["k_proj"]["weight"]) == {(16, 64)}       # (Hkv*D/2, H)
            assert _shard_shapes(a["o_proj"]["weight"]) == {(64, 16)}
            assert _shard_shapes(layer["mlp"]["down_proj"]["weight"]) == {(64, 32)}
            assert set(a["q_proj"]["weight"].sharding.device_set) == set(st.devices)
        assert _shard_shapes(st.cache.k) == {(2, 16, 8, 1, c.head_dim)}     # (L/pp, blocks, bs, Hkv/2, D)
        # every KV-head shard is held by exactly tp_rep = 2 devices
        held = {}
        for s in st.cache.k.addressable_shards:
            held.setdefault(s.index[3].start, set()).add(s.device)
        assert sorted(len(v) for v in held.values()) == [2, 2]
        assert set(st.cache.k.sharding.device_set) == set(st.devices)
    assert "embed_tokens" in e.runner.stages[0].params and "embed_tokens" not in e.runner.stages[1].params
    assert "lm_head" in e.runner.stages[1].params and "lm_head" not in e.runner.stages[0].params
    assert _shard_shapes(e.runner.stages[1].params["lm_head"]["weight"]) == {(64, 64)}   # vocab / tp


@pytest.mark.parametrize("arch,backend", [("llama", "reference"), ("opt", "reference"), ("llama", "pallas")])
def test_tensor_parallel_step_has_megatron_collectives_only(four_layer_checkpoints, arch, backend):
    """One all-reduce after attention and one after the MLP in every layer, no weight
    gathers; outside the layers only the sharded-vocabulary embedding and logits. With the
    Pallas kernel too: it runs on each device's head shard, gathering neither the query
    heads nor the cache."""
    path = four_layer_checkpoints[arch]
    e = LLM(path, warmup=False, num_device_blocks=16, tensor_parallel_size=4, attention_backend=backend, **KW).engine
    st = e.runner.stages[0]
    x, batch, idx = e.runner.abstract_args(DecodeKey(4, 16))
    hlo = st.fn.lower(st.params, st.cache, x, batch, idx).compile().as_text()
    block = {"llama": "LlamaBlock", "opt": "OPTBlock"}[arch]
    ops = {"all-reduce": [], "all-gather": [], "all-to-all": [], "collective-permute": []}
    for line in hlo.splitlines():
        for op, found in ops.items():
            if re.search(rf"\b{op}(-start)?\(", line):
                m = re.search(r'op_name="([^"]*)"', line)
                found.append(m.group(1) if m else "")
    in_layers = {op: [n for n in names if f"/{block}/" in n] for op, names in ops.items()}
    assert len(in_layers["all-reduce"]) == 2 * len(st.params["layers"]) == 8, ops["all-reduce"]
    assert sorted(set(in_layers["all-reduce"])) == sorted(
        {"llama": [f"jit(forward)/{block}/attn/o_proj/dot_general", f"jit(forward)/{block}/mlp/down_proj/dot_general"],
         "opt": [f"jit(forward)/{block}/fc2/dot_general", f"jit(forward)/{block}/out_proj/dot_general"]}[arch])
    for op in ("all-gather", "all-to-all", "collective-permute"):
        assert in_layers[op] == [], op
    # outside the layers: the embedding's all-reduce and the logits' gather over the vocabulary
    assert len(ops["all-reduce"]) == 9 and len(ops["all-gather"]) == 1


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_launch_reads_layer_weights_in_place(four_layer_checkpoints, tp, pp):
    """The compiled launch has no loop over the layers and never materializes a layer
    weight: each is a parameter of the step, read where it lies (under nn.scan XLA copied
    every layer's slices out of the stacked weights on every launch)."""
    path = four_layer_checkpoints["llama"]
    e = LLM(path, warmup=False, num_device_blocks=16, tensor_parallel_size=tp, pipeline_parallel_size=pp, **KW).engine
    for st in e.runner.stages:
        x, batch, idx = e.runner.abstract_args(DecodeKey(4, 16), st.index)
        # compiled multi-threaded, as the engine runs: the suite's conftest turns XLA:CPU's
        # threads off, and single-threaded YNNPACK dots copy an (out, in) weight into the
        # other layout first
        hlo = st.fn.lower(st.params, st.cache, x, batch, idx).compile(
            compiler_options={"xla_cpu_multi_thread_eigen": True}).as_text()
        # no loop over the layers; the one loop allowed is XLA:CPU's legacy emitter writing the
        # KV cache (a scatter lowered as a loop: the suite's conftest selects that emitter)
        loops = [ln for ln in hlo.splitlines() if re.search(r"\bwhile\(", ln) and "/scatter" not in ln]
        assert loops == [], loops
        shard = lambda a: a.sharding.shard_shape(a.shape)
        weights = {f"f32[{','.join(map(str, shard(w)))}]" for w in jax.tree.leaves(st.params["layers"]) if w.ndim == 2}
        made = [ln for ln in hlo.splitlines() if " = " in ln and "parameter(" not in ln
                and ln.split(" = ", 1)[1].split("{")[0].split(" ")[0] in weights]
        assert made == [], made


# -- the rules table and meshes -----------------------------------------------------------------

def test_rules_map_logical_axes_and_reject_collisions():
    meshes = build_meshes(ParallelConfig(4, 2), num_kv_heads=2)
    rules = ShardingRules()
    assert rules.spec(("layers", "embed", "heads"), meshes.mesh) == P("pp", None, ("tp_kv", "tp_rep"))
    assert rules.spec(("layers", "embed", "kv_heads"), meshes.mesh) == P("pp", None, "tp_kv")
    assert rules.spec(("layers", "embed", "heads"), meshes.stages[0]) == P(None, None, ("tp_kv", "tp_rep"))
    assert rules.spec(("vocab", "embed"), meshes.stages[0], shape=(250, 64)) == P()     # 250 % 4: replicated
    with pytest.raises(ValueError, match="both map to mesh axis"):
        rules.spec(("heads", "mlp"), meshes.mesh)
    with pytest.raises(KeyError, match="no sharding rule"):
        rules.spec(("nope",), meshes.mesh)
    with pytest.raises(ValueError, match="does not have"):
        ShardingRules({"heads": "model"})
    with pytest.raises(ValueError, match="twice"):
        ShardingRules({"heads": ("tp_kv", "tp_kv")})


@pytest.mark.parametrize("heads,kv_heads,tp,want", [
    (8, 8, 2, (("tp_kv",), ("tp_kv",), ())),                        # tp divides the KV heads: whole groups
    (16, 4, 8, (("tp_kv", "tp_rep"), ("tp_kv",), ())),              # one KV head per device, on 2 devices
    (8, 1, 4, (("tp_rep",), (), ())),                               # MQA: the one KV head on every device
    (12, 6, 4, (("tp_kv", "tp_rep"), ("tp_kv",), ("tp_rep",))),     # 3 KV heads per device, groups split
])
def test_head_sharding_from_the_rules(heads, kv_heads, tp, want):
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=16 * heads, intermediate_size=128, num_layers=2,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=16, max_position_embeddings=128)
    layout = ModelLayout(cfg, ParallelConfig(tp, 1))
    hs = layout.head_sharding(0)
    assert (hs.heads, hs.kv_heads, hs.spread) == want and hs.mesh is layout.meshes.stages[0]
    assert ModelLayout(cfg, ParallelConfig(1, 2)).head_sharding(1) is None     # one device per stage: no split


def test_parallel_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of tensor_parallel_size=4"):
        ParallelConfig(4, 1).check_model(num_layers=4, num_heads=6, intermediate_size=128)
    with pytest.raises(ValueError, match="num_layers=3 is not a multiple of pipeline_parallel_size=2"):
        ParallelConfig(1, 2).check_model(num_layers=3, num_heads=4, intermediate_size=128)
    # the sizes that fit are named, as docs/parallelism.md says (they were not until 2026-12-07)
    with pytest.raises(ValueError, match=r"the pipeline sizes that divide it: 1, 2, 4, 7, 14, 28\)"):
        ParallelConfig(1, 8).check_model(num_layers=28, num_heads=4, intermediate_size=128)
    with pytest.raises(ValueError, match="positive integer"):
        ParallelConfig(0, 1)
    with pytest.raises(ValueError, match="only 8 are visible"):
        ordered_devices(16)


def test_stages_span_processes_evenly():
    """Across processes a stage takes the same share of every process's devices, so nothing a
    stage hands on crosses hosts."""
    class Dev:
        def __init__(self, p, i):
            self.process_index, self.id, self.platform = p, i, "cpu"

        def __repr__(self):
            return f"p{self.process_index}d{self.id}"

    devs = [Dev(p, i) for p in (0, 1) for i in range(4)]
    order = ordered_devices(8, devs)
    grid = np.array([repr(d) for d in order]).reshape(4, 2)           # pp=4 stages x tp=2
    assert all({g[0][:2], g[1][:2]} == {"p0", "p1"} for g in grid)
    with pytest.raises(ValueError, match="evenly"):
        ordered_devices(3, devs)
    with pytest.raises(ValueError, match=r"= 1 devices cannot be spread evenly over 2 processes.*-tp / -pp whose "
                                         r"product is a multiple of 2"):
        ordered_devices(1, devs)         # a multi-host serve without -tp said only "1 devices cannot be spread ..."
    # -tp 1 -pp 2 over two processes put each stage on one process, and the engine failed at start
    # deep in JAX ("If the Array has no addressable shards, dtype must be provided"; a probe, 2026-12-07)
    with pytest.raises(ValueError, match="tensor_parallel_size 1 is not a multiple of the 2 processes"):
        ordered_devices(2, devs, tp=1)
    assert ordered_devices(4, devs, tp=2) == order[:4]


def _replicated_kv_heads(vals: np.ndarray):
    """(shardings, caches) of tp=4 x pp=2 over 2 KV heads (tp_kv=2, tp_rep=2): each stage's
    cache (layers, blocks, block size, kv heads, head dim) splits on KV heads over tp_kv and
    is replicated over tp_rep, as ModelLayout lays it out."""
    from jax.sharding import NamedSharding
    from fastserve_jax.models.attention import KVCache
    from fastserve_jax.models.axes import CACHE_AXES

    meshes = build_meshes(ParallelConfig(4, 2), num_kv_heads=2)
    shardings = [NamedSharding(m, ShardingRules().spec(CACHE_AXES, m, vals.shape)) for m in meshes.stages]
    return shardings, [KVCache(jax.device_put(vals + s, sh), jax.device_put(-vals - s, sh))
                       for s, sh in enumerate(shardings)]


@pytest.mark.parametrize("path,block_size", [("fused", 4), ("device_put", 4), ("fused", 3)])
def test_swapped_kv_reaches_host_memory_once(path, block_size):
    """A KV head read by tp_rep = 2 devices goes to host memory once, not once per device: the
    host copy of a swap-out holds the logical bytes of its blocks (each device writes half of
    its replica, split on block_size, or on head_dim where 2 does not divide block_size), on
    both stages and both copy paths; the swap-in restores the replicated blocks, with nothing
    compiled after the warm-up's jobs ran once."""
    from fastserve_jax.runner import kv_transfer as kt
    from fastserve_jax.runner.compile_guard import CompileCounter
    from fastserve_jax.runner.compiler import run_jobs

    vals = np.random.default_rng(2).normal(size=(2, 16, block_size, 2, 8)).astype(np.float32)
    shardings, caches = _replicated_kv_heads(vals)
    block = 2 * 2 * (2 * block_size * 2 * 8 * 4)     # K and V x 2 stages x (layers, bs, kv heads, D) float32
    with kt.forced_copy_path(path):
        t = kt.KVTransfer(shardings, max_blocks=8, block_bytes=block, cache_shape=vals.shape)
    run_jobs(t.compile_jobs(caches))
    caches = t.run_once(caches)
    src, dst = [3, 5, 7, 9, 11, 13, 15], [1, 2, 4, 6, 8, 10, 12]
    with CompileCounter() as cc:
        t.swap_out(caches, "r", tuple(src))
        held = [x for run in t.host_runs("r") for part in run for x in part]
        assert all(x.sharding.memory_kind == "pinned_host" for x in held)
        host_bytes = sum(s.data.nbytes for x in held for s in x.addressable_shards)
        t.start_swap_in("r", tuple(dst))
        caches = t.land_swap_in(caches, "r")
    assert host_bytes == len(src) * block, host_bytes / (len(src) * block)
    assert cc.count == 0
    for s, (c, sh) in enumerate(zip(caches, shardings)):
        assert c.k.sharding == sh and c.k.sharding.memory_kind == "device"
        np.testing.assert_array_equal(np.asarray(c.k)[:, dst], vals[:, src] + s)
        np.testing.assert_array_equal(np.asarray(c.v)[:, dst], -vals[:, src] - s)
    assert t.fused(len(src)) == (path == "fused") and t.bytes_out == t.bytes_in == len(src) * block
    assert t._block_share(caches) == block // 2 // 2 // 2     # a stage's half, a KV head's half, of that half


@pytest.mark.parametrize("kv_heads,head_dim,block_size,split", [
    (2, 16, 8, "block_size"),     # tp_rep = 2 divides block_size
    (1, 8, 2, "head_dim"),        # MQA at tp=4: tp_rep = 4 does not divide block_size 2, but head_dim 8
    (1, 6, 2, None),              # neither: the host copy stays replicated, tp_rep = 4 copies
])
def test_host_copy_splits_replicated_kv_heads_and_the_host_pool_counts_its_bytes(kv_heads, head_dim, block_size,
                                                                                 split, monkeypatch):
    """The host copy's layout (sharding/host_copy.py), and the host pool sized in the bytes
    that copy really takes: the logical block where it splits, tp_rep times that where it cannot
    (no dimension divides, or the mesh spans processes, where it keeps the cache's sharding)."""
    from jax.sharding import Mesh
    from fastserve_jax.config import EngineConfig
    from fastserve_jax.kv_sizing import auto_num_host_blocks, host_block_bytes, kv_block_bytes
    from fastserve_jax.models.axes import CACHE_AXES
    from fastserve_jax.sharding.host_copy import host_copy_sharding

    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=128)
    ecfg = EngineConfig(max_model_len=128, block_size=block_size, dtype="float32")
    layout = ModelLayout(cfg, ParallelConfig(4, 1))
    tp_rep = layout.meshes.tp_rep
    shape = layout.cache_shape(9, block_size)
    cache = layout.cache_sharding(0, shape)
    want = [None, None, None, "tp_kv" if kv_heads > 1 else None, None]
    if split:
        want[CACHE_AXES.index(split)] = "tp_rep"
    spec = tuple(host_copy_sharding(cache, shape).spec)
    assert spec + (None,) * (5 - len(spec)) == tuple(want)
    logical = kv_block_bytes(cfg, ecfg)
    copies = 1 if split else tp_rep
    assert host_block_bytes(cfg, ecfg, layout) == copies * logical and host_block_bytes(cfg, ecfg) == logical
    assert auto_num_host_blocks(cfg, ecfg, 1000, layout, budget_bytes=64 * logical) == 64 // copies
    monkeypatch.setattr(Mesh, "is_multi_process", property(lambda self: True))
    assert host_copy_sharding(cache, shape) is cache and host_block_bytes(cfg, ecfg, layout) == tp_rep * logical
