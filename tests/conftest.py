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

# one cache per test run, shared by pytest-xdist's workers (they compile the same shapes)
_run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_session_cache = (os.path.join(tempfile.gettempdir(), f"fastserve-test-cache-{_run}") if _run
                  else tempfile.mkdtemp(prefix="fastserve-test-cache-"))
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
