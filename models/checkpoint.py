"""Param trees <-> orbax checkpoints (restored with StandardCheckpointer).

Restore goes into a tree of `jax.ShapeDtypeStruct` whose shardings say where each array
lands, so params saved from one mesh can be restored into another (or into host memory).
A checkpoint stores whole logical arrays, not a layout: a tree saved from a (tp, pp) layout
(layer leaves on the global mesh, end-of-pipeline leaves on stage sub-meshes) restores into
any other layout or onto one device, and vice versa.
"""

from __future__ import annotations

import os

import jax

# orbax is imported where it is used: it costs a start that does not touch a checkpoint a
# third of a second.


def save_params(path: str, params: dict, *, compress: bool = False) -> None:
    """Write params to a new checkpoint directory `path` (must not exist; orbax finalizes it
    atomically, so a crash never leaves a half-written `path`). Blocks until written.

    Leaves may be sharded, each over its own devices (different meshes in one tree are fine):
    every distinct shard is written once (its first replica), with no gather onto one device.

    The layout is StandardCheckpointer's (a PyTree checkpoint, OCDBT); it is written
    uncompressed by default because zstd decompression made restoring a 125M-param model
    about 2x slower on a 2-core CPU, while weights shrink by only ~8%.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"checkpoint {path!r} already exists; remove it or pick another path")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=compress)) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(params))


def one_device(device) -> jax.sharding.Sharding:
    """An array on `device` alone. jax 0.12.1 deprecated jax.sharding.SingleDeviceSharding for
    make_single_device_sharding (which jax 0.10 lacks): every engine start warned, and would
    fail with AttributeError once a later jax removes the name."""
    make = getattr(jax.sharding, "make_single_device_sharding", None)
    return make(device) if make is not None else jax.sharding.SingleDeviceSharding(device)


def _target(leaf) -> jax.ShapeDtypeStruct:
    sharding = getattr(leaf, "sharding", None) or one_device(jax.devices()[0])
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def restore_params(path: str, target_shapes: dict) -> dict:
    """Read a checkpoint written by `save_params`.

    target_shapes: tree of jax.ShapeDtypeStruct (or arrays) with the saved structure; each
    leaf's dtype and sharding (default: the first device) decide the restored array's, e.g.
    `ModelLayout.abstract_params(param_shapes(cfg, dtype))`. Each device's block is read on its own.
    """
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}")
    target = jax.tree.map(_target, target_shapes)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, target)
        except ValueError as e:
            if ".kernel:" in str(e):
                raise ValueError(f"checkpoint {path!r} holds Linen Dense 'kernel' leaves, (in, out), as fastserve-jax "
                                 "wrote them before 2026-12-03; the models now store each weight (out, in) as "
                                 "'weight' (models/linear.py). Convert it again from the Hugging Face weights "
                                 "(load_model does so by itself), or transpose every kernel and rename it 'weight'"
                                 ) from e
            raise
