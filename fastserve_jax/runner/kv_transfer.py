"""Device side of KV swapping: block gathers and scatters plus copies between memory kinds.

A request's n blocks move as runs of power-of-two length (n = 13 moves as 8 + 4 + 1), so
every copy has one of log2(max blocks) shapes compiled at warm-up and moves exactly the
request's bytes, with no padding:

    swap-out   gather(cache, ids[run]) -> (L, run, bs, Hkv, D) x2 on the device
               -> jax.device_put(..., host memory kind)          async D2H
    swap-in    jax.device_put(host run, device)                   async H2D
               -> scatter(cache, run, ids[run]) -> cache          cache donated: updated in place

With pipeline stages every stage owns the cache of its layers, and one swap issues the
copies of all stages at once (each stage's on its own devices, so they run in parallel); with
tensor parallelism the KV-head shards move shard by shard, each device to and from its own
host memory. Where tp_rep devices hold each KV head (fewer KV heads than tp), the runs also
split over them (sharding/host_copy.py: on block_size, else head_dim): the gather's output is
already split, each device copies 1/tp_rep of its replica, the host holds every block once,
and the scatter all-gathers the parts over the devices' own links before writing the cache.
Across processes the runs keep the cache's sharding (one copy per device; host_copy.py says why).

Small swaps take a fused path instead (FUSED_MAX_BYTES): the gather writes its runs straight
into host memory and the scatter moves them back inside its compiled call, one call each way
and no `jax.device_put` from Python, whose path costs 60-90 us per array on the CPU and ~0.1-0.2
ms of host time per swap on an H200. A fused copy is ordered with the steps, though: on an H200
a 268 MB swap each way per iteration overlapped a step 0.27 of the way fused against 0.94 with
`device_put`s, which the runtime issues on its transfer streams (`bench_swap_overlap.py`,
2026-12-04). So accelerators fuse a swap only while one device's share of it is at most 4 MiB,
about what the link moves in the host time a `device_put` costs (a threshold reasoned from
those figures, not measured at its edge); the CPU, which has no copy engine to overlap with,
fuses every swap (7B-shaped copies ran at 2.4 GB/s fused against 0.9-1.0 with `device_put`).

The host copies keep the device pool's block layout and live in `pinned_host` memory where
the backend has it (CUDA, TPU and CPU do), else `unpinned_host`. The gather only reads the
cache, and the scatter donates it, so swapping never copies the whole cache. Device work runs
in issue order, so a gather issued before a step reads the blocks before that step can reuse
them, and a scatter issued after a step lands before the next one reads them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from fastserve_jax.kv_cache import NULL_BLOCK, power_of_two_runs
from fastserve_jax.models.attention import KVCache
from fastserve_jax.models.checkpoint import one_device
from fastserve_jax.runner import export_cache
from fastserve_jax.runner.compiler import CompileJob
from fastserve_jax.runner.keys import SwapKey
from fastserve_jax.sharding.host_copy import host_bytes, host_copy_sharding


def _gather(cache: KVCache, ids: jax.Array) -> KVCache:
    return KVCache(cache.k[:, ids], cache.v[:, ids])


def _scatter(cache: KVCache, blocks: KVCache, ids: jax.Array, *, like: NamedSharding) -> KVCache:
    """Write the runs into the cache, first laid out `like` the cache (an all-gather over the
    devices that split a replicated KV head's run; nothing where the run is the cache's layout)."""
    blocks = jax.lax.with_sharding_constraint(blocks, KVCache(like, like))
    return KVCache(cache.k.at[:, ids].set(blocks.k), cache.v.at[:, ids].set(blocks.v))


def _scatter_from_host(cache: KVCache, blocks: KVCache, ids: jax.Array, *, to: NamedSharding,
                       like: NamedSharding) -> KVCache:
    """The fused scatter: the runs cross from host to device memory (`to`: their own layout)
    inside the call (XLA's GPU compiler rejects a scatter that reads host memory; on the CPU
    this cost nothing measurable)."""
    return _scatter(cache, jax.device_put(blocks, KVCache(to, to)), ids, like=like)


# The most bytes of one device's share of a swap (one way) that go by the fused path, per
# backend (see above); other backends use ACCELERATOR_FUSED_MAX_BYTES.
FUSED_MAX_BYTES: dict[str, float] = {"cpu": math.inf}
ACCELERATOR_FUSED_MAX_BYTES = 4 << 20


def fused_max_bytes(platform: str) -> float:
    return FUSED_MAX_BYTES.get(platform, ACCELERATOR_FUSED_MAX_BYTES)


@contextlib.contextmanager
def forced_copy_path(path: str):
    """For benchmarks and tests: KVTransfers built inside take every swap by `path` ('fused' or
    'device_put'; 'backend' changes nothing)."""
    saved = dict(FUSED_MAX_BYTES)
    if path != "backend":
        FUSED_MAX_BYTES.update({p: math.inf if path == "fused" else -1.0 for p in ("cpu", jax.default_backend())})
    try:
        yield
    finally:
        FUSED_MAX_BYTES.clear()
        FUSED_MAX_BYTES.update(saved)


def host_memory_kind(device: jax.Device) -> str | None:
    """'pinned_host' where the device offers it, else 'unpinned_host', else None (no host memory
    space: fall back to plain host arrays)."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    return None


@dataclass(frozen=True)
class LinkSpeed:
    """Seconds one KV block takes to cross between a device and host memory, each way, for
    one device's share of the block (every device moves its own share in parallel): the
    median of `KVTransfer.probe_link`'s timed copies (`device_put`s). It is the link alone; the
    engine's swap path adds a gather before a swap-out and a scatter after a swap-in, device
    work that runs in order with the steps. Small swaps, and every swap on the CPU, do not use
    `device_put` (FUSED_MAX_BYTES); on the CPU they ran faster than this figure (docs/swapping.md)."""
    out_seconds_per_block: float
    in_seconds_per_block: float
    device_block_bytes: int

    def bytes_per_second(self, direction: str) -> float:
        t = self.out_seconds_per_block if direction == "out" else self.in_seconds_per_block
        return self.device_block_bytes / t if t > 0 else 0.0


@dataclass
class _Upload:
    runs: list[list[KVCache]]        # per run, per stage: device arrays in flight from the host
                                     # (fused: the host copies themselves, read by the scatter)
    ids: list[np.ndarray]            # the device blocks each run lands in
    fused: bool                      # the scatter moves the runs from host memory itself


Caches = list[KVCache]               # one per pipeline stage


class KVTransfer:
    """Holds swapped-out KV (per request, as host runs of every stage) and issues the copies."""

    def __init__(self, cache_shardings: list[NamedSharding], max_blocks: int, block_bytes: int,
                 cache_shape: tuple[int, ...]) -> None:
        """One sharding per stage cache of `cache_shape` (layers, blocks, block size, kv heads,
        head dim); `block_bytes`: a block's K and V over every stage, once (kv_block_bytes)."""
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.run_sizes = power_of_two_runs((1 << max_blocks.bit_length()) - 1)   # 1 .. >= max_blocks
        self.memory_kind = host_memory_kind(cache_shardings[0].mesh.devices.flat[0])
        # the runs' layout on the device on their way to and from host memory (host_copy.py)
        self._run_sharding = [host_copy_sharding(s, cache_shape) for s in cache_shardings]
        self._host_sharding = ([r.with_memory_kind(self.memory_kind) for r in self._run_sharding]
                               if self.memory_kind else None)
        # host memory one swapped block takes, and bytes its copy moves, each way, over all devices
        self.host_block_bytes = host_bytes(block_bytes, cache_shardings, cache_shape)
        platform = cache_shardings[0].mesh.devices.flat[0].platform
        # a swap whose per-device share is at most this many bytes takes the fused path (above)
        self.fused_max_bytes = fused_max_bytes(platform) if self.memory_kind else -1.0
        self._share: int | None = None          # bytes of one device's share of a block (_block_share)
        self._gather = {False: [jax.jit(_gather, out_shardings=KVCache(r, r)) for r in self._run_sharding]}
        self._scatter = {False: [jax.jit(functools.partial(_scatter, like=s), donate_argnames=("cache",),
                                         out_shardings=KVCache(s, s)) for s in cache_shardings]}
        if self._host_sharding is not None:     # fused: the gather's output and the scatter's input are host copies
            self._gather[True] = [jax.jit(_gather, out_shardings=KVCache(h, h)) for h in self._host_sharding]
            self._scatter[True] = [jax.jit(functools.partial(_scatter_from_host, to=r, like=s),
                                           donate_argnames=("cache",), out_shardings=KVCache(s, s))
                                   for r, s in zip(self._run_sharding, cache_shardings)]
        self._compiled: dict[SwapKey, object] = {}
        # request id -> its host copy's runs in block-table order: [first block, length, the run
        # on every stage, or None where the device kept the blocks (prefix caching's pins)]
        self._held: dict[str, list[list]] = {}
        self._uploads: dict[str, _Upload] = {}
        self.stall_seconds = 0.0                        # the loop waited for a copy to land
        self.blocks_out = self.blocks_in = 0
        # of those, the blocks moved by the fused path, whose copies run in the device's queue
        # between steps (the steps wait for them; swap_copies.py estimates that time)
        self.fused_blocks_out = self.fused_blocks_in = 0

    # -- warm-up ---------------------------------------------------------------------------
    def compile_jobs(self, caches: Caches) -> list[CompileJob]:
        """A job for each gather and scatter shape of each stage, on each copy path a swap of that
        run can take, for the runner's warm-up pool."""
        share = self._block_share(caches)
        any_put = self.max_blocks * share > self.fused_max_bytes    # the largest request's swap goes by device_put
        jobs = []
        for s, cache in enumerate(caches):
            for n in self.run_sizes:
                # a run of n blocks goes fused in swaps under the threshold if n blocks fit under
                # it, and by device_put in swaps over it
                for fused in [True] * (n * share <= self.fused_max_bytes) + [False] * any_put:
                    ids = jax.ShapeDtypeStruct((n,), jnp.int32)
                    at = (self._host_sharding if fused else self._run_sharding)[s]
                    run = KVCache(*(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=at)
                                    for x in jax.eval_shape(_gather, cache, ids)))
                    suffix = "_host" if fused else ""
                    jobs.append(CompileJob(
                        export_cache.build_job(self._gather[fused][s], cache, ids, name="kv_gather" + suffix),
                        functools.partial(self._compiled.__setitem__, SwapKey("gather" + suffix, n, s))))
                    jobs.append(CompileJob(
                        export_cache.build_job(self._scatter[fused][s], cache, run, ids, name="kv_scatter" + suffix,
                                             donate=(0,)),
                        functools.partial(self._compiled.__setitem__, SwapKey("scatter" + suffix, n, s))))
        return jobs

    def run_once(self, caches: Caches) -> Caches:
        """Run each compiled gather once with the scatter of its run (a full warm-up: see
        Compiler.run_once), on the null block: every id is 0, so the scatter writes the null
        block's own contents back. The caches are donated; returns the new ones. Counts no
        swap."""
        caches = list(caches)
        for key in self._compiled:
            if key.op.startswith("gather"):
                ids = np.zeros(key.run, np.int32)
                run = self._compiled[key](caches[key.stage], ids)     # where the scatter of its path reads it
                scatter = self._compiled.get(SwapKey("scatter" + key.op[len("gather"):], key.run, key.stage))
                if scatter is not None:
                    caches[key.stage] = scatter(caches[key.stage], run, ids)
        jax.block_until_ready(caches)
        return caches

    def _fn(self, op: str, fused: bool, n: int, stage: int):
        return (self._compiled.get(SwapKey(op + ("_host" if fused else ""), n, stage))
                or (self._gather if op == "gather" else self._scatter)[fused][stage])

    def _block_share(self, caches: Caches) -> int:
        """Bytes of one device's share of a KV block, what it copies to or from host memory (K and
        V, every layer of the largest stage's share: that stage moves slowest; 1/tp_rep of its
        replica where the runs split a replicated KV head)."""
        if self._share is None:
            def share(cache: KVCache, sharding: NamedSharding) -> int:
                shape = sharding.shard_shape(cache.k.shape)        # (layers, blocks, block size, kv heads, head dim)
                return 2 * int(np.prod(shape)) // shape[1] * cache.k.dtype.itemsize
            self._share = max(share(c, s) for c, s in zip(caches, self._run_sharding))
        return self._share

    def fused(self, blocks: int) -> bool:
        """A swap of this many blocks takes the fused path (known once a cache has been seen)."""
        return self._share is not None and blocks * self._share <= self.fused_max_bytes

    # -- the link's speed --------------------------------------------------------------------
    def probe_link(self, caches: Caches, max_blocks: int = 16, max_bytes: int = 32 << 20,
                   repeats: int = 5) -> LinkSpeed:
        """Time up to `max_blocks` blocks (at most `max_bytes`, at least one block) of one
        device's share of the KV (the largest stage's share: that stage moves slowest) to host
        memory and back, `repeats` times after one untimed round; per-block medians. A plain
        array on one of this process's devices, not the cache: no compile, nothing for other
        processes to replay, and nothing in the cache is touched."""
        block = self._block_share(caches)
        blocks = max(1, min(max_blocks, max_bytes // block))
        mesh = self._run_sharding[0].mesh
        device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
        on_device = one_device(device)
        x = jax.device_put(np.zeros(blocks * block, np.uint8), on_device)
        x.block_until_ready()
        to_host = (functools.partial(jax.device_put, device=on_device.with_memory_kind(self.memory_kind))
                   if self.memory_kind else np.asarray)
        outs, ins = [], []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            h = to_host(x)
            jax.block_until_ready(h)
            t1 = time.perf_counter()
            jax.device_put(h, on_device).block_until_ready()
            t2 = time.perf_counter()
            if i:
                outs.append((t1 - t0) / blocks)
                ins.append((t2 - t1) / blocks)
        return LinkSpeed(float(np.median(outs)), float(np.median(ins)), block)

    # -- copies ----------------------------------------------------------------------------
    @staticmethod
    def _layout(blocks: tuple[int, ...]) -> list[list]:
        """A host copy's runs: the leading NULL_BLOCKs (blocks the device keeps) and the rest,
        each in power-of-two runs, largest first: [first block, length, None]."""
        pinned = next((i for i, b in enumerate(blocks) if b != NULL_BLOCK), len(blocks))
        out, at = [], 0
        for part in (pinned, len(blocks) - pinned):
            for n in power_of_two_runs(part):
                out.append([at, n, None])
                at += n
        return out

    def _to_host(self, runs: list[list[KVCache]]) -> list[list[KVCache]]:
        """Every run of every stage to host memory in one device_put (the accelerators' path; on
        the CPU, where it was measured, a call cost ~0.1 ms of host time whatever it moved: a
        7-block request's three runs took 0.42 ms one by one, 0.27 ms together)."""
        if self._host_sharding is not None:
            return jax.device_put(runs, [self._host_sharding[:len(run)] for run in runs])     # async
        return jax.device_get(runs)                                        # no host memory space: numpy, waits

    def swap_out(self, caches: Caches, request_id: str, blocks: tuple[int, ...]) -> None:
        """Issue the device-to-host copies of the request's `blocks` (block-table order) on every
        stage (returns at once). Leading NULL_BLOCKs are not copied: the device keeps those blocks
        (prefix caching's pins, prefix_cache.py), and the host copy has no runs there until a
        later call for the same request fills them (its other blocks NULL_BLOCK then)."""
        self._block_share(caches)
        held = self._held.get(request_id) or self._held.setdefault(request_id, self._layout(blocks))
        todo = [(e, np.asarray(blocks[e[0]:e[0] + e[1]], np.int32)) for e in held if blocks[e[0]] != NULL_BLOCK]
        assert all(e[2] is None and (ids != NULL_BLOCK).all() for e, ids in todo), \
            f"{request_id}: a swap-out over a host copy's run, or across its layout"
        moved = sum(e[1] for e, _ in todo)
        fused = self.fused(moved)
        got = [[self._fn("gather", fused, e[1], s)(cache, ids) for s, cache in enumerate(caches)] for e, ids in todo]
        for (e, _), run in zip(todo, got if fused or not got else self._to_host(got)):
            e[2] = run
        self.blocks_out += moved
        self.fused_blocks_out += moved if fused else 0

    def host_runs(self, request_id: str) -> list[list[KVCache]]:
        """The runs the request's host copy holds (each on every stage)."""
        return [run for _, _, run in self._held.get(request_id, ()) if run is not None]

    def out_landed(self, request_id: str) -> bool:
        return all(not isinstance(x, jax.Array) or x.is_ready()
                   for run in self.host_runs(request_id) for part in run for x in part)

    def start_swap_in(self, request_id: str, blocks: tuple[int, ...]) -> None:
        """Issue the host-to-device copies of the request's runs into device `blocks`; they land
        in the caches at `land_swap_in`. A run whose blocks are all NULL_BLOCK (the device holds
        them already: prefix caching) is not copied; one with some is, and its NULL_BLOCK rows
        land in the null block, which nothing reads."""
        keep = [(run, ids) for at, n, run in self._held.pop(request_id)
                if ((ids := np.asarray(blocks[at:at + n], np.int32)) != NULL_BLOCK).any()]
        assert all(run is not None for run, _ in keep), f"{request_id}: a swap-in needs a run the host copy lacks"
        host, ids = [run for run, _ in keep], [i for _, i in keep]
        moved = sum(i.shape[0] for i in ids)
        fused = self.fused(moved)
        if fused or not host:
            runs = host                  # the scatter moves them from host memory
        else:
            runs = jax.device_put(host, [self._run_sharding[:len(run)] for run in host])     # one call, as _to_host
        self._uploads[request_id] = _Upload(runs, ids, fused)
        self.blocks_in += moved
        self.fused_blocks_in += moved if fused else 0

    def in_landed(self, request_id: str) -> bool:
        """The request's issued swap-in copies are all on the device (landing it will not wait)."""
        return all(x.is_ready() for run in self._uploads[request_id].runs for part in run for x in part)

    def land_swap_in(self, caches: Caches, request_id: str) -> Caches:
        """Scatter an issued swap-in into every stage's cache (donated); time spent waiting for
        its copies to arrive counts as stall."""
        up = self._uploads.pop(request_id)
        leaves = [x for run in up.runs for part in run for x in part]
        if not all(x.is_ready() for x in leaves):
            t0 = time.perf_counter()
            jax.block_until_ready(leaves)
            self.stall_seconds += time.perf_counter() - t0
        caches = list(caches)
        for run, ids in zip(up.runs, up.ids):
            for s, part in enumerate(run):
                caches[s] = self._fn("scatter", up.fused, ids.shape[0], s)(caches[s], part, ids)
        return caches

    def swap_in_now(self, caches: Caches, request_id: str, blocks: tuple[int, ...]) -> Caches:
        self.start_swap_in(request_id, blocks)
        return self.land_swap_in(caches, request_id)

    def discard(self, request_id: str) -> None:
        """Forget a request's host copy or pending upload (it finished, or its KV was dropped)."""
        self._held.pop(request_id, None)
        self._uploads.pop(request_id, None)

    @property
    def bytes_out(self) -> int:
        """Bytes the swap-outs copied to host memory, over all devices."""
        return self.blocks_out * self.host_block_bytes

    @property
    def bytes_in(self) -> int:
        return self.blocks_in * self.host_block_bytes
