"""JAX's persistent compilation cache, in a user cache directory unless overridden.

A second start reads compiled executables from disk instead of compiling them again.
Order of precedence: the explicit argument, $FASTSERVE_JAX_COMPILE_CACHE, then
$XDG_CACHE_HOME/fastserve_jax/xla (default ~/.cache/fastserve_jax/xla). "off" disables it.
"""

from __future__ import annotations

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
