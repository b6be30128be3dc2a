"""Logical axis names -> mesh axes: the one table that says how everything is sharded.

Weights and the KV cache name their dimensions with logical axes (models/axes.py); a
`ShardingRules` table maps each logical axis to mesh axes (mesh.py), and `spec` turns an
array's logical axes into a PartitionSpec. Megatron's layout follows from the table: the
column-parallel projections (q, k, v, gate, up, fc1) split their output units, the
row-parallel ones (o, down, fc2) their input units, so each attention and MLP block ends
in one all-reduce, and the KV cache splits on KV heads like the k/v projections that fill it.

    logical       mesh axes           what it is
    layers        pp                  stacked decoder layers: a pipeline stage holds its own
    heads         (tp_kv, tp_rep)     query heads x head_dim (q/o projections)
    kv_heads      tp_kv               KV heads x head_dim (k/v projections, KV cache)
    mlp           (tp_kv, tp_rep)     MLP hidden units
    vocab         (tp_kv, tp_rep)     embedding rows, lm_head columns
    embed, head_dim, blocks, block_size, positions, embed_in: replicated
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fastserve_jax.sharding.mesh import PP, TP, TP_KV

MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: dict[str, MeshAxes] = {
    "layers": PP,
    "heads": TP,
    "kv_heads": TP_KV,
    "mlp": TP,
    "vocab": TP,
    "embed": None,
    "embed_in": None,
    "positions": None,
    "head_dim": None,
    "blocks": None,
    "block_size": None,
}


class ShardingRules:
    """A validated logical -> mesh axes table."""

    def __init__(self, rules: Mapping[str, MeshAxes] = DEFAULT_RULES, mesh_axes: Sequence[str] = (PP, *TP)) -> None:
        self.rules: dict[str, tuple[str, ...]] = {}
        for logical, axes in rules.items():
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            unknown = [a for a in axes if a not in mesh_axes]
            if unknown:
                raise ValueError(f"rule {logical!r} -> {axes} names mesh axes {unknown} that the mesh "
                                 f"({tuple(mesh_axes)}) does not have")
            if len(set(axes)) != len(axes):
                raise ValueError(f"rule {logical!r} -> {axes} uses a mesh axis twice")
            self.rules[logical] = axes

    def mesh_axes(self, logical: str, mesh: Mesh, size: int | None = None) -> tuple[str, ...]:
        """The axes of `mesh` that split a dimension with this logical axis (and this size:
        none if they do not divide it evenly); see `spec`."""
        if logical not in self.rules:
            raise KeyError(f"no sharding rule for logical axis {logical!r}; known: {sorted(self.rules)}")
        axes = tuple(a for a in self.rules[logical] if a in mesh.axis_names and mesh.shape[a] > 1)
        if size is not None and size % int(np.prod([mesh.shape[a] for a in axes], dtype=int)):
            return ()
        return axes

    def spec(self, logical: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None) -> PartitionSpec:
        """The PartitionSpec of an array with these logical axes on `mesh`.

        Mesh axes that `mesh` lacks are dropped (a stage sub-mesh has no "pp": its arrays hold
        whole stages). With `shape`, a dimension that its mesh axes do not divide evenly stays
        replicated (an odd vocabulary); ParallelConfig.check_model rejects uneven heads, MLP
        widths and layer counts before this point. Two dimensions mapped to one mesh axis raise.
        """
        if shape is not None and len(shape) != len(logical):
            raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
        parts: list[MeshAxes] = []
        used: dict[str, str] = {}
        for i, name in enumerate(logical):
            if name is None:
                parts.append(None)
                continue
            axes = self.mesh_axes(name, mesh, None if shape is None else shape[i])
            for a in axes:
                if a in used:
                    raise ValueError(f"logical axes {used[a]!r} and {name!r} of {tuple(logical)} both map to "
                                     f"mesh axis {a!r}; an array can use a mesh axis once")
                used[a] = name
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        while parts and parts[-1] is None:
            parts.pop()
        return PartitionSpec(*parts)
