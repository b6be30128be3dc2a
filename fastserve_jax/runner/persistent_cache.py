"""JAX's persistent compilation cache, in a user cache directory unless overridden.

A second start reads compiled executables from disk instead of compiling them again.
Order of precedence: the explicit argument, $FASTSERVE_JAX_COMPILE_CACHE, then
$XDG_CACHE_HOME/fastserve_jax/xla (default ~/.cache/fastserve_jax/xla). "off" (or "0",
"false", any case) disables it.

On a CPU, JAX's own XLA caches inside it are off: the GPU autotune cache's directory, an
absolute path, is part of every entry's key, so a warm cache moved to another path (an
image built under one HOME and run under another, a CI cache restored elsewhere) hit
nothing (0 of 19 for the demo model, 19 of 19 with them off; probed 2026-12-07).

JAX writes an entry in place and never replaces one that exists, so an entry cut short
(the process killed while writing it) would fail to load, with a warning, and be compiled
again at every start. `drop_damaged_entries` removes such entries when the cache is
enabled; each entry is read once, and a manifest in the directory remembers the ones found
whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import uuid
from typing import Callable

import jax

from fastserve_jax.models.loader import user_cache_root

log = logging.getLogger(__name__)

ENTRY_SUFFIX = "-cache"                 # what jax's file cache names its entries
MANIFEST = "fastserve-checked.json"     # entries found whole: name -> [size, mtime_ns]
SETTLE_SECONDS = 120.0                  # younger entries may still be being written: not judged yet


def switched_off(value: str) -> bool:
    """A cache variable's value that turns its cache off, in any case (models/loader.py reads
    FASTSERVE_JAX_CACHE alike): "OFF" made a directory of that name."""
    return value.strip().lower() in ("off", "0", "false", "none")


def enable_compilation_cache(path: str | None = None) -> str | None:
    path = os.path.expanduser(path or os.environ.get("FASTSERVE_JAX_COMPILE_CACHE")
                              or os.path.join(user_cache_root(), "xla"))
    if switched_off(path):
        return None
    # absolute now: state kept beside it is found later even if the working directory is gone
    # (a traceback at shutdown, the learned lengths lost, until 2026-12-07)
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        drop_damaged_entries(path)
    except OSError as e:        # a read-only file system, a file in the way, a directory we may not list
        log.warning("the compilation cache at %s is unusable (%s); compiling without it", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if jax.default_backend() == "cpu":
        with contextlib.suppress(AttributeError, KeyError, ValueError):     # a JAX without the option
            jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    return path


def _loader():
    """jax's own decompression of a cache entry (a private function: None where this jax
    version lacks it, and then no entry is judged)."""
    try:
        from jax._src.compilation_cache import decompress_executable
    except ImportError:
        return None
    return decompress_executable


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _codec(data: bytes) -> str | None:
    """Which compression an entry's first bytes name: a zstd frame, a zlib stream, or neither."""
    if data[:4] == _ZSTD_MAGIC:
        return "zstd"
    if len(data) >= 2 and data[0] & 0x0F == 8 and ((data[0] << 8) | data[1]) % 31 == 0:
        return "zlib"
    return None


def _own_codec() -> str | None:
    try:
        from jax._src.compilation_cache import compress_executable
        return _codec(compress_executable(b"probe"))
    except Exception:               # a jax version without it: every entry is judged
        return None


def drop_damaged_entries(path: str, now: float | None = None) -> list[str]:
    """Delete the entries under `path` that do not decompress (cut short), and return their
    names. Entries already found whole (same size and mtime in the manifest) are not read
    again; entries written in the last SETTLE_SECONDS are left for a later start. Entries of
    another codec are another environment's, not damaged: jax keys zstd entries as zlib ones
    on Python 3.14, so a 3.13 and a 3.14 install sharing a cache deleted each other's at every
    start (a probe, 2026-12-07); they are left to jax, which recompiles them with a warning."""
    load = _loader()
    if load is None:
        return []
    own = _own_codec()
    now = time.time() if now is None else now
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path) as f:
            known = json.load(f)
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError, RecursionError):          # torn, or nested past Python's stack
        known = {}
    whole: dict[str, list[int]] = {}
    dropped: list[str] = []
    with os.scandir(path) as entries:
        for e in entries:
            if not e.name.endswith(ENTRY_SUFFIX) or not e.is_file():
                continue
            st = e.stat()
            stamp = [st.st_size, st.st_mtime_ns]
            if known.get(e.name) == stamp:
                whole[e.name] = stamp
                continue
            if now - st.st_mtime < SETTLE_SECONDS:
                continue
            try:
                with open(e.path, "rb") as f:
                    data = f.read()
                if own is None or _codec(data) in (own, None):
                    load(data)
            except OSError:
                continue
            except Exception:      # jax's decompressor raises its library's own errors
                try:
                    os.unlink(e.path)
                except OSError:
                    continue
                dropped.append(e.name)
                continue
            whole[e.name] = stamp
    if dropped:
        log.warning("removed %d damaged compilation cache entr%s from %s (cut short when written; they "
                    "compile again once): %s", len(dropped), "y" if len(dropped) == 1 else "ies", path,
                    ", ".join(dropped))
    if whole != known:
        tmp = unique_tmp(manifest_path)
        try:
            with open(tmp, "w") as f:
                json.dump(whole, f)
            os.replace(tmp, manifest_path)
        except OSError:
            pass
    return dropped


def unique_tmp(path: str) -> str:
    """A temporary name beside `path` that no other writer uses: the pid alone was not unique
    where replicas each run as pid 1 (pods in their own PID namespaces, sharing a cache
    volume), and two saves at once tore the file (5 of 8 rounds, found by a probe, 2026-12-07)."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:16]}.tmp"


def beside_cache(kind: str, env: str, key: str, suffix: str) -> str | None:
    """Where the engine keeps state of `kind` it learned while serving (the length predictor,
    the learned output lengths): $`env`, else a `kind` directory beside the compilation cache;
    None (not kept) when neither is set or the variable says "off" (`switched_off`; until
    2026-12-07 "OFF", "0" or "false" made a directory of that name). The file is named by a
    hash of `key` (what the state is valid for); the path is absolute, as the compilation
    cache's is, so a later change of directory finds it."""
    root = os.environ.get(env)
    if root is not None and (not root.strip() or switched_off(root)):
        return None
    root = root if root is None else os.path.expanduser(root)
    if root is None and jax.config.jax_compilation_cache_dir:
        root = os.path.join(os.path.dirname(os.path.abspath(jax.config.jax_compilation_cache_dir)), kind)
    if not root:
        return None
    return os.path.join(os.path.abspath(root), hashlib.sha256(key.encode()).hexdigest()[:24] + suffix)


def save_state(path: str, write: Callable[[str], None], what: str) -> bool:
    """Write state the engine learned to `path`: `write(tmp)` fills a temporary file beside it,
    which is then renamed into place (readers, and processes saving at once, see a whole file).
    A state directory that cannot be written (a full disk, read-only) only costs what a later
    start would have restored: a warning naming `what`, no exception, no partial file left."""
    tmp = unique_tmp(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
        return True
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        log.warning("could not save %s at %s (%s); the next start begins without it", what, path, e)
        return False
