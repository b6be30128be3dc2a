"""How swapped-out KV lies in host memory: once per KV head, not once per device that reads it.

A stage's cache (layers, blocks, block size, kv heads, head dim) splits on KV heads over tp_kv
and is replicated over tp_rep (mesh.py): with fewer KV heads than tp, tp_rep devices hold every
KV head. A host copy with the cache's own sharding would hold tp_rep copies of every block and
move tp_rep times its bytes over the links to host memory. So a run of swapped blocks also
splits over the axes the cache is replicated on, on block_size if they divide it, else on
head_dim, else nowhere (the copy stays replicated):

    cache        (L, blocks, bs, Hkv/tp_kv, D)              on every device of a tp_rep group
    host copy    (L, run, bs/tp_rep, Hkv/tp_kv, D)          each device writes its own part

and the swap-in's scatter all-gathers the parts back over the devices' own links
(runner/kv_transfer.py). block_size comes first: a split of the minor-most dimension made the
all-gather a relayout too, and with 64 blocks of (8, 16, 2, 128) float32 at tp=4 over 2 KV heads
on 8 virtual CPU devices the swap-in took 28-45 ms split on head_dim against 15-22 ms on
block_size (11-20 ms with the replicated copy); on a TPU a half of a 128-wide head_dim would
also fill only half of its lane tiles.

Across processes the copy keeps the cache's sharding: mesh.ordered_devices interleaves the
processes at the innermost mesh position, so every tp_rep group spans processes there, and an
all-gather over the data-centre network at every swap-in would cost more than the host copy
it saves.
"""

from __future__ import annotations

import math
from typing import Sequence

from jax.sharding import NamedSharding, PartitionSpec

from fastserve_jax.models.axes import CACHE_AXES

SPLIT_AXES = ("block_size", "head_dim")        # the cache's dimensions a host copy may split, in order


def replicated_axes(sharding: NamedSharding) -> tuple[str, ...]:
    """The mesh axes (of size > 1) an array with this sharding is replicated over."""
    used = {a for p in sharding.spec if p is not None for a in ((p,) if isinstance(p, str) else p)}
    return tuple(a for a in sharding.mesh.axis_names if a not in used and sharding.mesh.shape[a] > 1)


def copies(sharding: NamedSharding) -> int:
    """How many devices hold each element of an array with this sharding."""
    return math.prod(sharding.mesh.shape[a] for a in replicated_axes(sharding))


def host_copy_sharding(cache: NamedSharding, shape: Sequence[int]) -> NamedSharding:
    """The sharding (in the cache's memory kind) of a run of blocks on its way to or from host
    memory, for a cache of `shape` with sharding `cache` (see above): `cache` itself where it
    is replicated over no axis, where its mesh spans processes, or where no dimension divides."""
    axes = replicated_axes(cache)
    if not axes or cache.mesh.is_multi_process:
        return cache
    n = math.prod(cache.mesh.shape[a] for a in axes)
    spec = list(cache.spec) + [None] * (len(shape) - len(cache.spec))
    for dim in (CACHE_AXES.index(name) for name in SPLIT_AXES):
        if spec[dim] is None and shape[dim] % n == 0:
            spec[dim] = axes[0] if len(axes) == 1 else axes
            return NamedSharding(cache.mesh, PartitionSpec(*spec), memory_kind=cache.memory_kind)
    return cache


def host_bytes(block_bytes: int, caches: Sequence[NamedSharding], shape: Sequence[int]) -> int:
    """Host memory one swapped block takes over every stage (`caches`: one cache sharding per
    stage, `block_bytes`: the block's K and V once): the copies its host layout keeps, on average
    over the stages, times that."""
    return block_bytes * sum(copies(host_copy_sharding(c, shape)) for c in caches) // len(caches)
