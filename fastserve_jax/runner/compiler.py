"""Compilation: every executable serving calls, compiled once, when the warm-up mode says.

Three tables, one per kind of key (keys.py):
    Stage.compiled[LaunchKey]        each pipeline stage's forward, per launch shape
    Compiler.samplers[SamplerKey]    the sampler's variants, per logits-row count
    KVTransfer (SwapKey)             gathers and scatters of each power-of-two run

Warm-up modes (EngineConfig.warmup):
    lazy        nothing before serving; a launch or sampler shape compiles the first time a
                batch needs it (`ensure`), as a full warm-up compiles it.
    background  the covering set first (the largest launch of each kind and the samplers of
                their row counts: enough to answer any request, padded), then the rest on a
                background thread, smallest shapes first. Launches use the smallest compiled
                bucket that fits (LaunchBuilder.ready), so no request waits on a compile.
    full        everything before serving; afterwards nothing compiles.

XLA compiles outside the GIL, so a small thread pool overlaps a full warm-up's compiles; on
a 2-core machine that is close to 2x. The persistent cache (persistent_cache.py) serves a
second start from disk.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import functools
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastserve_jax.models.attention import AttnBatch
from fastserve_jax.runner import export_cache
from fastserve_jax.runner.keys import DecodeKey, LaunchKey, PrefillKey, SamplerKey
from fastserve_jax.runner.launch import LaunchBuilder
from fastserve_jax.sampling import Penalties, SamplingArrays
from fastserve_jax.sampling_params import BIAS_SLOTS
from fastserve_jax.sharding.pipeline import Stage

log = logging.getLogger(__name__)

WARMUP_MODES = ("lazy", "background", "full")


def resolve_warmup(warmup: str | bool) -> str:
    """A warm-up mode by name; True and False (the old switch) mean "full" and "lazy"."""
    mode = {True: "full", False: "lazy"}.get(warmup, warmup) if isinstance(warmup, (bool, str)) else warmup
    if mode not in WARMUP_MODES:
        raise ValueError(f"warmup must be one of {WARMUP_MODES}, got {warmup!r}")
    return mode


@dataclass
class CompileJob:
    """One executable to build: `build()` compiles it (export_cache.build), `store` files it."""

    build: Callable[[], jax.stages.Compiled]
    store: Callable[[object], None]

    def run(self) -> None:
        self.store(self.build())


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: lowering needs no live buffers,
    so a cache donated since still lowers."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def abstract_launch_args(builder: LaunchBuilder, key: LaunchKey, stage: Stage, hidden_size: int, act_dtype):
    """(x, batch, logits_idx) as ShapeDtypeStructs: what a stage's forward takes for `key`."""
    r, q, n = builder.launch_shape(key)
    nb = key.blocks
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    batch = AttnBatch(i32(r, q), i32(r, q), i32(r, q), i32(r, nb), i32(r, nb), i32(r, nb))
    x = i32(r, q) if stage.first else jax.ShapeDtypeStruct((r, q, hidden_size), act_dtype,
                                                           sharding=stage.input_sharding)
    return x, batch, i32(n)


def _filled(shape: tuple, dtype, value, sharding) -> jax.Array:
    """An array of `value` placed by `sharding` (across processes each puts the same value, in
    the same order: run_once is mirrored)."""
    return jax.device_put(np.full(shape, value, dtype), sharding)


def run_jobs(jobs: list[CompileJob], progress: Callable[[int, int], None] | None = None,
             threads: int | None = None) -> None:
    """Compile the jobs on a thread pool and file each result; `progress(done, total)`.

    If a job or `progress` raises (a server stopping during its warm-up raises from
    `progress`, as does Ctrl-C here), the jobs not yet started are dropped and the exception
    propagates once the running ones are done: leaving the pool would otherwise wait for
    every queued compile, and the running ones are let finish so that their persistent-cache
    entries are written whole."""
    workers = threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job.run) for job in jobs]
        try:
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                fut.result()
                if progress:
                    progress(done, len(jobs))
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


class Compiler:
    """Builds the compile job of any key and runs it when the warm-up mode says."""

    def __init__(self, builder: LaunchBuilder, stages: list[Stage], sample_jit, vocab: int, hidden_size: int,
                 act_dtype, max_model_len: int, context: str = "") -> None:
        self.builder = builder
        self.context = context      # what the stage functions close over (export_cache keys)
        self.stages = stages
        self._sample = sample_jit
        self.vocab, self.hidden_size, self.act_dtype, self.max_model_len = vocab, hidden_size, act_dtype, max_model_len
        self.samplers: dict[SamplerKey, Callable] = {}
        self._lock = threading.Lock()
        # background compile: keys queued in order, and the one being compiled (with the event
        # that is set when it is filed); a daemon thread, so exiting never waits for the queue
        self._queue: collections.deque = collections.deque()
        self._running: tuple[object, threading.Event] | None = None
        self._thread: threading.Thread | None = None

    # -- jobs ------------------------------------------------------------------------------
    def launch_jobs(self, key: LaunchKey) -> list[CompileJob]:
        """One job per pipeline stage for launch `key` (a prompt-logprobs prefill's last stage
        is its own program, which also takes the targets: Stage.plp_fn)."""
        jobs = []
        for st in self.stages:
            x, batch, idx = abstract_launch_args(self.builder, key, st, self.hidden_size, self.act_dtype)
            fn, extra, name = st.fn, (), f"{self.context}/stage{st.index}"
            if st.last and key.prompt_logprobs:
                fn, extra, name = st.plp_fn, (jax.ShapeDtypeStruct((key.tokens,), jnp.int32),), name + "/prompt_logprobs"
            jobs.append(CompileJob(export_cache.build_job(fn, st.params, abstract(st.cache), x, batch, idx, *extra,
                                                        name=name, donate=(1,)),
                                   functools.partial(st.compiled.__setitem__, key)))
        return jobs

    def sampler_args(self, key: SamplerKey, fill: Callable | None = None) -> tuple:
        """The sampler's arguments for `key`, on the devices the logits are on (replicated over
        the last stage): ShapeDtypeStructs, or with `fill` arrays of fill(shape, dtype, value)
        holding neutral values (temperature, top-p and repetition penalty 1, min-p 0, empty histories
        and biases)."""
        rep = self.stages[-1].replicated
        arg = (lambda shape, dt, v: fill(shape, dt, v, rep)) if fill else (
            lambda shape, dt, v: jax.ShapeDtypeStruct(shape, dt, sharding=rep))
        n = key.rows
        logits = arg((n, self.vocab), jnp.float32, 0)
        s = SamplingArrays(*(arg((n,), dt, v) for dt, v in ((jnp.float32, 1), (jnp.int32, 0), (jnp.float32, 1),
                                                             (jnp.float32, 0), (jnp.uint32, 0), (jnp.int32, 0))))
        args = (logits, s)
        if key.penalties:
            args += (Penalties(arg((n,), jnp.float32, 0), arg((n,), jnp.float32, 0), arg((n,), jnp.float32, 1),
                               arg((n,), jnp.int32, 0), arg((n, self.max_model_len), jnp.int32, -1),
                               arg((n, BIAS_SLOTS), jnp.int32, -1),
                               arg((n, BIAS_SLOTS), jnp.float32, 0), arg((n,), jnp.bool_, False)),)
        return args

    def sampler_job(self, key: SamplerKey) -> CompileJob:
        """The sampler variant, compiled for `sampler_args`."""
        return CompileJob(export_cache.build_job(self._sample, *self.sampler_args(key), name="sample",
                                                 greedy=key.greedy, with_logprobs=key.logprobs),
                          functools.partial(self.samplers.__setitem__, key))

    @staticmethod
    def sampler_keys(rows: int, base_only: bool = False) -> list[SamplerKey]:
        """The sampler variants for `rows` logits rows; base_only: greedy and random, without
        logprobs or penalties (what most requests use; the others compile when first asked)."""
        extras = ((False, False),) if base_only else ((False, False), (False, True), (True, False), (True, True))
        return [SamplerKey(rows, g, lp, pen) for g in (True, False) for lp, pen in extras]

    def jobs(self, key) -> list[CompileJob]:
        return [self.sampler_job(key)] if isinstance(key, SamplerKey) else self.launch_jobs(key)

    # -- what is ready ---------------------------------------------------------------------
    def compiled(self, key) -> bool:
        if isinstance(key, SamplerKey):
            return key in self.samplers
        return all(key in st.compiled for st in self.stages)

    def launch_ready(self, key: LaunchKey) -> bool:
        """The launch and the base sampler variants of its logits rows are compiled (a request
        with logprobs or penalties may wait on one sampler compile)."""
        rows = self.builder.launch_shape(key)[2]
        return self.compiled(key) and all(k in self.samplers for k in self.sampler_keys(rows, base_only=True))

    def all_keys(self) -> list:
        """Every launch and sampler key serving can use, smallest (most common when load is
        light, and quickest to compile) first; each decode row count's samplers just before
        its first launch."""
        keys: list = []
        launches = sorted(self.builder.launch_keys(), key=lambda k: (k.tokens * k.blocks, k.kind))
        seen_rows: set[int] = set()
        for k in launches:
            rows = self.builder.launch_shape(k)[2]
            if rows not in seen_rows:
                seen_rows.add(rows)
                keys += self.sampler_keys(rows)
            keys.append(k)
        return keys

    def covering_keys(self) -> list:
        """The largest launch of each kind and the base samplers of their rows: with
        LaunchBuilder falling back to the smallest compiled bucket that fits, these answer any
        request."""
        c = self.builder.cfg
        dec = max((k for k in self.builder.launch_keys() if isinstance(k, DecodeKey)), key=lambda k: (k.rows, k.blocks))
        pre = PrefillKey(c.prefill_token_buckets[-1], c.block_buckets[-1])
        return (self.sampler_keys(dec.rows, base_only=True) + [dec]
                + self.sampler_keys(c.max_prefill_seqs, base_only=True) + [pre])

    # -- compiling -------------------------------------------------------------------------
    def ensure(self, key) -> None:
        """Compile `key` now unless it is compiled; if the background thread is compiling it,
        wait for that one compile instead (a queued key is taken out of the queue)."""
        if self.compiled(key):
            return
        with self._lock:
            running = self._running
            if running is None or running[0] != key:
                running = None
                try:
                    self._queue.remove(key)
                except ValueError:
                    pass
        if running is not None:
            running[1].wait()
            if self.compiled(key):
                return
        for job in self.jobs(key):
            job.run()

    def compile_now(self, keys: list, progress=None, threads: int | None = None, swap_jobs=()) -> None:
        jobs = [j for k in keys if not self.compiled(k) for j in self.jobs(k)] + list(swap_jobs)
        run_jobs(jobs, progress, threads)

    def run_once(self, keys: list) -> None:
        """Run each compiled launch (every stage) and sampler of `keys` once on padding: no
        token is real, every K/V write lands in the null block and every block read is masked.
        A compiled program's first run costs more than the next (XLA:CPU sets up its dots
        then: 10-30 ms a launch shape on the demo model), so a full warm-up pays it here rather
        than the first requests. Each stage's cache is donated and replaced, as in serving."""
        outs = []
        for key in keys:
            if isinstance(key, SamplerKey):
                outs.append(self.samplers[key](*self.sampler_args(key, _filled)))
                continue
            r, q, n = self.builder.launch_shape(key)
            nb = key.blocks
            batch = AttnBatch(*(np.full(shape, v, np.int32) for shape, v in (
                ((r, q), 0), ((r, q), -1), ((r, q), 0), ((r, nb), 0), ((r, nb), -2), ((r, nb), 0))))
            for st in self.stages:
                x = (np.zeros((r, q), np.int32) if st.first else
                     _filled((r, q, self.hidden_size), self.act_dtype, 0, st.input_sharding))
                outs.append(st.run(key, x, batch, np.zeros(n, np.int32)))
        jax.block_until_ready(outs)

    def start_background(self, keys: list, swap_jobs=()) -> None:
        """Compile `keys` (then the swap copies) one at a time on a daemon thread, in order."""
        with self._lock:
            self._queue.extend(k for k in keys if not self.compiled(k))
            self._queue.extend(swap_jobs)
        # The thread and the exit hook (before exit abandons the thread mid-compile) hold the
        # compiler through a weak reference, so that neither keeps a dropped engine's weights,
        # caches and executables alive (device memory, memory maps: see ModelRunner).
        ref = weakref.ref(self)
        self._thread = threading.Thread(target=_drain, args=(ref,), name="fastserve-compile", daemon=True)
        self._thread.start()
        atexit.register(lambda: (c := ref()) is not None and c.stop_background())

    def stop_background(self) -> None:
        """Drop what is still queued and wait for the compile in progress (at most one)."""
        with self._lock:
            self._queue.clear()
        self.wait_background()

    def _drain_one(self) -> bool:
        """Compile the next queued item; False once the queue is empty."""
        with self._lock:
            if not self._queue:
                self._running = None
                return False
            item = self._queue.popleft()
            done = threading.Event()
            self._running = (item, done)
        try:
            if isinstance(item, CompileJob):
                item.run()
            elif not self.compiled(item):
                for job in self.jobs(item):
                    job.run()
        except Exception as e:      # ended the thread silently, the rest never compiled (until 2026-12-07)
            log.warning("background compile of %s failed (%s: %.300s); launches of that shape pad to a larger "
                        "compiled one", item, type(e).__name__, e)
        finally:
            done.set()
        return True

    def background_done(self) -> bool:
        with self._lock:
            return not self._queue and self._running is None

    def wait_background(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def count(self) -> int:
        """Executables compiled so far (launch shapes per stage and sampler variants)."""
        return sum(len(st.compiled) for st in self.stages) + len(self.samplers)


def _drain(ref: "weakref.ref[Compiler]") -> None:
    """The background thread: the queue, one item at a time, holding the compiler only while
    it compiles one; a compiler dropped meanwhile ends it after that compile."""
    while (c := ref()) is not None and c._drain_one():
        del c
