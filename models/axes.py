"""Logical axis names of every param and of the KV cache (sharding/rules.py maps them to mesh
axes), and which pipeline stage needs each top-level param.

Leaves are matched by (module name, leaf name); stacked layer leaves (under "layers") get a
leading "layers" axis. A param without an entry raises, so a new module cannot silently end
up replicated.
"""

from __future__ import annotations

from flax.traverse_util import flatten_dict, unflatten_dict

from fastserve_jax.models.config import ModelConfig

# (module, leaf) -> logical axes of one layer's (or the unstacked) array
_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("embed_positions", "embedding"): ("positions", "embed"),
    ("project_in", "weight"): ("embed", "embed_in"),
    ("project_out", "weight"): ("embed_in", "embed"),
    ("lm_head", "weight"): ("vocab", "embed"),
    ("q_proj", "weight"): ("heads", "embed"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "weight"): ("kv_heads", "embed"), ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "weight"): ("kv_heads", "embed"), ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "weight"): ("embed", "heads"), ("o_proj", "bias"): ("embed",),
    ("out_proj", "weight"): ("embed", "heads"), ("out_proj", "bias"): ("embed",),
    ("gate_proj", "weight"): ("mlp", "embed"), ("up_proj", "weight"): ("mlp", "embed"),
    ("gate_proj", "bias"): ("mlp",), ("up_proj", "bias"): ("mlp",),
    ("down_proj", "weight"): ("embed", "mlp"), ("down_proj", "bias"): ("embed",),
    ("fc1", "weight"): ("mlp", "embed"), ("fc1", "bias"): ("mlp",),
    ("fc2", "weight"): ("embed", "mlp"), ("fc2", "bias"): ("embed",),
}
_NORM_LEAVES = ("scale", "bias")   # any *norm* module: (embed,)

# KV cache per K and V: (L, num_blocks, block_size, n_kv_heads, head_dim)
CACHE_AXES = ("layers", "blocks", "block_size", "kv_heads", "head_dim")
ACTIVATION_AXES = (None, None, "embed")     # (R, Q, H) between pipeline stages: replicated

FIRST, LAST = "first", "last"


def leaf_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    module, leaf = path[-2], path[-1]
    if (module, leaf) in _AXES:
        axes = _AXES[(module, leaf)]
    elif "norm" in module and leaf in _NORM_LEAVES:
        axes = ("embed",)
    else:
        raise KeyError(f"no logical axes for param {'/'.join(path)!r}; add it to models/axes.py")
    return ("layers", *axes) if path[0] == "layers" else axes


def param_axes(params: dict) -> dict:
    """A tree like `params` (arrays or ShapeDtypeStructs) with each leaf's logical axes."""
    flat = flatten_dict(params)
    out = {}
    for p, leaf in flat.items():
        axes = leaf_axes(p)
        if len(axes) != len(leaf.shape):
            raise ValueError(f"param {'/'.join(p)} has shape {leaf.shape} but logical axes {axes}")
        out[p] = axes
    return unflatten_dict(out)


def stages_of(cfg: ModelConfig, top: str) -> tuple[str, ...]:
    """Which ends of the pipeline need top-level param `top` ("layers" are split instead).
    A tied embedding is read by the first stage (lookup) and the last (logits)."""
    if top == "layers":
        return ()
    if top == "embed_tokens":
        return (FIRST, LAST) if cfg.tie_word_embeddings else (FIRST,)
    if top in ("embed_positions", "project_in"):
        return (FIRST,)
    if top in ("norm", "final_norm", "lm_head", "project_out"):
        return (LAST,)
    raise KeyError(f"no pipeline stage for top-level param {top!r}; add it to models/axes.py")
