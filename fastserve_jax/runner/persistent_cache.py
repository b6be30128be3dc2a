"""JAX's persistent compilation cache, in a user cache directory unless overridden.

A second start reads compiled executables from disk instead of compiling them again.
Order of precedence: the explicit argument, $FASTSERVE_JAX_COMPILE_CACHE, then
$XDG_CACHE_HOME/fastserve_jax/xla (default ~/.cache/fastserve_jax/xla). "off" disables it.
"""

from __future__ import annotations

import hashlib
import os

import jax


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastserve_jax")


def enable_compilation_cache(path: str | None = None) -> str | None:
    path = path or os.environ.get("FASTSERVE_JAX_COMPILE_CACHE") or os.path.join(default_cache_root(), "xla")
    if path == "off":
        return None
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def beside_cache(kind: str, env: str, key: str, suffix: str) -> str | None:
    """Where the engine keeps state of `kind` it learned while serving (the length predictor,
    the learned output lengths): $`env`, else a `kind` directory beside the compilation cache;
    None (not kept) when neither is set or the variable says "off". The file is named by a
    hash of `key` (what the state is valid for)."""
    root = os.environ.get(env)
    if root is None and jax.config.jax_compilation_cache_dir:
        root = os.path.join(os.path.dirname(os.path.abspath(jax.config.jax_compilation_cache_dir)), kind)
    if not root or root == "off":
        return None
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:24] + suffix)
