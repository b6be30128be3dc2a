"""Startup as a user meets it: a second start of the same command loads every executable from
the persistent cache (the cache key does not drift between identical runs), and the status
line says so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# a small engine: the first start profiles every launch shape (the cost model), and what is
# checked (every executable of the second start from the cache) does not depend on how many
SMALL = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32"]


def _generate(cache: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTSERVE_JAX_COMPILE_CACHE=os.path.join(cache, "xla"),
               FASTSERVE_JAX_CACHE=os.path.join(cache, "params"))
    return subprocess.run([sys.executable, "-m", "fastserve_jax", "generate", *SMALL, "count from 3 to 12:", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _compiled(stderr: str) -> tuple[int, int, int]:
    m = re.search(r"compiled (\d+) executables?, (\d+)/(\d+) from the persistent cache", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def test_second_start_loads_every_executable_from_the_cache(tmp_path):
    """Also from a copy of the cache at another path (an image built under one HOME, run under
    another): JAX's GPU autotune cache directory, an absolute path, was in every key, so a moved
    cache hit nothing; it is off on a CPU since 2026-12-07."""
    first = _generate(str(tmp_path / "a"))
    assert first.returncode == 0 and "output: ' 3 4 5 6 7 8 9 10 11 12'" in first.stdout, first.stderr[-2000:]
    n, hits, asked = _compiled(first.stderr)
    assert n > 0 and hits < asked                      # an empty cache compiled something itself
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    second = _generate(str(tmp_path / "b"))
    outputs = lambda p: [ln for ln in p.stdout.splitlines() if ln.startswith("output:")]
    assert second.returncode == 0 and outputs(second) == outputs(first)
    n2, hits2, asked2 = _compiled(second.stderr)
    # the first start also profiled the cost model (cached on disk since), so it compiled more
    assert 0 < n2 <= n and hits2 == asked2 == n2, second.stderr[-2000:]
    status = [ln for ln in second.stderr.splitlines() if ln.startswith("load ")]
    assert status and "first token" in status[0]


_TINY_JIT = """
import sys
from jax._src import monitoring
from fastserve_jax.runner.persistent_cache import enable_compilation_cache
events = []
monitoring.register_event_listener(lambda e, **k: events.append(e))
enable_compilation_cache(sys.argv[1])
import jax, jax.numpy as jnp
jax.jit(lambda x: jnp.sin(x) @ x.T + 3)(jnp.ones((8, 8))).block_until_ready()
print("misses", events.count("/jax/compilation_cache/cache_misses"))
"""


def _tiny_start(cache: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-c", _TINY_JIT, cache], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def _age(path: str, seconds: float) -> None:
    for name in os.listdir(path):
        t = os.path.getmtime(os.path.join(path, name)) - seconds
        os.utime(os.path.join(path, name), (t, t))


def test_an_entry_cut_short_compiles_again_once_not_at_every_start(tmp_path):
    """jax never replaces an existing entry, so one cut short (the process killed while
    writing it) used to fail to load and compile again at every start."""
    cache = str(tmp_path / "xla")
    assert "misses 0" not in _tiny_start(cache).stdout     # (that a whole entry loads: the test above)
    entry = max((n for n in os.listdir(cache) if n.endswith("-cache")), key=lambda n: os.path.getsize(os.path.join(cache, n)))
    with open(os.path.join(cache, entry), "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    _age(cache, 600)
    third = _tiny_start(cache)
    assert "misses 1" in third.stdout and "removed 1 damaged compilation cache entry" in third.stderr, third.stderr
    assert "Error reading persistent compilation cache entry" not in third.stderr
    _age(cache, 600)
    fourth = _tiny_start(cache)
    assert "misses 0" in fourth.stdout and "damaged" not in fourth.stderr, fourth.stderr


def test_damaged_entries_are_judged_once_and_young_ones_are_left(tmp_path, monkeypatch):
    from jax._src.compilation_cache import compress_executable

    from fastserve_jax.runner import persistent_cache as pc
    whole = compress_executable(os.urandom(4096) * 4)
    for name, data in (("whole-cache", whole), ("cut-cache", whole[: len(whole) // 2]),
                       ("young-cut-cache", whole[:100]), ("other-file", b"x")):
        (tmp_path / name).write_bytes(data)
    _age(str(tmp_path), 600)
    os.utime(tmp_path / "young-cut-cache")                      # written just now: maybe still being written
    assert pc.drop_damaged_entries(str(tmp_path)) == ["cut-cache"]
    assert sorted(os.listdir(tmp_path)) == [pc.MANIFEST, "other-file", "whole-cache", "young-cut-cache"]
    reads = []
    monkeypatch.setattr(pc, "_loader", lambda: lambda b: reads.append(len(b)))
    assert pc.drop_damaged_entries(str(tmp_path)) == [] and reads == []   # the whole one is not read again
    assert pc.drop_damaged_entries(str(tmp_path), now=os.path.getmtime(tmp_path / "young-cut-cache") + 600) == []
    assert reads == [100]                                       # the young one, once settled (the fake finds it whole)


def test_entries_of_another_codec_are_not_judged_damaged(tmp_path):
    """jax keys its zstd entries as zlib ones on Python 3.14, so installs on 3.13 and 3.14 that
    share a cache read each other's entries: each start deleted the other's as damaged ("cut
    short when written") and neither ever hit the cache (a probe, 2026-12-07)."""
    from jax._src.compilation_cache import compress_executable

    from fastserve_jax.runner import persistent_cache as pc
    whole = compress_executable(os.urandom(4096) * 4)
    ours = pc._codec(whole)
    other = b"\x78\x9c" if ours == "zstd" else pc._ZSTD_MAGIC
    for name, data in (("ours-cut-cache", whole[: len(whole) // 2]), ("other-cache", other + os.urandom(300)),
                       ("empty-cache", b"")):
        (tmp_path / name).write_bytes(data)
    _age(str(tmp_path), 600)
    assert sorted(pc.drop_damaged_entries(str(tmp_path))) == ["empty-cache", "ours-cut-cache"]
    assert sorted(os.listdir(tmp_path)) == [pc.MANIFEST, "other-cache"]


def test_a_cache_directory_that_cannot_be_made_or_read_leaves_the_cache_off(tmp_path, monkeypatch, caplog):
    """A compilation cache path that cannot be made (read-only file system, a file in the way)
    or listed used to stop every start with the OSError of os.makedirs or os.scandir; the
    engine now compiles without the cache, after one warning."""
    import jax

    from fastserve_jax.runner import persistent_cache as pc
    (tmp_path / "file").write_text("in the way")
    before = jax.config.jax_compilation_cache_dir
    assert pc.enable_compilation_cache(str(tmp_path / "file" / "xla")) is None
    assert jax.config.jax_compilation_cache_dir == before and "compiling without it" in caplog.text

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(pc.os, "scandir", unreadable)
    assert pc.enable_compilation_cache(str(tmp_path / "xla")) is None
    assert jax.config.jax_compilation_cache_dir == before and caplog.text.count("compiling without it") == 2
    monkeypatch.chdir(tmp_path)
    for off in ("OFF", "0", "False"):     # these made a cache directory of that name (only "off" was off)
        monkeypatch.setenv("FASTSERVE_JAX_COMPILE_CACHE", off)
        assert pc.enable_compilation_cache() is None and not (tmp_path / off).exists()


def test_cache_paths_from_the_environment_expand_a_tilde(tmp_path, monkeypatch):
    """systemd's Environment=, Docker's ENV and Kubernetes' env pass "~" as it is: the caches
    went to a directory named "~" in the working directory (until 2026-12-07)."""
    from fastserve_jax.models import loader
    from fastserve_jax.runner import persistent_cache as pc

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    monkeypatch.delenv(loader.CACHE_ENV, raising=False)      # the test session's own
    assert loader.user_cache_root() == str(tmp_path / "xdg" / "fastserve_jax")
    assert loader.cache_root() == str(tmp_path / "xdg" / "fastserve_jax")
    monkeypatch.setenv(loader.CACHE_ENV, "~/params")
    assert loader.cache_root() == str(tmp_path / "params")
    monkeypatch.setenv("FASTSERVE_JAX_LENGTHS_DIR", "~/lengths")
    assert pc.beside_cache("lengths", "FASTSERVE_JAX_LENGTHS_DIR", "k", ".json").startswith(str(tmp_path / "lengths"))
    # every cache variable turns off alike (until 2026-12-07 the learned state's took "off" alone:
    # "OFF", "0" or "false" made a directory of that name, relative to the working directory)
    for off in ("off", "OFF", "0", "false", "None", " "):
        monkeypatch.setenv("FASTSERVE_JAX_LENGTHS_DIR", off)
        assert pc.beside_cache("lengths", "FASTSERVE_JAX_LENGTHS_DIR", "k", ".json") is None, off
        monkeypatch.setenv(loader.CACHE_ENV, off)
        assert loader.cache_root() is None, off
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTSERVE_JAX_LENGTHS_DIR", "state")
    assert pc.beside_cache("lengths", "FASTSERVE_JAX_LENGTHS_DIR", "k", ".json").startswith(str(tmp_path / "state"))


def test_without_a_home_the_caches_go_to_the_temporary_directory(tmp_path, monkeypatch, caplog):
    """No HOME and a UID without a passwd entry (a container's random UID): "~" stays "~", and
    the caches went to a directory named "~" in the working directory (until 2026-12-07)."""
    import pwd
    import tempfile

    from fastserve_jax.models import loader

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")
    monkeypatch.delenv("HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert loader.user_cache_root() == str(tmp_path / f"fastserve_jax-cache-{os.getuid()}")
    assert "no home directory" in caplog.text


def test_a_relative_compilation_cache_is_made_absolute(tmp_path, monkeypatch):
    """State kept beside it (learned lengths) is found from its absolute path: with the working
    directory deleted, the save at shutdown failed with a traceback (until 2026-12-07)."""
    import jax

    from fastserve_jax.runner import persistent_cache as pc
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.chdir(tmp_path)
    try:
        assert pc.enable_compilation_cache("rel-xla") == str(tmp_path / "rel-xla")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "rel-xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_two_saves_at_once_under_one_pid_leave_a_whole_file(tmp_path):
    """Replicas that each run as pid 1 (pods in their own PID namespaces) on one cache volume
    wrote the same temporary file: the saved state was torn, or one save failed (until
    2026-12-07). Two threads of one process have one pid too."""
    import threading

    from fastserve_jax.runner import persistent_cache as pc

    path, both = str(tmp_path / "state.json"), threading.Barrier(2)

    def writer(tag: str):
        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(tag * 1000)
                f.flush()
                both.wait(5)            # each has begun its file before either ends it
                f.write(tag * 1000)
        return write

    saved = []
    threads = [threading.Thread(target=lambda t=t: saved.append(pc.save_state(path, writer(t), "state")))
               for t in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert saved == [True, True] and open(path).read() in ("a" * 2000, "b" * 2000)
    assert os.listdir(tmp_path) == ["state.json"]
