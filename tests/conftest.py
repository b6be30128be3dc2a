"""Shared fixtures. Caches (converted params, compiled executables) go to a per-run
temporary directory, so tests neither read nor pollute the user's cache. The CPU backend
gets 8 virtual devices, for the tensor- and pipeline-parallel tests (single-device tests use
the first)."""

from __future__ import annotations

import os
import tempfile

# XLA:CPU's backend optimisation level 0 compiles the suite's hundreds of tiny executables
# faster: the default suite took 376 s on 2 cores with the default level and
# 276-349 s with 0 (three runs), every test passing both ways. It changes LLVM's code generation, not
# what is computed; a flag the caller set wins. Benchmarks never run under this conftest.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

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


# Seconds each of the slowest files took in the default suite (2-core VM, 2026-12-01, two
# workers). pytest-xdist hands out whole files (`--dist loadfile`) and by default queues them by
# test count, so the one-test files that take 15-30 s (multi-host, startup, device check) went
# last and one worker ran them while the other sat idle. Queuing the slowest files first
# (longest-processing-time-first) lets both workers finish together. Unlisted files keep their
# collection order after these; an outdated figure costs balance, never a test.
SLOWEST_FILES = {
    "test_parallel.py": 64, "test_no_thrash.py": 36, "test_server.py": 28, "test_swap.py": 28,
    "test_startup.py": 22, "test_engine_parity.py": 24, "test_multihost.py": 20, "test_device_check.py": 20,
    "test_predictor.py": 17, "test_models.py": 16, "test_attention_backend.py": 15, "test_engine.py": 14,
    "test_serve_cli.py": 14, "test_demo_engine.py": 14, "test_paged_attention.py": 9, "test_demo_task.py": 9,
    "test_predictive.py": 9, "test_distributed.py": 7, "test_parallel_layout.py": 7,
}


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False      # keep the order below


def pytest_unconfigure(config):
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(_session_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SLOWEST_FILES.get(item.path.name, 0))    # stable: files stay whole
