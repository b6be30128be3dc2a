"""Device side of KV swapping: block gathers and scatters plus copies between memory kinds.

A request's n blocks move as runs of power-of-two length (n = 13 moves as 8 + 4 + 1), so
every copy has one of log2(max blocks) shapes compiled at warm-up and moves exactly the
request's bytes, with no padding:

    swap-out   gather(cache, ids[run]) -> (L, run, bs, Hkv, D) x2 on the device
               -> jax.device_put(..., host memory kind)          async D2H
    swap-in    jax.device_put(host run, device)                   async H2D
               -> scatter(cache, run, ids[run]) -> cache          cache donated: updated in place

The host copies keep the device pool's block layout and live in `pinned_host` memory where
the backend has it (CUDA, TPU and CPU do), else `unpinned_host`. The gather only reads the
cache, and the scatter donates it, so swapping never copies the whole cache. Device work runs
in issue order, so a gather issued before a step reads the blocks before that step can reuse
them, and a scatter issued after a step lands before the next one reads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fastserve_jax.kv_cache import SwapCopy
from models.attention import KVCache


def power_of_two_runs(n: int) -> list[int]:
    """Run lengths, largest first, that add up to n (its binary digits)."""
    return [1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1]


def _gather(cache: KVCache, ids: jax.Array) -> KVCache:
    return KVCache(cache.k[:, ids], cache.v[:, ids])


def _scatter(cache: KVCache, blocks: KVCache, ids: jax.Array) -> KVCache:
    return KVCache(cache.k.at[:, ids].set(blocks.k), cache.v.at[:, ids].set(blocks.v))


def host_memory_kind(device: jax.Device) -> str | None:
    """'pinned_host' where the device offers it, else 'unpinned_host', else None (no host memory
    space: fall back to plain host arrays)."""
    kinds = {m.kind for m in device.addressable_memories()}
    for kind in ("pinned_host", "unpinned_host"):
        if kind in kinds:
            return kind
    return None


@dataclass
class _Upload:
    runs: list[KVCache]              # device arrays, one per run, in flight from the host
    ids: list[np.ndarray]            # the device blocks each run lands in


class KVTransfer:
    """Holds swapped-out KV (per request, as host runs) and issues the copies."""

    def __init__(self, device: jax.Device, max_blocks: int, block_bytes: int) -> None:
        self.device = device
        self.block_bytes = block_bytes
        self.run_sizes = power_of_two_runs((1 << max_blocks.bit_length()) - 1)   # 1 .. >= max_blocks
        self.memory_kind = host_memory_kind(device)
        dev = jax.sharding.SingleDeviceSharding(device)
        self._device_sharding = dev
        self._host_sharding = dev.with_memory_kind(self.memory_kind) if self.memory_kind else None
        self._gather = jax.jit(_gather)
        self._scatter = jax.jit(_scatter, donate_argnames=("cache",))
        self._compiled: dict[tuple, object] = {}
        self._held: dict[str, list[KVCache]] = {}       # request id -> host runs, block-table order
        self._uploads: dict[str, _Upload] = {}
        self.stall_seconds = 0.0                        # the loop waited for a copy to land
        self.blocks_out = self.blocks_in = 0

    # -- warm-up ---------------------------------------------------------------------------
    def lowerings(self, cache: KVCache) -> list[tuple[tuple, object]]:
        """(key, lower) for each gather and scatter shape, for the runner's warm-up pool."""
        out = []
        for n in self.run_sizes:
            ids = jax.ShapeDtypeStruct((n,), jnp.int32)
            run = jax.eval_shape(_gather, cache, ids)
            out.append((("swap_gather", n), lambda ids=ids: self._gather.lower(cache, ids)))
            out.append((("swap_scatter", n), lambda run=run, ids=ids: self._scatter.lower(cache, run, ids)))
        return out

    def add_compiled(self, key: tuple, fn) -> None:
        self._compiled[key] = fn

    def _fn(self, kind: str, n: int):
        return self._compiled.get((kind, n)) or (self._gather if kind == "swap_gather" else self._scatter)

    # -- copies ----------------------------------------------------------------------------
    @staticmethod
    def _runs(blocks: tuple[int, ...]) -> list[np.ndarray]:
        ids, at = [], 0
        for n in power_of_two_runs(len(blocks)):
            ids.append(np.asarray(blocks[at:at + n], np.int32))
            at += n
        return ids

    def _to_host(self, blocks: KVCache) -> KVCache:
        if self._host_sharding is not None:
            return jax.device_put(blocks, self._host_sharding)      # async
        return jax.device_get(blocks)                                # no host memory space: numpy, waits

    def swap_out(self, cache: KVCache, copy: SwapCopy) -> None:
        """Issue the device-to-host copy of the request's blocks (returns at once)."""
        runs = []
        for ids in self._runs(copy.device_blocks):
            blocks = self._fn("swap_gather", ids.shape[0])(cache, ids)
            runs.append(self._to_host(blocks))
        self._held[copy.request.request_id] = runs
        self.blocks_out += copy.num_blocks

    def out_landed(self, request_id: str) -> bool:
        return all(not isinstance(x, jax.Array) or x.is_ready()
                   for run in self._held.get(request_id, ()) for x in (run.k, run.v))

    def start_swap_in(self, copy: SwapCopy) -> None:
        """Issue the host-to-device copy of the request's runs into `copy.device_blocks`; they
        land in the cache at `land_swap_in`."""
        rid = copy.request.request_id
        host = self._held.pop(rid)
        runs = [jax.device_put(r, self._device_sharding) for r in host]
        self._uploads[rid] = _Upload(runs, self._runs(copy.device_blocks))
        self.blocks_in += copy.num_blocks

    def land_swap_in(self, cache: KVCache, request_id: str) -> KVCache:
        """Scatter an issued swap-in into the cache (donated); time spent waiting for its copy to
        arrive counts as stall."""
        up = self._uploads.pop(request_id)
        leaves = [x for run in up.runs for x in (run.k, run.v)]
        if not all(x.is_ready() for x in leaves):
            t0 = time.perf_counter()
            jax.block_until_ready(leaves)
            self.stall_seconds += time.perf_counter() - t0
        for run, ids in zip(up.runs, up.ids):
            cache = self._fn("swap_scatter", ids.shape[0])(cache, run, ids)
        return cache

    def swap_in_now(self, cache: KVCache, copy: SwapCopy) -> KVCache:
        self.start_swap_in(copy)
        return self.land_swap_in(cache, copy.request.request_id)

    def discard(self, request_id: str) -> None:
        """Forget a request's host copy or pending upload (it finished, or its KV was dropped)."""
        self._held.pop(request_id, None)
        self._uploads.pop(request_id, None)

    @property
    def bytes_out(self) -> int:
        return self.blocks_out * self.block_bytes

    @property
    def bytes_in(self) -> int:
        return self.blocks_in * self.block_bytes
