"""Compilation and warm-up: every executable serving can call, compiled before it is needed.

Three tables, one per kind of key (keys.py):
    Stage.compiled[LaunchKey]        each pipeline stage's forward, per launch shape
    ModelRunner.samplers[SamplerKey] the sampler's variants, per logits-row count
    KVTransfer (SwapKey)             gathers and scatters of each power-of-two run

XLA compiles outside the GIL, so a small thread pool overlaps the compiles (lowering stays
serial); on a 2-core machine that is close to 2x. Each launch shape gets the compiler
options of its size (xla_flags.py), and the persistent cache (persistent_cache.py) serves
a second start from disk.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from fastserve_jax.models.attention import AttnBatch
from fastserve_jax.runner.keys import LaunchKey, SamplerKey
from fastserve_jax.runner.launch import LaunchBuilder
from fastserve_jax.runner.xla_flags import launch_compiler_options
from fastserve_jax.sampling import Penalties, SamplingArrays
from fastserve_jax.sharding.pipeline import Stage


@dataclass
class CompileJob:
    """One executable to build: `lower()` traces it, `store` files the compiled result."""

    lower: Callable[[], jax.stages.Lowered]
    store: Callable[[object], None]
    options: dict[str, str] | None = None


def abstract_launch_args(builder: LaunchBuilder, key: LaunchKey, stage: Stage, hidden_size: int, act_dtype):
    """(x, batch, logits_idx) as ShapeDtypeStructs: what a stage's forward takes for `key`."""
    r, q, n = builder.launch_shape(key)
    nb = key.blocks
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    batch = AttnBatch(i32(r, q), i32(r, q), i32(r, q), i32(r, nb), i32(r, nb), i32(r, nb))
    x = i32(r, q) if stage.first else jax.ShapeDtypeStruct((r, q, hidden_size), act_dtype,
                                                           sharding=stage.input_sharding)
    return x, batch, i32(n)


def stage_jobs(builder: LaunchBuilder, stages: list[Stage], hidden_size: int, act_dtype) -> list[CompileJob]:
    jobs = []
    for st in stages:
        platform = st.devices[0].platform
        for key in builder.launch_keys():
            x, batch, idx = abstract_launch_args(builder, key, st, hidden_size, act_dtype)
            jobs.append(CompileJob(functools.partial(st.fn.lower, st.params, st.cache, x, batch, idx),
                                   functools.partial(st.compiled.__setitem__, key),
                                   launch_compiler_options(platform, tokens=key.tokens)))
    return jobs


def sampler_jobs(sample_jit, builder: LaunchBuilder, vocab: int, max_model_len: int, last: Stage,
                 table: dict[SamplerKey, Callable]) -> list[CompileJob]:
    """Every sampler variant, on the devices the logits are on (replicated over the last stage)."""
    sds = functools.partial(jax.ShapeDtypeStruct, sharding=last.replicated)
    jobs = []
    for n in builder.sampler_rows():
        logits = sds((n, vocab), jnp.float32)
        s = SamplingArrays(*(sds((n,), dt) for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32)))
        pen = Penalties(sds((n,), jnp.float32), sds((n,), jnp.float32), sds((n, max_model_len), jnp.int32))
        for greedy in (True, False):
            for lp in (False, True):
                for with_pen in (False, True):
                    args = (logits, s, pen) if with_pen else (logits, s)
                    jobs.append(CompileJob(functools.partial(sample_jit.lower, *args, greedy=greedy, with_logprobs=lp),
                                           functools.partial(table.__setitem__, SamplerKey(n, greedy, lp, with_pen))))
    return jobs


def compile_all(jobs: list[CompileJob], progress: Callable[[int, int], None] | None = None,
                threads: int | None = None) -> None:
    """Compile the jobs on a thread pool and file each result; `progress(done, total)`."""
    workers = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(lambda j: j.lower().compile(compiler_options=j.options or None), job): job
                   for job in jobs}
        for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            futures[fut].store(fut.result())
            if progress:
                progress(done, len(jobs))
