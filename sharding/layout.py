"""Where every param, KV block and activation lives for one (tp, pp) layout.

The canonical param tree (the one checkpoints save and restore) has the model's usual
structure; its leaves are placed by the rules table:

    layers/*             one global array over the (pp, tp_kv, tp_rep) mesh: "layers" maps to
                         "pp", so stage s's devices hold layers [s*L/pp, (s+1)*L/pp)
    first-stage params   (embeddings, project_in) on stage 0's sub-mesh
    last-stage params    (final norm, lm_head, project_out) on stage pp-1's sub-mesh

`split_layers(params)` gives what each stage computes with: its end's params
(`stage_ends`; a tied embedding is copied once to the last stage) plus its layers copied
out into one array per layer, cut from its own shards (`stage_layers_view`, no copy) on
its own sub-mesh. A launch then reads each layer's weights in place instead of slicing
them out of the stack. The KV cache exists only per stage: (L/pp, blocks, block_size,
KV heads, head_dim) on the stage's sub-mesh, split on KV heads.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec

from fastserve_jax.models.attention import HeadSharding
from fastserve_jax.models.axes import ACTIVATION_AXES, CACHE_AXES, FIRST, LAST, leaf_axes, stages_of
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.sharding.mesh import Meshes, build_meshes
from fastserve_jax.sharding.parallel_config import ParallelConfig
from fastserve_jax.sharding.rules import ShardingRules


def _unstack(x: jax.Array) -> list[jax.Array]:
    """(n, ...) -> n arrays (...), each partitioned like x minus its leading (unsharded) axis."""
    spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    assert spec[0] is None, f"the layer axis is split inside a stage: {x.sharding.spec}"
    return list(_unstacker(x.shape[0], NamedSharding(x.sharding.mesh, PartitionSpec(*spec[1:])))(x))


@functools.lru_cache(maxsize=256)
def _unstacker(n: int, one: NamedSharding):
    """One jitted split per (layers, sharding), so leaves of the same shape (every stage's, and
    several of a layer's) trace and compile once: a new jit per leaf traced and lowered each
    time (0.6 s per engine start over 8 virtual devices in tests/test_parallel.py)."""
    return jax.jit(lambda a: [a[i] for i in range(n)], out_shardings=[one] * n)


def move(x: jax.Array, target: NamedSharding) -> jax.Array:
    """Copy `x` to another stage's sub-mesh with the same partitioning (activations, a tied
    embedding). In one process that is jax.device_put. Across processes every stage spans all
    of them the same way (mesh.ordered_devices), so each process copies its own shards to its
    own devices of the next stage and assembles them; nothing crosses hosts (multi-controller
    JAX refuses a device_put between different device sets, docs/multihost_findings.md)."""
    if x.is_fully_addressable:
        return jax.device_put(x, target)
    key = lambda idx: tuple((s.start, s.stop) for s in idx)
    local = {key(sh.index): sh.data for sh in x.addressable_shards}
    parts = [jax.device_put(local[key(idx)], d) for d, idx in target.addressable_devices_indices_map(x.shape).items()]
    return jax.make_array_from_single_device_arrays(x.shape, target, parts)


class ModelLayout:
    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(),
                 devices: list[jax.Device] | None = None, rules: ShardingRules | None = None) -> None:
        parallel.check_model(model_cfg.num_layers, model_cfg.num_heads, model_cfg.intermediate_size)
        self.model_cfg = model_cfg
        self.parallel = parallel
        self.meshes: Meshes = build_meshes(parallel, model_cfg.num_kv_heads, devices)
        self.rules = rules or ShardingRules()

    @property
    def pp(self) -> int:
        return self.parallel.pp

    @property
    def tp(self) -> int:
        return self.parallel.tp

    @property
    def layers_per_stage(self) -> int:
        return self.model_cfg.num_layers // self.pp

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.meshes.mesh.devices.flat)

    # -- params ----------------------------------------------------------------------------
    def _home(self, path: tuple[str, ...]):
        """The mesh a canonical param lives on."""
        if path[0] == "layers":
            return self.meshes.mesh
        ends = stages_of(self.model_cfg, path[0])
        return self.meshes.stages[0 if FIRST in ends else self.pp - 1]

    def param_sharding(self, path: tuple[str, ...], shape: tuple[int, ...]) -> NamedSharding:
        mesh = self._home(path)
        return NamedSharding(mesh, self.rules.spec(leaf_axes(path), mesh, shape))

    def param_shardings(self, params: dict) -> dict:
        """Shardings for a tree of arrays or ShapeDtypeStructs with the model's structure."""
        return unflatten_dict({p: self.param_sharding(p, x.shape) for p, x in flatten_dict(params).items()})

    def abstract_params(self, shapes: dict) -> dict:
        """ShapeDtypeStructs carrying this layout's shardings: the target of a sharded load or
        an orbax restore (which reshards a checkpoint saved under any other layout)."""
        return unflatten_dict({p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.param_sharding(p, x.shape))
                               for p, x in flatten_dict(shapes).items()})

    def place_params(self, params: dict) -> dict:
        """Put an existing tree (e.g. numpy, or on one device) into this layout."""
        return jax.tree.map(jax.device_put, params, self.param_shardings(params))

    def stage_ends(self, params: dict, s: int) -> dict:
        """The params outside `layers` that stage s owns (its end of the model), on its
        sub-mesh; a tied embedding is copied once to the last stage."""
        mesh = self.meshes.stages[s]
        out = {}
        for p, x in flatten_dict(params).items():
            if p[0] == "layers":
                continue
            ends = stages_of(self.model_cfg, p[0])
            if (s == 0 and FIRST in ends) or (s == self.pp - 1 and LAST in ends):
                want = NamedSharding(mesh, self.rules.spec(leaf_axes(p), mesh, x.shape))
                out[p] = x if x.sharding == want else move(x, want)
        return unflatten_dict(out)

    def stage_layers_view(self, x: jax.Array, path: tuple[str, ...], s: int) -> jax.Array:
        """Stage s's layers of the global `layers/*` leaf `x`, as an (L/pp, ...) array on
        the stage's sub-mesh made of x's own shards (no copy)."""
        mesh = self.meshes.stages[s]
        devs = set(mesh.devices.flat)
        shape = (self.layers_per_stage, *x.shape[1:])
        spec = self.rules.spec(leaf_axes(path), mesh, shape)
        shards = [sh.data for sh in x.addressable_shards if sh.device in devs]
        return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, spec), shards)

    def split_layers(self, params: dict, free: bool = False) -> list[dict]:
        """Every stage's tree, what `stage_forward` runs: `stage_ends(params, s)` plus
        `layers`, a tuple of L/pp per-layer trees copied out of the stage's view of each
        global `layers/*` leaf. With `free`, each global `layers/*` leaf is deleted
        once copied out, so the peak is one leaf above the weights (the caller must not use
        those leaves afterwards); without it, the copies coexist with `params` until the
        caller drops it."""
        layers = {p: x for p, x in flatten_dict(params).items() if p[0] == "layers"}
        per_layer = [[{} for _ in range(self.layers_per_stage)] for _ in range(self.pp)]
        for p, x in layers.items():
            for s in range(self.pp):
                for i, a in enumerate(_unstack(self.stage_layers_view(x, p, s))):
                    per_layer[s][i][p[1:]] = a
            if free:
                x.delete()
        return [{**self.stage_ends(params, s), "layers": tuple(unflatten_dict(t) for t in per_layer[s])}
                for s in range(self.pp)]

    # -- KV cache and activations ------------------------------------------------------------
    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        c = self.model_cfg
        return (self.layers_per_stage, num_blocks, block_size, c.num_kv_heads, c.head_dim)

    def cache_sharding(self, s: int, shape: tuple[int, ...]) -> NamedSharding:
        mesh = self.meshes.stages[s]
        return NamedSharding(mesh, self.rules.spec(CACHE_AXES, mesh, shape))

    def activation_sharding(self, s: int) -> NamedSharding:
        """(R, Q, H) activations entering stage s, and the logits leaving the last: replicated."""
        mesh = self.meshes.stages[s]
        return NamedSharding(mesh, self.rules.spec(ACTIVATION_AXES, mesh))

    def head_sharding(self, s: int) -> HeadSharding | None:
        """How stage s splits attention heads, for the Pallas kernels (None: one device, or
        no split): the mesh axes of the query heads and of the KV heads, from the rules, and
        those that split a device's KV heads' groups (attention.HeadSharding.spread)."""
        mesh, c = self.meshes.stages[s], self.model_cfg
        heads = self.rules.mesh_axes("heads", mesh, c.num_heads)
        if not heads:
            return None
        kv = self.rules.mesh_axes("kv_heads", mesh, c.num_kv_heads)
        own_kv = c.num_kv_heads // int(np.prod([mesh.shape[a] for a in kv]))
        return HeadSharding(mesh, heads, kv, tuple(a for a in heads if a not in kv) if own_kv > 1 else ())

    def replicated(self, s: int) -> NamedSharding:
        return NamedSharding(self.meshes.stages[s], PartitionSpec())

    def describe(self) -> str:
        m = self.meshes
        return (f"tp={self.tp} (kv heads over {m.tp_kv}, each on {m.tp_rep}) x pp={self.pp} "
                f"({self.layers_per_stage} layers per stage) on {len(self.devices)} {self.devices[0].platform} devices")
