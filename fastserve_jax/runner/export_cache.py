"""Traced programs kept on disk, so a warm start skips tracing as well as XLA.

JAX's persistent cache (persistent_cache.py) saves XLA's work, but each executable must
still be traced and lowered to StableHLO before the cache can be asked: for a 2-layer
model on a 2-core CPU that is 0.1-0.2 s per launch shape, most of a warm start. This cache
keeps each program as a serialized `jax.export.Exported` and lowers a thin jit around its
`call` instead, which is about 20 ms.

Every executable goes through the exported form, cold starts too, so a program lowers to
the same module (and the same persistent-cache key) whether it was traced now or read
back. The key covers everything the trace depends on: the source of fastserve_jax (with
its models and sharding), the jax/jaxlib/flax versions, the backend and device kind, the
caller's name for the function and its static arguments, and the abstract arguments with
their shardings. A file that fails to load, or to lower here, is traced again and replaced.

Off (plain `jit(...).lower`) when the compilation cache is off, with several processes
(multi-host replays trace on each host), without the `flatbuffers` package that
serialization needs, or with FASTSERVE_JAX_EXPORT_CACHE=off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import logging
import os
import sys
import tempfile
import threading
import weakref

import jax
from jax import export

from fastserve_jax.runner.compile_guard import discount_export
from fastserve_jax.runner.persistent_cache import switched_off

log = logging.getLogger(__name__)
_FORMAT = "1"
# The Pallas attention kernel lowers to a Triton custom call on GPU, which jax.export refuses
# by default because Triton IR has no compatibility guarantee across versions. The programs
# here are keyed on the jax/jaxlib versions (`_digest`), so none is ever read by another.
DISABLED_CHECKS = (export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),)


_registered = False
_register_lock = threading.Lock()


def _register_pytrees() -> None:
    """Once per process. Compile threads of a warm-up call this at the same time, and jax
    refuses a second registration (functools.cache lets concurrent first calls all run)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        from fastserve_jax.models.attention import AttnBatch, KVCache
        from fastserve_jax.sampling import Penalties, Sampled, SamplingArrays
        for cls in (AttnBatch, KVCache, Penalties, Sampled, SamplingArrays):
            export.register_namedtuple_serialization(cls, serialized_name=f"fastserve_jax.{cls.__name__}")
        _registered = True


def directory() -> str | None:
    """Where exported programs live (beside the compilation cache), or None when off."""
    if switched_off(os.environ.get("FASTSERVE_JAX_EXPORT_CACHE", "")):
        return None
    root = jax.config.jax_compilation_cache_dir
    if not root or jax.process_count() > 1:
        return None
    try:
        import flatbuffers  # noqa: F401  (what Exported.serialize needs)
    except ImportError:
        return None
    return os.path.join(root, "fastserve_exported")


def _device() -> str:
    """The backend and device kind programs are exported for: a cache directory shared by a
    GPU run and a CPU run (JAX_PLATFORMS=cpu, a shared home) keeps each one's programs apart."""
    return f"{jax.default_backend()}/{jax.devices()[0].device_kind}"


def _raise(e: OSError) -> None:
    raise e


def _source_files() -> dict[str, tuple[str, int, int]]:
    """The source of the packages a trace runs (fastserve_jax with its models and sharding):
    each file's path, modification time and size, by its name within its package."""
    out = {}
    for pkg in ("fastserve_jax", "fastserve_jax.models", "fastserve_jax.sharding"):
        root = importlib.import_module(pkg).__path__[0]
        for dirpath, dirnames, files in os.walk(root, onerror=_raise):     # a walk that failed is no listing
            dirnames[:] = sorted(d for d in dirnames if d not in ("models", "sharding", "serve", "__pycache__"))
            for fn in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, fn)
                st = os.stat(path)
                out[f"{pkg}:{os.path.relpath(path, root)}"] = (path, st.st_mtime_ns, st.st_size)
    return out


def _hash_sources(files: dict[str, tuple[str, int, int]]) -> str:
    h = hashlib.sha256()
    for name, (path, _, _) in files.items():
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


# Read as this module is imported, with the code it keys: read at the first trace instead, a
# checkout switched (an upgrade in place, an editable install edited) between an engine's
# start and its first generate stored the old code's programs under the new source's key, for
# good (found by a probe, 2026-12-07). Programs traced after the files change are not saved.
_SOURCES = _source_files()
_SOURCE_DIGEST = _hash_sources(_SOURCES)


@functools.cache
def _digest() -> str:
    """The source this process loaded (_SOURCE_DIGEST), the versions that lower it and the
    device it is for."""
    h = hashlib.sha256(f"{_FORMAT}|{_device()}|{_SOURCE_DIGEST}".encode())
    for pkg in ("jax", "jaxlib", "flax"):
        try:
            h.update(f"{pkg}={importlib.metadata.version(pkg)}".encode())
        except importlib.metadata.PackageNotFoundError:
            pass
    h.update(sys.version.encode())
    return h.hexdigest()


_source_moved = False


def _source_unchanged() -> bool:
    """Whether the source on disk is still what this process loaded; once it is not (a
    later-imported module may be the new code), no program is saved, with one warning."""
    global _source_moved
    try:
        now = _SOURCES if _source_moved else _source_files()
    except OSError:         # out of file descriptors (a burst of connections): not this time, but not for good
        return False        # (os.walk ignored the error and the empty listing turned saving off, until 2026-12-07)
    if not _source_moved and now != _SOURCES:
        _source_moved = True
        log.warning("fastserve_jax's source changed on disk since this process started (an upgrade or an edit); "
                    "traced programs are no longer saved: restart to cache the new code's")
    return not _source_moved


def _describe(tree) -> str:
    leaves, treedef = jax.tree.flatten(tree)
    parts = [str(treedef)]
    for x in leaves:
        sh = getattr(x, "sharding", None)
        parts.append(f"{x.shape}/{x.dtype}/{sh!r}" if hasattr(x, "shape") else repr(x))
    return "|".join(parts)


def cache_key(name: str, args: tuple, static: dict) -> str:
    h = hashlib.sha256(_digest().encode())
    h.update(name.encode())
    h.update(repr(sorted(static.items())).encode())
    h.update(_describe(args).encode())
    return h.hexdigest()[:40]


# A file is _MAGIC, the sha256 of the serialized program, then the program: a flipped bit was
# read back (a changed constant would compute wrong) or failed to lower at every start, and the
# file was never replaced (until 2026-12-07; files without the header are traced again once).
_MAGIC = b"fastserve-exported-1\n"


def framed(blob: bytes) -> bytes:
    """A serialized program as its file holds it."""
    return _MAGIC + hashlib.sha256(blob).digest() + blob


def _load(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
        head, digest, blob = data[:len(_MAGIC)], data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
        if head != _MAGIC or hashlib.sha256(blob).digest() != digest:
            raise ValueError("damaged, or written by an older version (its digest does not match)")
        return export.deserialize(bytearray(blob))
    except FileNotFoundError:
        return None
    except Exception as e:                     # a torn, damaged or foreign file: trace again and replace it
        log.warning("ignoring unreadable exported program %s: %s", path, e)
        return None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()      # read at import: as other files are made (mkstemp's are 0600)


_warned_save = False


def _save(path: str, blob: bytes) -> None:
    """Write the program where readers see the whole file or none. A cache that cannot be
    written (a full disk, a read-only directory) only costs the next start a trace: warned
    once per process, never raised."""
    global _warned_save
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        os.fchmod(fd, _FILE_MODE)     # another user may read a cache baked into an image (0600 was unreadable)
        with os.fdopen(fd, "wb") as f:
            f.write(framed(blob))
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not _warned_save:
            _warned_save = True
            log.warning("could not save traced programs in %s (%s); they are traced again at the next start",
                        os.path.dirname(path), e)


# One trace at a time: a warm-up's compile threads trace Flax modules, and Flax builds classes
# (nn.scan's) as a module is set up, reading a base class's dataclass fields while another thread
# adds them: "dictionary changed size during iteration" stopped a server's start once in a soak
# (2026-12-06). Tracing holds the GIL anyway; XLA's compiles, after it, still run side by side.
_trace_lock = threading.RLock()


def lower(fn, *args, name: str, donate: tuple[int, ...] = (), **static) -> jax.stages.Lowered:
    """`fn.lower(*args, **static)` (fn a jax.jit of it), through the exported form when the
    cache is on. `name` tells functions with the same arguments apart (and must change when
    what the jit closes over does); `donate` repeats fn's donated positional arguments."""
    root = directory()
    if root is None:
        with _trace_lock:
            return fn.lower(*args, **static)
    _register_pytrees()
    path = os.path.join(root, cache_key(name, args, static) + ".bin")
    exp = _load(path)
    if exp is not None:
        try:
            return jax.jit(exp.call, donate_argnums=donate).lower(*args)
        except Exception as e:      # exported for another platform or device count, or not a valid program
            log.warning("ignoring exported program %s, which does not lower here: %.300s", path, e)
    with _trace_lock:
        try:
            exp = export.export(fn, disabled_checks=DISABLED_CHECKS)(*args, **static)
        except NotImplementedError:     # host callbacks (the mosaic kernel in interpret mode on a CPU): not
            return fn.lower(*args, **static)    # kept; they failed the engine's start until 2026-12-07
    discount_export()
    if _source_unchanged():
        _save(path, exp.serialize())
    return jax.jit(exp.call, donate_argnums=donate).lower(*args)


# Executables built in this process, by program and devices, held only while an engine holds
# them: a second engine of the same programs (rebuilt in process, or beside the first) takes
# them instead of lowering and asking the persistent cache again, and a dropped engine's still
# go with it. The devices are part of the key because an executable is bound to its devices,
# which `cache_key` (made for other processes' use) does not name.
_built: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _device_ids(tree) -> tuple:
    return tuple(tuple(d.id for d in x.sharding._device_assignment) if getattr(x, "sharding", None) else None
                 for x in jax.tree.leaves(tree))


def build(fn, *args, name: str, donate: tuple[int, ...] = (), **static):
    """`lower(...).compile()`, shared within the process (`_built`)."""
    key = (cache_key(name, args, static), donate, _device_ids(args))
    exe = _built.get(key)
    if exe is None:
        exe = lower(fn, *args, name=name, donate=donate, **static).compile()
        _built[key] = exe
    return exe


def build_job(fn, *args, name: str, donate: tuple[int, ...] = (), **static):
    """A zero-argument callable for CompileJob.build."""
    return functools.partial(build, fn, *args, name=name, donate=donate, **static)
