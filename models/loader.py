"""A Hugging Face model directory in and out: `load_model` (config, module, params; the
engine's entry) and `save_hf_checkpoint`, its inverse.

`load_model` caches the converted params as an orbax checkpoint keyed by the config's
contents and the weight files' sizes, mtimes and sampled bytes, so a second start restores
instead of converting. The conversion itself is hf_params.py (names, shapes, sharded
reads); the files are hf_files.py.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from fastserve_jax.models import build_model, param_shapes
from fastserve_jax.models.checkpoint import restore_params, save_params
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.hf_files import weight_files, write_weight_files
from fastserve_jax.models.hf_params import check_tied_head, load_hf_params, to_hf_tensors

log = logging.getLogger(__name__)

CACHE_ENV = "FASTSERVE_JAX_CACHE"  # cache root; "off" disables the converted-params cache
_CACHE_VERSION = 2  # bump when the name mapping or the cached tree changes (2: (out, in) weights)
# Weights smaller than this convert faster than orbax restores them, so they skip the cache
# (the demo model: 0.06 s converting, 0.38 s restoring, plus orbax's import, on 2 cores).
CACHE_MIN_BYTES = 64 << 20
_SAMPLES = 64  # 4 KiB blocks of each weight file that cache_key hashes (beyond its first MiB)
# A fill's `*.partial` directory with nothing written in it for this long is a killed fill's
# (a live one writes every few seconds; a replica in another PID namespace can't be asked).
STALE_FILL_S = 3600


def cache_root(cache_dir: str | None = None) -> str | None:
    """Root of the converted-params cache: cache_dir ("": no cache), else $FASTSERVE_JAX_CACHE
    ("off": no cache), else $XDG_CACHE_HOME/fastserve_jax (default ~/.cache/fastserve_jax)."""
    if cache_dir is not None:
        return cache_dir or None
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "false", "none") else os.path.expanduser(env)
    return user_cache_root()


def user_cache_root() -> str:
    """$XDG_CACHE_HOME/fastserve_jax, by default ~/.cache/fastserve_jax ("~" expanded here:
    systemd's Environment=, Docker's ENV and Kubernetes' env leave it to us). Where "~" means
    nothing (no HOME, and a UID without a passwd entry: a container's random UID), a directory
    in the temporary one, said once; until 2026-12-07 a directory named "~" in the working one."""
    base = os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"))
    if not base.startswith("~"):
        return os.path.join(base, "fastserve_jax")
    root = os.path.join(tempfile.gettempdir(), f"fastserve_jax-cache-{os.getuid()}")
    _say_no_home(root)
    return root


@functools.cache
def _say_no_home(root: str) -> None:
    log.warning("no home directory (HOME unset, and no passwd entry for this user): caching in %s; set HOME, "
                "XDG_CACHE_HOME or the FASTSERVE_JAX_* cache variables to keep the caches across containers", root)


def cache_key(path: str, dtype: str) -> str:
    """Changes whenever the weights, the config, the dtype or the conversion code version change.

    Besides each weight file's size and mtime, the key hashes its first MiB (the header) and
    _SAMPLES blocks spread over it: new weights copied in with their mtime kept (cp -p, tar,
    reproducible images) have the same size and mtime but not the same bytes."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{os.path.realpath(path)}|{jnp.dtype(dtype).name}".encode())
    with open(os.path.join(path, "config.json"), "rb") as f:
        h.update(f.read())
    _hash_weights(h, path, mtime=True)
    return h.hexdigest()[:32]


def weights_id(path: str) -> str:
    """Which weights a model directory holds, wherever it is and whenever copied: each weight
    file's name and size, its first MiB and _SAMPLES blocks spread over it (as `cache_key`
    reads them). What the engine learns about a model's outputs is kept under it
    (policy_state.py): a fine-tune with its base model's config.json is another model."""
    h = hashlib.sha256(b"weights")
    _hash_weights(h, path, mtime=False)
    return h.hexdigest()[:24]


def _hash_weights(h, path: str, mtime: bool) -> None:
    for file in weight_files(path):
        st = os.stat(file)
        h.update(f"|{os.path.basename(file)}:{st.st_size}{f':{st.st_mtime_ns}' if mtime else ''}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            for k in range(1, _SAMPLES + 1):
                f.seek(st.st_size * k // (_SAMPLES + 1))
                h.update(f.read(4096))


def _sweep_stale_fills(params_dir: str) -> None:
    """Remove the `*.partial` directories of fills killed mid-write (up to a copy of the
    weights each; until 2026-12-07 no start removed them): those with no file written for
    STALE_FILL_S, so a fill still running in another process keeps its own."""
    now = time.time()
    root = glob.escape(params_dir)
    # and orbax's own temporary directories, which fills before 2026-12-05 wrote in params/
    for work in glob.glob(os.path.join(root, "*.partial")) + glob.glob(os.path.join(root, "*.orbax-checkpoint-tmp*")):
        try:
            newest = max([os.lstat(work).st_mtime] + [os.lstat(os.path.join(r, n)).st_mtime
                                                      for r, ds, fs in os.walk(work) for n in ds + fs])
        except OSError:        # removed meanwhile (its fill renamed or swept it)
            continue
        if now - newest > STALE_FILL_S:
            log.info("removing %s, a converted-params fill that stopped %.0f s ago", work, now - newest)
            shutil.rmtree(work, ignore_errors=True)


def _fill_cache(ckpt: str, params: dict) -> None:
    """Save params as the cache entry ckpt: written in a directory of this process's own, then
    renamed into place, so processes filling the same entry at once never share a directory
    (orbax's temporary name is the same for both) and the one that renames second keeps the
    first's. Whatever the write leaves in that directory (orbax's temporary checkpoint after a
    failed write) is removed with it. A failed write (orbax reports a full disk as a ValueError
    from tensorstore, not an OSError) costs the next load a conversion, never this one."""
    work = f"{ckpt}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    entry = os.path.join(work, "entry")
    try:
        save_params(entry, params)
        os.rename(entry, ckpt)
    except Exception as e:
        if not os.path.isdir(ckpt):
            log.warning("could not cache converted params at %s (%s: %.300s); the next load converts again",
                        ckpt, type(e).__name__, e)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_model(path: str, dtype: str = "float32", cache_dir: str | None = None,
               place: Callable[[dict], dict] | None = None,
               cfg: ModelConfig | None = None) -> tuple[ModelConfig, nn.Module, dict]:
    """Config, Linen module and params of a HF model directory.

    place: maps the param shape tree (`param_shapes(cfg, dtype)`, jax.ShapeDtypeStruct
    leaves) to the target tree, the same structure with a sharding on every leaf, e.g.
    `place=lambda shapes: layout.abstract_params(shapes)`. The params are then built
    straight into those shardings (see `load_hf_params`), whether converted or restored.
    None: every param on the default device.

    Restores the params from the orbax cache (`cache_root(cache_dir)/params/<cache_key>`)
    when present; otherwise converts the safetensors and fills the cache (weights under
    CACHE_MIN_BYTES are always converted); an entry that cannot be restored is converted
    again and replaced. The cache holds the canonical tree, whatever layout saved it, and
    restores into any other. A cache that cannot be written only costs the next start a
    conversion (logged as a warning); processes filling one entry at once each write their
    own copy and the first to rename it into place wins.
    cfg: the directory's config when the caller has read it already.
    """
    cfg = cfg or ModelConfig.from_pretrained(path)
    module = build_model(cfg, dtype)
    target = place(param_shapes(cfg, dtype)) if place is not None else None
    root = cache_root(cache_dir)
    if root is None or sum(os.path.getsize(f) for f in weight_files(path)) < CACHE_MIN_BYTES:
        return cfg, module, load_hf_params(path, cfg, dtype, target)
    ckpt = os.path.abspath(os.path.join(root, "params", cache_key(path, dtype)))
    _sweep_stale_fills(os.path.dirname(ckpt))
    if os.path.isdir(ckpt):
        log.info("restoring converted params of %s from %s", path, ckpt)
        check_tied_head(path, cfg)     # what a conversion would have logged
        try:
            return cfg, module, restore_params(ckpt, target if target is not None else param_shapes(cfg, dtype))
        except Exception as e:  # a damaged entry (truncated, emptied): convert again and replace it
            log.warning("cached params at %s are unreadable (%s: %.200s); converting %s again",
                        ckpt, type(e).__name__, e, path)
            shutil.rmtree(ckpt, ignore_errors=True)
    params = load_hf_params(path, cfg, dtype, target)
    _fill_cache(ckpt, params)
    return cfg, module, params


def save_hf_checkpoint(cfg_dict: dict, params: dict, out_dir: str, max_shard_bytes: int | None = None) -> None:
    """Write `config.json` (cfg_dict as given) and the params under HF names, so that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` (and `load_model`) load them.

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
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2, sort_keys=True)
    write_weight_files(tensors, out_dir, max_shard_bytes)
