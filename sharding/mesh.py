"""Meshes from the parallel config: one global mesh, and one tensor-parallel sub-mesh per
pipeline stage.

    global mesh  (pp, tp_kv, tp_rep)      axes ("pp", "tp_kv", "tp_rep")
    stage s      (tp_kv, tp_rep)          the devices of global row s

Tensor parallelism is two mesh axes whose product is `tensor_parallel_size`: attention
heads, MLP units and the vocabulary split over both, KV heads only over `tp_kv`. With
tp_kv = gcd(tp, num_kv_heads), a model with fewer KV heads than tp (GQA) keeps each KV head
on tp_rep = tp / tp_kv devices, the ones whose query heads read it, instead of splitting a
head or replicating every head everywhere. When num_kv_heads is a multiple of tp, tp_rep = 1.

Device order: global row s holds stage s. In one process that is jax.devices() in order;
across processes every stage takes the same share of each process's devices (see
`ordered_devices`), so a stage's activations, sampled tokens and swapped KV shards stay
inside each process and no pipeline transfer crosses hosts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh

from fastserve_jax.sharding.parallel_config import ParallelConfig

PP, TP_KV, TP_REP = "pp", "tp_kv", "tp_rep"
TP = (TP_KV, TP_REP)            # the tensor-parallel axes, major first


def ordered_devices(n: int, devices: list[jax.Device] | None = None, tp: int | None = None) -> list[jax.Device]:
    """The first n devices in mesh order. Across processes, position i*P + p is process p's
    i-th device, so that every row of the (pp, tp) grid spans all processes equally (which
    takes a `tp` that is a multiple of P)."""
    devs = list(devices if devices is not None else jax.devices())
    if len(devs) < n:
        raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {n} devices wanted, but only "
                         f"{len(devs)} are visible ({devs[0].platform if devs else 'none'}); on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N or jax_num_cpu_devices")
    procs = sorted({d.process_index for d in devs})
    if len(procs) == 1:
        return devs[:n]
    if n % len(procs):
        raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {n} devices cannot be spread evenly "
                         f"over {len(procs)} processes: every process serves an equal share of the mesh "
                         f"(-tp / -pp whose product is a multiple of {len(procs)})")
    if tp is not None and tp % len(procs):      # a stage on some processes only failed deep in JAX at start
        raise ValueError(f"tensor_parallel_size {tp} is not a multiple of the {len(procs)} processes: every "
                         f"pipeline stage spans every process here (docs/parallelism.md, \"Placement across "
                         f"hosts\"), so -tp must be a multiple of {len(procs)}; pipeline stages on hosts of their "
                         "own (vLLM's -pp = the number of nodes) are not supported")
    per = [[d for d in devs if d.process_index == p][: n // len(procs)] for p in procs]
    if min(len(x) for x in per) < n // len(procs):
        raise ValueError(f"every process needs {n // len(procs)} devices for this mesh")
    return [per[p][i] for i in range(n // len(procs)) for p in range(len(procs))]


@dataclass(frozen=True)
class Meshes:
    config: ParallelConfig
    tp_kv: int
    tp_rep: int
    mesh: Mesh                  # (pp, tp_kv, tp_rep)
    stages: tuple[Mesh, ...]    # pp meshes of (tp_kv, tp_rep)

    @property
    def pp(self) -> int:
        return self.config.pp

    @property
    def tp(self) -> int:
        return self.config.tp


def build_meshes(config: ParallelConfig, num_kv_heads: int, devices: list[jax.Device] | None = None) -> Meshes:
    tp_kv = math.gcd(config.tp, num_kv_heads)
    tp_rep = config.tp // tp_kv
    grid = np.array(ordered_devices(config.num_devices, devices, config.tp), dtype=object).reshape(config.pp, tp_kv, tp_rep)
    mesh = Mesh(grid, (PP, TP_KV, TP_REP))
    stages = tuple(Mesh(grid[s], (TP_KV, TP_REP)) for s in range(config.pp))
    return Meshes(config, tp_kv, tp_rep, mesh, stages)
