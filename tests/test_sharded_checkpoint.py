"""Sharded checkpoint loading on an 8-device CPU mesh: HF safetensors read straight into a
(tp, pp) layout, each device reading only its own block, and orbax checkpoints saved from one
layout restored into others.

Reference: the unsharded load of the same files (tests/test_models.py checks that one against
`transformers`). Models: the tiny Llama (GQA, 4 query heads over 2 KV heads) and OPT presets
with 4 layers, so pp=2 gives 2 layers per stage.
"""

from __future__ import annotations

import jax

try:  # before any backend is used; conftest may have done it already
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:
    pass

import math  # noqa: E402
import os  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fastserve_jax.models import param_shapes  # noqa: E402
from fastserve_jax.models.checkpoint import restore_params, save_params  # noqa: E402
from fastserve_jax.models.config import ModelConfig  # noqa: E402
from fastserve_jax.models.hf_files import WeightReader  # noqa: E402
from fastserve_jax.models.hf_params import load_hf_params  # noqa: E402
from fastserve_jax.models.loader import cache_key, load_model  # noqa: E402
from fastserve_jax.models.random_checkpoint import make_random_checkpoint  # noqa: E402
from fastserve_jax.sharding.layout import ModelLayout  # noqa: E402
from fastserve_jax.sharding.parallel_config import ParallelConfig  # noqa: E402

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 CPU devices: the JAX backend was "
                                "initialised before this module could set jax_num_cpu_devices=8")

LAYERS = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """arch -> (checkpoint dir, config, unsharded params as numpy), built once."""
    made: dict = {}

    def get(arch: str):
        if arch not in made:
            path = make_random_checkpoint(str(tmp_path_factory.mktemp(arch)), arch, num_hidden_layers=LAYERS)
            cfg = ModelConfig.from_pretrained(path)
            made[arch] = path, cfg, _numpy(load_hf_params(path, cfg))
        return made[arch]

    return get


def _numpy(params: dict) -> dict:
    return {p: np.asarray(jax.device_get(x)) for p, x in flatten_dict(params).items()}


def _target(cfg: ModelConfig, tp: int, pp: int, dtype: str = "float32") -> dict:
    return ModelLayout(cfg, ParallelConfig(tp, pp)).abstract_params(param_shapes(cfg, dtype))


def _assert_placed(params: dict, target: dict, ref: dict) -> None:
    """Same values as ref, exactly the target's shardings, every shard the size its sharding says."""
    flat, want = flatten_dict(params), flatten_dict(target)
    assert set(flat) == set(want) == set(ref)
    for p, x in flat.items():
        assert x.sharding == want[p].sharding, p
        assert x.dtype == want[p].dtype and x.shape == want[p].shape, p
        for shard in x.addressable_shards:
            assert shard.data.shape == x.sharding.shard_shape(x.shape), p
        np.testing.assert_array_equal(np.asarray(jax.device_get(x)), ref[p], err_msg="/".join(p))


@pytest.fixture
def reads(monkeypatch):
    """Records (tensor name, shape of the block read) of every checkpoint read."""
    log: list[tuple[str, tuple[int, ...]]] = []
    read = WeightReader.read

    def recording(self, name, index):
        out = read(self, name, index)
        log.append((name, out.shape))
        return out

    monkeypatch.setattr(WeightReader, "read", recording)
    return log


@pytest.mark.parametrize("arch,tp,pp", [("llama", 2, 2), ("llama", 4, 2), ("opt", 2, 2), ("opt", 4, 2),
                                        ("opt", 4, 1)])
def test_sharded_load_matches_unsharded(ckpt, reads, arch, tp, pp):
    path, cfg, ref = ckpt(arch)
    reads.clear()  # the reference (unsharded) load read whole tensors
    target = _target(cfg, tp, pp)
    params = load_hf_params(path, cfg, target=target)
    _assert_placed(params, target, ref)

    # No full copy on one device: every split leaf's shards are smaller than the leaf.
    flat = flatten_dict(params)
    split = [p for p, x in flat.items() if not x.sharding.is_fully_replicated]
    assert any(p[0] == "layers" for p in split) and ("embed_tokens", "embedding") in split
    for p in split:
        for shard in flat[p].addressable_shards:
            assert shard.data.size < flat[p].size, p

    # Per-device shapes of the Megatron layout (tp_kv = gcd(tp, kv heads) splits the KV heads).
    H, D, L = cfg.hidden_size, cfg.head_dim, LAYERS // pp
    tp_kv = math.gcd(tp, cfg.num_kv_heads)
    layers = {p[-2:]: x for p, x in flat.items() if p[0] == "layers"}  # (module, leaf) -> stacked leaf

    def shard_shape(module: str, leaf: str) -> tuple[int, ...]:
        return layers[(module, leaf)].addressable_shards[0].data.shape

    norm = "attn_norm" if arch == "opt" else "input_norm"
    assert shard_shape("q_proj", "weight") == (L, cfg.num_heads * D // tp, H)
    assert shard_shape("k_proj", "weight") == (L, cfg.num_kv_heads * D // tp_kv, H)
    assert shard_shape("o_proj" if arch == "llama" else "out_proj", "weight") == (L, H, cfg.num_heads * D // tp)
    assert shard_shape(norm, "scale") == (L, H)
    assert flat[("embed_tokens", "embedding")].addressable_shards[0].data.shape == (cfg.vocab_size // tp, H)

    # The reads were slices: each q_proj read is one layer's (Hq*D/tp, H) rows, never the full tensor.
    q_reads = [shape for name, shape in reads if name.endswith("q_proj.weight")]
    assert q_reads and all(s == (cfg.num_heads * D // tp, H) for s in q_reads)
    # Each distinct block is read once per layer, not once per device that holds it.
    assert len(q_reads) == cfg.num_layers * tp


def test_bfloat16_and_float8_checkpoints_load_sharded(ckpt, tmp_path):
    """Dtypes numpy lacks are memory-mapped and sliced on the host; both paths agree."""
    path, cfg, ref = ckpt("llama")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for name, dt in (("bf16", ml_dtypes.bfloat16), ("fp8", ml_dtypes.float8_e4m3fn)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
        save_file({k: v.astype(dt) for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        want = {p: x.astype(dt).astype(np.float32) for p, x in ref.items()}
        _assert_placed(load_hf_params(str(d), cfg, target=_target(cfg, 4, 2)), _target(cfg, 4, 2), want)
        assert all(np.array_equal(x, want[p]) for p, x in _numpy(load_hf_params(str(d), cfg)).items())


def test_orbax_restores_into_other_layouts(ckpt, tmp_path):
    path, cfg, ref = ckpt("llama")
    params = load_hf_params(path, cfg, target=_target(cfg, 2, 2))
    # One checkpoint of leaves on three device sets: the global mesh (4 devices), each stage's 2.
    assert len({frozenset(x.sharding.device_set) for x in jax.tree.leaves(params)}) == 3
    save_params(str(tmp_path / "ckpt"), params)
    for tp, pp in ((4, 1), (1, 2), (1, 1), (4, 2)):
        target = _target(cfg, tp, pp)
        _assert_placed(restore_params(str(tmp_path / "ckpt"), target), target, ref)


def test_a_checkpoint_of_in_out_kernels_is_refused_with_the_way_out(ckpt, tmp_path):
    """A tree saved before the weights became (out, in) 'weight' leaves (models/linear.py)
    does not restore into today's tree, and the error says why and what to do."""
    path, cfg, ref = ckpt("llama")
    old = unflatten_dict({(*p[:-1], "kernel") if p[-1] == "weight" else p: (x.swapaxes(-1, -2) if p[-1] == "weight"
                                                                             else x) for p, x in ref.items()})
    save_params(str(tmp_path / "old"), old)
    with pytest.raises(ValueError, match="'kernel' leaves, \\(in, out\\).*load_model"):
        restore_params(str(tmp_path / "old"), _target(cfg, 1, 1))


def test_load_model_places_and_caches_sharded(ckpt, tmp_path, monkeypatch):
    path, cfg, ref = ckpt("opt")
    place = ModelLayout(cfg, ParallelConfig(2, 2)).abstract_params
    monkeypatch.setattr("fastserve_jax.models.loader.CACHE_MIN_BYTES", 0)   # tiny weights: cache them anyway
    cfg2, module, params = load_model(path, cache_dir=str(tmp_path), place=place)
    assert cfg2 == cfg and module.cfg == cfg
    _assert_placed(params, place(param_shapes(cfg)), ref)
    assert (tmp_path / "params" / cache_key(path, "float32")).is_dir()

    def no_conversion(*a, **k):
        raise AssertionError("the cached params should have been restored")

    monkeypatch.setattr("fastserve_jax.models.loader.load_hf_params", no_conversion)
    other = ModelLayout(cfg, ParallelConfig(4, 1)).abstract_params
    _, _, restored = load_model(path, cache_dir=str(tmp_path), place=other)
    _assert_placed(restored, other(param_shapes(cfg)), ref)
    _, _, single = load_model(path, cache_dir=str(tmp_path))  # no place: the default device
    assert all(np.array_equal(x, ref[p]) for p, x in _numpy(single).items())


def test_sharded_load_reports_every_mismatch(ckpt, tmp_path):
    path, cfg, _ = ckpt("llama")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors["model.layers.2.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # wants (32, 64)
    del tensors["model.layers.3.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.bias"] = np.zeros(128, np.float32)
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for target in (_target(cfg, 4, 2), None):
        with pytest.raises(ValueError) as e:
            load_hf_params(str(tmp_path), cfg, target=target)
        msg = str(e.value)
        assert r"missing tensors (1): model.layers.3.mlp.up_proj.weight" in msg
        assert "wrong shapes (1): model.layers.2.self_attn.k_proj.weight: checkpoint has (64, 64), " \
               "config wants (32, 64)" in msg
        assert "unexpected tensors (1): model.layers.0.mlp.up_proj.bias" in msg
    unplaced = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), _target(cfg, 2, 2))
    with pytest.raises(ValueError, match=r"target for param embed_tokens/embedding must be a ShapeDtypeStruct "
                                         r"of shape \(256, 64\) with a sharding"):
        load_hf_params(path, cfg, target=unplaced)
