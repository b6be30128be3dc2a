"""Hugging Face safetensors <-> our Linen param tree, and the engine's `load_model` entry.

Names map module by module (table below) and leaf by leaf:
  kernel    <-> weight, transposed (torch Linear is (out, in), Linen Dense is (in, out))
  embedding <-> weight;  scale <-> weight (norms);  bias <-> bias
Per-layer tensors `...layers.{i}...` are stacked on a leading layer axis (our `nn.scan`).
Tied embeddings have no lm_head in our tree; a checkpoint that still stores one is fine.

The expected tree comes from `jax.eval_shape` on `module.init`, so a module change and
this table cannot drift apart silently: every expected param must be found with the
right shape, and every checkpoint tensor must be used (or be a known harmless buffer).

With a target tree of shardings (`ModelLayout.abstract_params`), every leaf is built in place
on its devices, each device's block read alone from the files (safetensors slices, or a
memory map for bfloat16/float8), so no device ever holds more than its own blocks.

`load_model` caches the converted params as an orbax checkpoint keyed by the weight
files' sizes and mtimes, so a second start restores instead of converting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import re
import struct
from typing import Callable

import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from fastserve_jax.models import build_model
from fastserve_jax.models.attention import dense_batch
from fastserve_jax.models.checkpoint import restore_params, save_params
from fastserve_jax.models.config import ModelConfig

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CACHE_ENV = "FASTSERVE_JAX_CACHE"  # cache root; "off" disables the converted-params cache
_CACHE_VERSION = 1  # bump when the name mapping or the cached tree changes

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
}
_MODULES = {"llama": _LLAMA_MODULES, "opt": _OPT_MODULES}
# Our leaf name -> (HF leaf name, transpose).
_LEAVES = {"kernel": ("weight", True), "embedding": ("weight", False), "scale": ("weight", False),
           "bias": ("bias", False)}
# Buffers some (older Llama) checkpoints carry; recomputed, never loaded.
_HARMLESS = re.compile(r".*\.rotary_emb\.inv_freq$")
# safetensors dtype codes, for reading tensors this numpy/safetensors pair cannot.
_ST_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
# The dtypes safetensors hands to numpy itself; others are memory-mapped and read by us.
_NUMPY_NATIVE = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "BOOL"}

ParamPath = tuple[str, ...]  # a leaf's keys in the param tree


def param_shapes(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The param tree `build_model(cfg, dtype)` expects, as jax.ShapeDtypeStruct leaves."""
    module = build_model(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), tokens, dense_batch(tokens.shape))
    return variables["params"]


def hf_name(arch: str, path: ParamPath) -> tuple[str, bool]:
    """HF tensor name for one of our leaves (with "{i}" for layer leaves) and whether to transpose."""
    module, leaf = "/".join(path[:-1]), path[-1]
    if module not in _MODULES[arch] or leaf not in _LEAVES:
        raise KeyError(f"no Hugging Face name for param {'/'.join(path)!r} of a {arch!r} model")
    hf_leaf, transpose = _LEAVES[leaf]
    return f"{_MODULES[arch][module]}.{hf_leaf}", transpose


def _canonical(arch: str, name: str) -> str:
    """Checkpoints saved from the bare decoder (e.g. facebook/opt-*) lack the `model.` prefix."""
    if arch == "opt" and name.startswith("decoder."):
        return "model." + name
    if arch == "llama" and not name.startswith(("model.", "lm_head.")):
        return "model." + name
    return name


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory (one file, or the shards named by the index)."""
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {path!r} names shard files that are not there: {missing}")
        return [os.path.join(path, s) for s in shards]
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}; only safetensors checkpoints are "
                     "supported (re-save a PyTorch .bin checkpoint with save_pretrained(safe_serialization=True))")


def _raw_header(file: str) -> tuple[int, dict]:
    """(offset of the data section, JSON header) of a safetensors file: an 8-byte little-endian
    header length, the JSON header, then the tensors' bytes."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _raw_view(file: str, data_start: int, info: dict) -> np.ndarray:
    """A read-only memory map of one tensor (no bytes are read until it is indexed)."""
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    shape = tuple(info["shape"])
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    start, _ = info["data_offsets"]
    return np.memmap(file, dtype=dtype, mode="r", offset=data_start + start, shape=shape)


def read_raw_tensor(file: str, name: str) -> np.ndarray:
    """Read one tensor straight from the safetensors layout; used for dtypes (bfloat16, float8)
    that the installed safetensors may not hand to numpy."""
    data_start, header = _raw_header(file)
    return np.array(_raw_view(file, data_start, header[name]))


class _Tensors:
    """Name -> tensor over all weight files, each opened once. Shapes come from the headers;
    `read` reads only the requested block of a tensor."""

    def __init__(self, arch: str, files: list[str], stack: contextlib.ExitStack):
        self._where: dict[str, tuple[str, object, str]] = {}  # canonical name -> (file, handle, stored name)
        self._raw: dict[str, tuple[int, dict]] = {}           # file -> _raw_header(file), when needed
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="numpy"))
            for stored in handle.keys():
                self._where[_canonical(arch, stored)] = (file, handle, stored)

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        _, handle, stored = self._where[name]
        return tuple(handle.get_slice(stored).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] (index in the stored (HF) axis order), reading only that block."""
        file, handle, stored = self._where[name]
        sl = handle.get_slice(stored)
        if sl.get_dtype() in _NUMPY_NATIVE:
            return sl[index]
        if file not in self._raw:  # bfloat16 / float8: memory-map the file and slice on the host
            self._raw[file] = _raw_header(file)
        data_start, header = self._raw[file]
        return np.array(_raw_view(file, data_start, header[stored])[index])


@dataclasses.dataclass(frozen=True)
class _Source:
    """The HF tensors one of our leaves is made of: one, or one per layer (stacked on axis 0)."""
    names: tuple[str, ...]
    transpose: bool  # torch Linear (out, in) -> our kernel (in, out)
    layered: bool


def _match(path: str, cfg: ModelConfig, expected: dict[ParamPath, jax.ShapeDtypeStruct],
           tensors: _Tensors) -> dict[ParamPath, _Source]:
    """Pair every expected leaf with its checkpoint tensors, by name and header shape (no data is
    read). Raises ValueError naming every missing, mis-shaped and unexpected tensor."""
    sources: dict[ParamPath, _Source] = {}
    missing: list[str] = []
    bad_shape: list[str] = []
    used: set[str] = set()
    for p, spec in expected.items():
        template, transpose = hf_name(cfg.arch, p)
        layered = p[0] == "layers"
        names = tuple(template.format(i=i) for i in range(cfg.num_layers)) if layered else (template,)
        want = spec.shape[1:] if layered else spec.shape
        hf_want = tuple(reversed(want)) if transpose else tuple(want)  # torch Linear: (out, in)
        for name in names:
            if name not in tensors:
                missing.append(name)
                continue
            used.add(name)
            got = tensors.shape(name)
            if got != hf_want:
                bad_shape.append(f"{name}: checkpoint has {got}, config wants {hf_want}")
        sources[p] = _Source(names, transpose, layered)
    unexpected = sorted(n for n in tensors.names() - used
                        if not _HARMLESS.match(n) and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
    if missing or bad_shape or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {_clip(missing)}")
        if bad_shape:
            parts.append(f"wrong shapes ({len(bad_shape)}): {_clip(bad_shape)}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {_clip(unexpected)}")
        raise ValueError(f"checkpoint {path!r} does not match its config.json ({cfg.arch}, "
                         f"{cfg.num_layers} layers): " + "; ".join(parts))
    return sources


def _read_block(tensors: _Tensors, src: _Source, shape: tuple[int, ...], dtype: np.dtype,
                index: tuple[slice, ...] | None) -> np.ndarray:
    """Block `index` (slices into our leaf of `shape`; None: all of it) of one leaf, cast to
    dtype. Reads only that block of each HF tensor: for a layer-stacked leaf, index[0] picks
    the layers (one HF tensor each) and the rest slices each of them; a kernel's slices are
    applied to the HF tensor's (out, in) axes and the block transposed after reading."""
    index = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    ranges = [range(*s.indices(n)) for s, n in zip(index, shape)]
    out = np.empty(tuple(len(r) for r in ranges), dtype)
    inner = index[1:] if src.layered else index
    hf_index = tuple(reversed(inner)) if src.transpose else inner
    for k, i in enumerate(ranges[0] if src.layered else (0,)):
        t = tensors.read(src.names[i], hf_index)
        dst = out[k] if src.layered else out
        dst[...] = t.T if src.transpose else t
    return out


def _make_sharded(tensors: _Tensors, src: _Source, target: jax.ShapeDtypeStruct) -> jax.Array:
    """One leaf built shard by shard where `target.sharding` puts it: each addressable device
    gets a host block read for its index alone (devices that hold the same block share one read)."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...] | None) -> np.ndarray:
        key = tuple(s.indices(n) for s, n in zip(index or (), target.shape))
        if key not in blocks:
            blocks[key] = _read_block(tensors, src, target.shape, target.dtype, index)
        return blocks[key]

    return jax.make_array_from_callback(target.shape, target.sharding, block, dtype=target.dtype)


def _check_target(cfg: ModelConfig, expected: dict[ParamPath, jax.ShapeDtypeStruct],
                  target: dict) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    flat = flatten_dict(target)
    if set(flat) != set(expected):
        raise ValueError(f"target tree does not match a {cfg.arch!r} model of this config: "
                         f"missing {sorted('/'.join(p) for p in set(expected) - set(flat))}, "
                         f"unexpected {sorted('/'.join(p) for p in set(flat) - set(expected))}")
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
        tensors = _Tensors(cfg.arch, weight_files(path), stack)
        sources = _match(path, cfg, expected, tensors)
        if placed is None:
            params = {p: jax.device_put(_read_block(tensors, sources[p], spec.shape, spec.dtype, None))
                      for p, spec in expected.items()}
        else:
            params = {p: _make_sharded(tensors, sources[p], placed[p]) for p in expected}
    return unflatten_dict(params)


def _clip(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our param tree -> {HF name: numpy array}, layers unstacked, kernels transposed to (out, in)."""
    expected = flatten_dict(param_shapes(cfg))
    flat = flatten_dict(params)
    if set(flat) != set(expected):
        raise ValueError(f"param tree does not match a {cfg.arch!r} model of this config: "
                         f"missing {sorted('/'.join(p) for p in set(expected) - set(flat))}, "
                         f"unexpected {sorted('/'.join(p) for p in set(flat) - set(expected))}")
    out: dict[str, np.ndarray] = {}
    for p in expected:  # eval_shape order: module definition order
        arr = np.asarray(flat[p])
        if arr.shape != expected[p].shape:
            raise ValueError(f"param {'/'.join(p)} has shape {arr.shape}, expected {expected[p].shape}")
        template, transpose = hf_name(cfg.arch, p)
        pieces = [(template.format(i=i), arr[i]) for i in range(cfg.num_layers)] if p[0] == "layers" \
            else [(template, arr)]
        for name, t in pieces:
            out[name] = np.ascontiguousarray(t.T if transpose else t)
    return out


def save_hf_checkpoint(cfg_dict: dict, params: dict, out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` (cfg_dict as given) and the params under HF names, so that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads them.

    params: our param tree (or `{"params": tree}`), jax or numpy leaves; saved in their own
    dtypes. max_shard_bytes: split into `model-0000k-of-0000n.safetensors` plus
    `model.safetensors.index.json` (a tensor larger than the limit gets a shard of its own).
    Weight files already in out_dir are replaced.
    """
    if set(params) == {"params"}:
        params = params["params"]
    cfg = ModelConfig.from_dict(cfg_dict)
    tensors = to_hf_tensors(cfg, params)
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "model*.safetensors")) + glob.glob(os.path.join(out_dir, INDEX_FILE)):
        os.remove(old)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata=meta)
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)


def cache_root(cache_dir: str | None = None) -> str | None:
    """Root of the converted-params cache: cache_dir ("": no cache), else $FASTSERVE_JAX_CACHE
    ("off": no cache), else $XDG_CACHE_HOME/fastserve_jax (default ~/.cache/fastserve_jax)."""
    if cache_dir is not None:
        return cache_dir or None
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.lower() in ("", "0", "off", "none") else env
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fastserve_jax")


def cache_key(path: str, dtype: str) -> str:
    """Changes whenever the weights, the config, the dtype or the conversion code version change."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{os.path.realpath(path)}|{jnp.dtype(dtype).name}".encode())
    for file in [os.path.join(path, "config.json")] + weight_files(path):
        st = os.stat(file)
        h.update(f"|{os.path.basename(file)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def load_model(path: str, dtype: str = "float32", cache_dir: str | None = None,
               place: Callable[[dict], dict] | None = None) -> tuple[ModelConfig, nn.Module, dict]:
    """Config, Linen module and params of a HF model directory.

    place: maps the param shape tree (`param_shapes(cfg, dtype)`, jax.ShapeDtypeStruct
    leaves) to the target tree, the same structure with a sharding on every leaf, e.g.
    `place=lambda shapes: layout.abstract_params(shapes)`. The params are then built
    straight into those shardings (see `load_hf_params`), whether converted or restored.
    None: every param on the default device.

    Restores the params from the orbax cache (`cache_root(cache_dir)/params/<cache_key>`)
    when present; otherwise converts the safetensors and fills the cache. The cache holds
    the canonical tree, whatever layout saved it, and restores into any other. A cache that
    cannot be written only costs the next start a conversion (logged as a warning).
    """
    cfg = ModelConfig.from_pretrained(path)
    module = build_model(cfg, dtype)
    target = place(param_shapes(cfg, dtype)) if place is not None else None
    root = cache_root(cache_dir)
    if root is None:
        return cfg, module, load_hf_params(path, cfg, dtype, target)
    ckpt = os.path.abspath(os.path.join(root, "params", cache_key(path, dtype)))
    if os.path.isdir(ckpt):
        log.info("restoring converted params of %s from %s", path, ckpt)
        return cfg, module, restore_params(ckpt, target if target is not None else param_shapes(cfg, dtype))
    params = load_hf_params(path, cfg, dtype, target)
    try:
        save_params(ckpt, params)
    except OSError as e:
        log.warning("could not cache converted params at %s (%s); the next load converts again", ckpt, e)
    return cfg, module, params
