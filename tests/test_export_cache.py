"""runner/export_cache.py: a program read back lowers to the same module as one traced now (so
the persistent cache key does not drift), keys tell programs apart, and bad files are traced
again."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax.models.attention import KVCache
from fastserve_jax.runner import export_cache

traced = []


def _step(cache: KVCache, x, *, scale: float):
    traced.append(x.shape)                      # runs only when jax traces the Python function
    return x * scale + cache.k.sum(), KVCache(cache.k + x.sum(), cache.v)


step = jax.jit(_step, donate_argnames=("cache",), static_argnames=("scale",))


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / "fastserve_exported"
    jax.config.update("jax_compilation_cache_dir", before)


def _args(n=4):
    sds = jax.ShapeDtypeStruct
    return KVCache(sds((2, 3), jnp.float32), sds((2, 3), jnp.float32)), sds((n,), jnp.float32)


def test_read_back_lowers_to_the_same_module_without_tracing(cache_dir, monkeypatch):
    traced.clear()
    first = export_cache.lower(step, *_args(), name="t", donate=(0,), scale=2.0)
    assert len(traced) == 1 and len(os.listdir(cache_dir)) == 1

    def no_export(*a, **k):
        raise AssertionError("traced again instead of read from disk")
    monkeypatch.setattr(export_cache.export, "export", no_export)
    second = export_cache.lower(step, *_args(), name="t", donate=(0,), scale=2.0)
    assert second.as_text() == first.as_text()
    # the executable computes what the plain jit does, and the cache argument is donated
    cache = KVCache(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    out, new = second.compile()(cache, jnp.arange(4.0))
    want, _ = _step(KVCache(jnp.ones((2, 3)), jnp.zeros((2, 3))), jnp.arange(4.0), scale=2.0)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want))
    assert cache.k.is_deleted() and float(new.k[0, 0]) == 7.0


def test_the_key_separates_names_statics_and_shapes(cache_dir):
    for name, scale, n in (("t", 2.0, 4), ("u", 2.0, 4), ("t", 3.0, 4), ("t", 2.0, 8)):
        export_cache.lower(step, *_args(n), name=name, donate=(0,), scale=scale)
    assert len(os.listdir(cache_dir)) == 4


def test_an_unreadable_file_is_traced_again_and_replaced(cache_dir):
    export_cache.lower(step, *_args(), name="t", scale=2.0)
    (path,) = [cache_dir / f for f in os.listdir(cache_dir)]
    path.write_bytes(b"torn")
    lowered = export_cache.lower(step, *_args(), name="t", scale=2.0)
    assert path.read_bytes() != b"torn"
    assert export_cache._load(str(path)) is not None and lowered.compile() is not None


def test_a_flipped_bit_is_traced_again_and_replaced_and_files_are_readable_by_others(cache_dir):
    """A bit flipped inside a program file read back (a constant changed: wrong results) or
    failed to lower ("Failed to deserialize StableHLO", at every start: the file was never
    replaced). Files carry a digest now. They were written 0600, so a cache baked by one user
    was unreadable to another."""
    export_cache.lower(step, *_args(), name="t", scale=2.0)
    (path,) = [cache_dir / f for f in os.listdir(cache_dir)]
    mask = os.umask(0o022)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert export_cache._load(str(path)) is None
    assert export_cache.lower(step, *_args(), name="t", scale=2.0).compile() is not None
    assert export_cache._load(str(path)) is not None


def test_a_program_with_a_host_callback_lowers_without_being_kept(cache_dir):
    """jax.export cannot serialize host callbacks (the mosaic kernel in Pallas's interpret mode
    on a CPU: FASTSERVE_JAX_PALLAS_KERNEL=mosaic failed the engine's first launch until
    2026-12-07); such a program is lowered as a plain jit and nothing is written."""
    def host(x):
        return np.asarray(x) * 3

    calling = jax.jit(lambda x: jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    arg = jax.ShapeDtypeStruct((4,), jnp.float32)
    exe = export_cache.lower(calling, arg, name="cb").compile()
    assert np.asarray(exe(jnp.arange(4.0))).tolist() == [0.0, 3.0, 6.0, 9.0]
    assert not list(cache_dir.glob("*.bin")) if cache_dir.exists() else True


def test_off_lowers_the_plain_jit(cache_dir, monkeypatch):
    monkeypatch.setenv("FASTSERVE_JAX_EXPORT_CACHE", "off")
    assert export_cache.directory() is None
    lowered = export_cache.lower(step, *_args(), name="t", scale=2.0)
    assert lowered.as_text() == step.lower(*_args(), scale=2.0).as_text()
    assert not cache_dir.exists()


def test_compile_threads_register_the_pytrees_once_together():
    """A warm-up's compile threads reach the first export at the same time; each must find the
    pytrees registered exactly once (a second registration raises in jax). A fresh process,
    since registration is per process; a tiny switch interval makes the threads interleave."""
    import subprocess
    import sys
    code = """
import sys, threading
from fastserve_jax.runner import export_cache
sys.setswitchinterval(1e-6)
gate, errors = threading.Barrier(8), []
def first_export():
    gate.wait()
    try:
        export_cache._register_pytrees()
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=first_export) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_cache_that_cannot_be_written_still_lowers(cache_dir, monkeypatch, caplog):
    """A full disk or a directory that cannot be written used to fail the compile (and with it
    the engine's start) with the OSError of saving the program, leaving its temporary file; the
    program is lowered anyway, with one warning for the process."""
    monkeypatch.setattr(export_cache, "_warned_save", False)
    cache_dir.write_text("a file in the way")
    assert export_cache.lower(step, *_args(), name="t", scale=2.0).compile() is not None
    cache_dir.unlink()
    cache_dir.mkdir()

    def full(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(export_cache.os, "replace", full)
    assert export_cache.lower(step, *_args(8), name="t", scale=2.0).compile() is not None
    assert os.listdir(cache_dir) == []
    assert caplog.text.count("could not save") == 1


def test_a_program_exported_for_another_platform_is_traced_again(cache_dir, monkeypatch):
    """One cache directory, two platforms (a GPU run, then JAX_PLATFORMS=cpu on the same host,
    or a shared home): the sampler's and the swap copies' keys named no platform, so a program
    exported for CUDA was read back on the CPU and its lowering failed ("exported for platforms
    ('cuda',) but it is used on ('cpu',)"). The key now names the backend and device kind, and a
    program for another platform is traced again and replaced."""
    export_cache.lower(step, *_args(), name="t", scale=2.0)
    (path,) = [cache_dir / f for f in os.listdir(cache_dir)]
    cuda = export_cache.export.export(step, platforms=("cuda",))(*_args(), scale=2.0)
    path.write_bytes(export_cache.framed(cuda.serialize()))
    assert export_cache.lower(step, *_args(), name="t", scale=2.0).compile() is not None
    assert export_cache._load(str(path)).platforms == ("cpu",)
    key = export_cache.cache_key("t", _args(), {})
    monkeypatch.setattr(export_cache, "_device", lambda: "cuda/NVIDIA H100 80GB HBM3")
    export_cache._digest.cache_clear()
    try:
        assert export_cache.cache_key("t", _args(), {}) != key
    finally:
        export_cache._digest.cache_clear()


def test_the_key_names_the_source_loaded_not_the_source_on_disk(cache_dir, monkeypatch, tmp_path, caplog):
    """The source was hashed at the first trace: a checkout switched (an upgrade in place, an
    editable install edited) between an engine's start and its first generate stored the old
    code's programs under the new source's key, and every later start of the new code read
    them (a probe's raced upgrade served an old sampler's bug, 2026-12-07). The key now names
    the source as imported, and once the files change no program is saved."""
    import shutil

    import fastserve_jax.sharding as sharding

    copy = tmp_path / "sharding"
    shutil.copytree(sharding.__path__[0], copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(sharding, "__path__", [str(copy)])       # as if imported from the copy
    monkeypatch.setattr(export_cache, "_SOURCES", export_cache._source_files())
    monkeypatch.setattr(export_cache, "_SOURCE_DIGEST", export_cache._hash_sources(export_cache._SOURCES))
    monkeypatch.setattr(export_cache, "_source_moved", False)
    export_cache._digest.cache_clear()
    try:
        key = export_cache.cache_key("t", _args(), {"scale": 2.0})
        export_cache.lower(step, *_args(), name="t", scale=2.0)
        with open(copy / "mesh.py", "a") as f:                      # the upgrade lands
            f.write("\n# changed\n")
        export_cache._digest.cache_clear()
        assert export_cache.cache_key("t", _args(), {"scale": 2.0}) == key
        for name in ("u", "v"):
            assert export_cache.lower(step, *_args(), name=name, scale=2.0).compile() is not None
        assert os.listdir(cache_dir) == [key + ".bin"]
        assert caplog.text.count("source changed on disk") == 1
    finally:
        export_cache._digest.cache_clear()


def test_a_source_listing_that_fails_skips_one_save_and_turns_nothing_off(monkeypatch, caplog):
    """Out of file descriptors (a burst of connections), os.walk lists nothing and says
    nothing: the empty listing read as changed source, and no program was saved again in that
    process, with a warning of an upgrade that never happened (a probe, 2026-12-07)."""
    import errno

    real = os.walk

    def out_of_files(root, onerror=None, **kw):
        if onerror is not None:
            onerror(OSError(errno.EMFILE, "Too many open files", root))
        return iter(())

    monkeypatch.setattr(export_cache, "_source_moved", False)
    monkeypatch.setattr(export_cache.os, "walk", out_of_files)
    assert export_cache._source_unchanged() is False
    monkeypatch.setattr(export_cache.os, "walk", real)
    assert export_cache._source_unchanged() is True and not export_cache._source_moved
    assert "source changed on disk" not in caplog.text
