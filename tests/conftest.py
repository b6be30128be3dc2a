"""Shared fixtures. Caches (converted params, compiled executables) go to a per-run
temporary directory, so tests neither read nor pollute the user's cache. The CPU backend
gets 8 virtual devices, for the tensor- and pipeline-parallel tests (single-device tests use
the first)."""

from __future__ import annotations

import importlib.metadata
import os
import tempfile

# The suite's XLA:CPU flags compile its ~1,800 tiny executables (half of its CPU time) faster:
# - backend optimisation level 0: the default suite took 376 s on 2 cores with the default
#   level and 276-349 s with 0 (three runs);
# - the legacy element-wise emitters instead of the MLIR fusion emitters: the demo model's full
#   warm-up compiled in 45 s instead of 84 s (backend compile, level 0), the suite's summed
#   compile time fell from 204 s to 107 s and the suite from 296-313 s to 237 s. XLA:CPU then
#   lowers the KV cache's scatter as a loop (test_parallel_layout allows that one loop).
# - one thread per process for Eigen's kernels and one piece per module for code generation:
#   pytest-xdist already runs one worker per core, and the threads each XLA:CPU client started
#   beside them only contended for the same 2 cores. engine, swap, paged-attention and parity
#   test files on 2 workers: 82-84 s without them, 64-72 s with them (2026-12-03; each alone
#   72 s); the default suite in place 226 and 238 s with them, 272 s without between those two
#   runs. Both exist on jaxlib 0.10 and 0.11.
# These change code generation and threading, not what is computed; every test passes either
# way. A flag the caller set wins. Benchmarks never run under this conftest. The emitter flag
# exists on jaxlib 0.10 only: XLA aborts the process on a flag it does not know (jaxlib 0.11
# dropped it).
_FLAGS = ["--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false",
          "--xla_cpu_parallel_codegen_split_count=1"]
if importlib.metadata.version("jaxlib").startswith("0.10."):
    _FLAGS.append("--xla_cpu_use_fusion_emitters=false")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# torch (the transformers parity references) spins one thread per core by default; with
# pytest-xdist's workers on every core those threads wait on each other: a tiny model's
# 30-token generate took 1.7 s with 2 threads on a busy 2-core VM and 0.07 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# One cache per test run, shared by pytest-xdist's workers (they compile the same shapes): the
# first process to load this file (the controller, or the only process without xdist) makes
# the directory and its workers inherit it through the environment. The controller removes it
# at the end (pytest_unconfigure), so runs leave nothing behind in the temporary directory.
_OWN_CACHE = "FASTSERVE_TEST_CACHE_ROOT" not in os.environ
if _OWN_CACHE:
    os.environ["FASTSERVE_TEST_CACHE_ROOT"] = tempfile.mkdtemp(prefix="fastserve-test-cache-")
_session_cache = os.environ["FASTSERVE_TEST_CACHE_ROOT"]
os.environ.setdefault("FASTSERVE_JAX_CACHE", os.path.join(_session_cache, "params"))
os.environ.setdefault("FASTSERVE_JAX_COMPILE_CACHE", os.path.join(_session_cache, "xla"))
# Engines start with no learned output lengths (gittins, predictive) whatever ran before them;
# a test of that persistence points this at its own directory.
os.environ.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """preset name -> directory of a random-weight tiny HF checkpoint (with a byte tokenizer)."""
    from fastserve_jax.models.random_checkpoint import make_random_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, str] = {}

    def get(preset: str) -> str:
        if preset not in cache:
            cache[preset] = make_random_checkpoint(str(root / preset), preset)
        return cache[preset]

    return get


# The README's command runs `--dist worksteal` since 2026-12-04: two pairs run in turn in place
# took 240.6 and 227.0 s against `--dist loadfile`'s 281.3 and 243.3 s (on 2026-12-01, with
# fewer tests and before the XLA flags above, worksteal had been the slower: 364 s against 306).
# The order below still puts the subprocess files first. With `--dist loadfile`, pytest-xdist
# hands out whole files and by default queues them by test
# count, so the one-test files that run subprocesses for 15-30 s (multi-host, startup, device
# check) went last, and one worker ran them while the other sat idle. They now go first; the
# rest keep xdist's order (most tests first). Queuing every file by its measured seconds
# instead balanced the workers but did not shorten the run (240 and 255 s against 233 and
# 268 s on the 2-core VM) and added 8% of summed test time at the same machine speed (451 s
# against 417 s: the engine files that share one small grid then ran side by side).
SUBPROCESS_FILES = ("test_multihost.py", "test_startup.py", "test_device_check.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False      # the order below includes xdist's


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_session_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    from collections import Counter

    count = Counter(item.path for item in items)
    items.sort(key=lambda item: (item.path.name not in SUBPROCESS_FILES, -count[item.path]))   # stable


def pytest_collection_finish(session):
    # Each engine's runner runs a full gc.collect() before it loads (runner/model_runner.py: a
    # dropped engine's executables sit in cyclic garbage), and in a test process that call
    # traversed every object the imports made: ~420,000 with torch and transformers, 0.17-0.26 s
    # each (test_swap.py's 20 engines: 6.9 s of collection). What exists once the tests are
    # collected (modules, classes, test functions) lives to the end of the process; frozen, the
    # collector skips it (test_swap.py: 2.1 s), and the runner's collect still frees every
    # engine a test drops, as those are made after this point (test_engine.py's dropped-engine
    # test still fails without it). transformers, and torch with it, is imported first where a
    # collected test makes a tiny checkpoint (models/random_checkpoint.py imports it then): the
    # process would import it anyway. Only processes that run tests collect (not xdist's controller).
    import gc

    if any("tiny_checkpoints" in item.fixturenames for item in session.items):
        import transformers

        transformers.LlamaConfig      # noqa: B018 (the lazy module imports torch here)
    gc.collect()
    gc.freeze()
