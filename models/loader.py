"""Hugging Face safetensors <-> our Linen param tree, and the engine's `load_model` entry.

Names map module by module (table below) and leaf by leaf:
  kernel    <-> weight, transposed (torch Linear is (out, in), Linen Dense is (in, out))
  embedding <-> weight;  scale <-> weight (norms);  bias <-> bias
Per-layer tensors `...layers.{i}...` are stacked on a leading layer axis (our `nn.scan`).
Tied embeddings have no lm_head in our tree; a checkpoint that still stores one is fine.

The expected tree comes from `jax.eval_shape` on `module.init`, so a module change and
this table cannot drift apart silently: every expected param must be found with the
right shape, and every checkpoint tensor must be used (or be a known harmless buffer).

`load_model` caches the converted params as an orbax checkpoint keyed by the weight
files' sizes and mtimes, so a second start restores instead of converting.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import struct

import flax.linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models import build_model
from models.attention import dense_batch
from models.checkpoint import restore_params, save_params
from models.config import ModelConfig

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


def read_raw_tensor(file: str, name: str) -> np.ndarray:
    """Read one tensor straight from the safetensors layout (8-byte header length, JSON header,
    little-endian data); used for dtypes (bfloat16, float8) the installed safetensors cannot
    hand to numpy."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(n))[name]
    start, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    arr = np.fromfile(file, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
    return arr.reshape(info["shape"])


class _Tensors:
    """Name -> tensor over all weight files, each opened once."""

    def __init__(self, arch: str, files: list[str], stack: contextlib.ExitStack):
        self._where: dict[str, tuple[str, object, str]] = {}  # canonical name -> (file, handle, stored name)
        for file in files:
            handle = stack.enter_context(safe_open(file, framework="numpy"))
            for stored in handle.keys():
                self._where[_canonical(arch, stored)] = (file, handle, stored)

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        file, handle, stored = self._where[name]
        try:
            return handle.get_tensor(stored)
        except (TypeError, ValueError):  # numpy has no such dtype in this safetensors build
            return read_raw_tensor(file, stored)


def load_hf_params(path: str, cfg: ModelConfig, dtype: str = "float32") -> dict:
    """Read a HF model directory's safetensors into our param tree, cast to each param's dtype
    (that of `build_model(cfg, dtype)`), as jax arrays on the default device.

    Raises ValueError naming every missing, mis-shaped or unexpected tensor.
    """
    expected = flatten_dict(param_shapes(cfg, dtype))
    files = weight_files(path)
    params: dict[ParamPath, jax.Array] = {}
    missing: list[str] = []
    bad_shape: list[str] = []
    used: set[str] = set()
    with contextlib.ExitStack() as stack:
        tensors = _Tensors(cfg.arch, files, stack)
        for p, spec in expected.items():
            template, transpose = hf_name(cfg.arch, p)
            layered = p[0] == "layers"
            names = [template.format(i=i) for i in range(cfg.num_layers)] if layered else [template]
            want = spec.shape[1:] if layered else spec.shape
            out = np.empty(spec.shape, dtype=spec.dtype)
            for i, name in enumerate(names):
                if name not in tensors:
                    missing.append(name)
                    continue
                used.add(name)
                t = tensors.get(name)
                hf_want = tuple(reversed(want)) if transpose else tuple(want)  # torch Linear: (out, in)
                if t.shape != hf_want:
                    bad_shape.append(f"{name}: checkpoint has {t.shape}, config wants {hf_want}")
                    continue
                t = t.T if transpose else t
                if layered:
                    out[i] = t
                else:
                    out[...] = t
            params[p] = out
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
    return unflatten_dict({p: jax.device_put(a) for p, a in params.items()})


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


def load_model(path: str, dtype: str = "float32", cache_dir: str | None = None) -> tuple[ModelConfig, nn.Module, dict]:
    """Config, Linen module and params of a HF model directory.

    Restores the params from the orbax cache (`cache_root(cache_dir)/params/<cache_key>`)
    when present; otherwise converts the safetensors and fills the cache. A cache that
    cannot be written only costs the next start a conversion (logged as a warning).
    """
    cfg = ModelConfig.from_pretrained(path)
    module = build_model(cfg, dtype)
    root = cache_root(cache_dir)
    if root is None:
        return cfg, module, load_hf_params(path, cfg, dtype)
    ckpt = os.path.abspath(os.path.join(root, "params", cache_key(path, dtype)))
    if os.path.isdir(ckpt):
        log.info("restoring converted params of %s from %s", path, ckpt)
        return cfg, module, restore_params(ckpt, param_shapes(cfg, dtype))
    params = load_hf_params(path, cfg, dtype)
    try:
        save_params(ckpt, params)
    except OSError as e:
        log.warning("could not cache converted params at %s (%s); the next load converts again", ckpt, e)
    return cfg, module, params
