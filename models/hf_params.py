"""Hugging Face tensor names <-> our Linen param tree, both ways.

Names map module by module (table below) and leaf by leaf:
  weight <-> weight (our Linear stores (out, in), as torch does: no transpose)
  embedding <-> weight;  scale <-> weight (norms);  bias <-> bias
Per-layer tensors `...layers.{i}...` are stacked on a leading layer axis (our `nn.scan`).
Tied embeddings have no lm_head in our tree; a checkpoint that still stores one is fine.

The expected tree comes from `param_shapes` (`jax.eval_shape` on `module.init`), so a module
change and this table cannot drift apart silently: every expected param must be found with
the right shape, and every checkpoint tensor must be used (or be a known harmless buffer).

With a target tree of shardings (`ModelLayout.abstract_params`), every leaf is built in place
on its devices, each device's block read alone from the files (safetensors slices, or a
memory map for bfloat16/float8), so no device ever holds more than its own blocks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re

from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import numpy as np

from fastserve_jax.models import param_shapes
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.hf_files import WeightReader, index_weight_map, weight_files

log = logging.getLogger(__name__)

# Our module path (joined with "/") -> HF module name; "{i}" is the layer index.
_LLAMA_MODULES = {
    "embed_tokens": "model.embed_tokens",
    "layers/input_norm": "model.layers.{i}.input_layernorm",
    "layers/attn/q_proj": "model.layers.{i}.self_attn.q_proj",
    "layers/attn/k_proj": "model.layers.{i}.self_attn.k_proj",
    "layers/attn/v_proj": "model.layers.{i}.self_attn.v_proj",
    "layers/attn/o_proj": "model.layers.{i}.self_attn.o_proj",
    "layers/post_attn_norm": "model.layers.{i}.post_attention_layernorm",
    "layers/mlp/gate_proj": "model.layers.{i}.mlp.gate_proj",
    "layers/mlp/up_proj": "model.layers.{i}.mlp.up_proj",
    "layers/mlp/down_proj": "model.layers.{i}.mlp.down_proj",
    "norm": "model.norm",
    "lm_head": "lm_head",
}
_OPT_MODULES = {
    "embed_tokens": "model.decoder.embed_tokens",
    "embed_positions": "model.decoder.embed_positions",
    "project_in": "model.decoder.project_in",
    "layers/attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "layers/q_proj": "model.decoder.layers.{i}.self_attn.q_proj",
    "layers/k_proj": "model.decoder.layers.{i}.self_attn.k_proj",
    "layers/v_proj": "model.decoder.layers.{i}.self_attn.v_proj",
    "layers/out_proj": "model.decoder.layers.{i}.self_attn.out_proj",
    "layers/ffn_norm": "model.decoder.layers.{i}.final_layer_norm",
    "layers/fc1": "model.decoder.layers.{i}.fc1",
    "layers/fc2": "model.decoder.layers.{i}.fc2",
    "final_norm": "model.decoder.final_layer_norm",
    "project_out": "model.decoder.project_out",
    "lm_head": "lm_head",
}
_MODULES = {"llama": _LLAMA_MODULES, "opt": _OPT_MODULES}
# Our leaf name -> HF leaf name.
_LEAVES = {"weight": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Stored dtypes a float param may be read from (cast to the param's dtype); an integer or
# bool tensor in a float param's place would be cast silently into garbage.
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# Buffers some checkpoints carry (older Llamas' inv_freq; the cos/sin tables of ColossalAI's,
# which vLLM skips too); recomputed, never loaded.
_HARMLESS = re.compile(r".*\.rotary_emb\.(inv_freq|cos_cached|sin_cached)$")

ParamPath = tuple[str, ...]  # a leaf's keys in the param tree


def hf_name(arch: str, path: ParamPath) -> str:
    """HF tensor name for one of our leaves (with "{i}" for layer leaves)."""
    module, leaf = "/".join(path[:-1]), path[-1]
    if module not in _MODULES[arch] or leaf not in _LEAVES:
        raise KeyError(f"no Hugging Face name for param {'/'.join(path)!r} of a {arch!r} model")
    return f"{_MODULES[arch][module]}.{_LEAVES[leaf]}"


def _canonical(arch: str, name: str) -> str:
    """Checkpoints saved from the bare decoder (e.g. facebook/opt-*) lack the `model.` prefix."""
    if arch == "opt" and name.startswith("decoder."):
        return "model." + name
    if arch == "llama" and not name.startswith(("model.", "lm_head.")):
        return "model." + name
    return name


@dataclasses.dataclass(frozen=True)
class _Source:
    """The HF tensors one of our leaves is made of: one, or one per layer (stacked on axis 0)."""
    names: tuple[str, ...]
    layered: bool


def _match(path: str, cfg: ModelConfig, expected: dict[ParamPath, jax.ShapeDtypeStruct],
           tensors: WeightReader) -> dict[ParamPath, _Source]:
    """Pair every expected leaf with its checkpoint tensors, by name, header shape and dtype (no
    data is read). Raises ValueError naming every missing, mis-shaped, non-float and unexpected tensor."""
    sources: dict[ParamPath, _Source] = {}
    missing: list[str] = []
    bad_shape: list[str] = []
    bad_dtype: list[str] = []
    used: set[str] = set()
    for p, spec in expected.items():
        template = hf_name(cfg.arch, p)
        layered = p[0] == "layers"
        names = tuple(template.format(i=i) for i in range(cfg.num_layers)) if layered else (template,)
        hf_want = tuple(spec.shape[1:] if layered else spec.shape)
        for name in names:
            if name not in tensors:
                missing.append(name)
                continue
            used.add(name)
            got = tensors.shape(name)
            if got != hf_want:
                bad_shape.append(f"{name}: checkpoint has {got}, config wants {hf_want}")
            if tensors.dtype(name) not in _FLOAT_DTYPES:
                bad_dtype.append(f"{name}: {tensors.dtype(name)}")
        sources[p] = _Source(names, layered)
    unexpected = sorted(n for n in tensors.names() - used
                        if not _HARMLESS.match(n) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if missing or bad_shape or bad_dtype or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {_clip(missing)}")
        if bad_shape:
            parts.append(f"wrong shapes ({len(bad_shape)}): {_clip(bad_shape)}")
        if bad_dtype:
            parts.append(f"not floating-point ({len(bad_dtype)}): {_clip(bad_dtype)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {_clip(unexpected)}")
        raise ValueError(f"checkpoint {path!r} does not match its config.json ({cfg.arch}, "
                         f"{cfg.num_layers} layers): " + "; ".join(parts))
    return sources


def _read_block(tensors: WeightReader, src: _Source, shape: tuple[int, ...], dtype: np.dtype,
                index: tuple[slice, ...] | None) -> np.ndarray:
    """Block `index` (slices into our leaf of `shape`; None: all of it) of one leaf, cast to
    dtype. Reads only that block of each HF tensor: for a layer-stacked leaf, index[0] picks
    the layers (one HF tensor each) and the rest slices each of them."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
    out = np.empty(tuple(len(r) for r in ranges), dtype)
    inner = index[1:] if src.layered else index
    for k, i in enumerate(ranges[0] if src.layered else (0,)):
        dst = out[k] if src.layered else out
        dst[...] = tensors.read(src.names[i], inner)
    return out


def _make_sharded(tensors: WeightReader, src: _Source, target: jax.ShapeDtypeStruct) -> jax.Array:
    """One leaf built shard by shard where `target.sharding` puts it: each addressable device
    gets a host block read for its index alone (devices that hold the same block share one read)."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...] | None) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index or (), target.shape))
        if key not in blocks:
            blocks[key] = _read_block(tensors, src, target.shape, target.dtype, index)
        return blocks[key]

    return jax.make_array_from_callback(target.shape, target.sharding, block, dtype=target.dtype)


def _same_tree(what: str, cfg: ModelConfig, expected: dict[ParamPath, jax.ShapeDtypeStruct], flat: dict) -> None:
    """Raise unless `flat` has exactly the leaves of a model of this config."""
    if set(flat) != set(expected):
        raise ValueError(f"{what} does not match a {cfg.arch!r} model of this config: "
                         f"missing {sorted('/'.join(p) for p in set(expected) - set(flat))}, "
                         f"unexpected {sorted('/'.join(p) for p in set(flat) - set(expected))}")


def _check_target(cfg: ModelConfig, expected: dict[ParamPath, jax.ShapeDtypeStruct],
                  target: dict) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    flat = flatten_dict(target)
    _same_tree("target tree", cfg, expected, flat)
    for p, t in flat.items():
        if tuple(t.shape) != tuple(expected[p].shape) or getattr(t, "sharding", None) is None:
            raise ValueError(f"target for param {'/'.join(p)} must be a ShapeDtypeStruct of shape "
                             f"{expected[p].shape} with a sharding, got {t!r}")
    return flat


def load_hf_params(path: str, cfg: ModelConfig, dtype: str = "float32", target: dict | None = None) -> dict:
    """Read a HF model directory's safetensors into our param tree.

    target None: every leaf is cast to its param's dtype (that of `build_model(cfg, dtype)`)
    and put on the default device.
    target: a tree like `param_shapes(cfg, dtype)` of jax.ShapeDtypeStruct with shardings
    (e.g. `ModelLayout.abstract_params(...)`); each leaf is built in place with its target's
    sharding and dtype, every device reading only its own block from the files, so no device
    (and no host buffer beyond one leaf's local blocks) ever holds a full copy.

    Raises ValueError naming every missing, mis-shaped or unexpected tensor (checked on the
    file headers before any data is read).
    """
    expected = flatten_dict(param_shapes(cfg, dtype))
    placed = _check_target(cfg, expected, target) if target is not None else None
    with contextlib.ExitStack() as stack:
        tensors = WeightReader(weight_files(path), stack, rename=lambda name: _canonical(cfg.arch, name),
                               weight_map=index_weight_map(path))
        sources = _match(path, cfg, expected, tensors)
        check_tied_head(path, cfg, tensors)
        if placed is None:
            params = {p: jax.device_put(_read_block(tensors, sources[p], spec.shape, spec.dtype, None))
                      for p, spec in expected.items()}
        else:
            params = {p: _make_sharded(tensors, sources[p], placed[p]) for p in expected}
    return unflatten_dict(params)


def check_tied_head(path: str, cfg: ModelConfig, tensors: WeightReader | None = None) -> None:
    """A tied config whose checkpoint stores an lm_head.weight unlike its embedding: the head is
    not read (the embedding projects, as in vLLM; transformers uses the stored head instead),
    and the log says so, at every load (loader.py calls it on a cached one). Three rows are
    compared, not the whole matrix."""
    if not cfg.tie_word_embeddings:
        return
    if tensors is None:
        with contextlib.ExitStack() as stack:
            return check_tied_head(path, cfg, WeightReader(weight_files(path), stack,
                                                           rename=lambda name: _canonical(cfg.arch, name),
                                                           weight_map=index_weight_map(path)))
    if "lm_head.weight" not in tensors:
        return
    embed = hf_name(cfg.arch, ("embed_tokens", "embedding"))
    n = tensors.shape(embed)[0]
    rows = [(slice(r, r + 1), slice(None)) for r in sorted({0, n // 2, n - 1})]
    if tensors.shape("lm_head.weight") != tensors.shape(embed) or \
            any(not np.array_equal(tensors.read(embed, i), tensors.read("lm_head.weight", i)) for i in rows):
        log.warning("%s: config.json ties the output projection to the embedding (tie_word_embeddings), but the "
                    "checkpoint stores an lm_head.weight that differs from it: the stored head is not used, as vLLM "
                    "does not use it (transformers would); set tie_word_embeddings false to serve it", path)


def _clip(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our param tree -> {HF name: numpy array}, layers unstacked."""
    expected = flatten_dict(param_shapes(cfg))
    flat = flatten_dict(params)
    _same_tree("param tree", cfg, expected, flat)
    out: dict[str, np.ndarray] = {}
    for p in expected:  # eval_shape order: module definition order
        arr = np.asarray(flat[p])
        if arr.shape != expected[p].shape:
            raise ValueError(f"param {'/'.join(p)} has shape {arr.shape}, expected {expected[p].shape}")
        template = hf_name(cfg.arch, p)
        pieces = [(template.format(i=i), arr[i]) for i in range(cfg.num_layers)] if p[0] == "layers" \
            else [(template, arr)]
        for name, t in pieces:
            out[name] = np.ascontiguousarray(t)
    return out
