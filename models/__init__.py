"""Flax model definitions, Hugging Face checkpoint loading, orbax checkpoints, the demo model."""

from __future__ import annotations

if __name__ == "models":  # imported by the generic top-level name from a source checkout
    raise ImportError("import fastserve_jax.models: the models/ folder installs under the fastserve_jax namespace")

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastserve_jax.models.attention import HeadSharding, dense_batch
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.llama import LlamaBlock, LlamaForCausalLM
from fastserve_jax.models.opt import OPTBlock, OPTForCausalLM

_ARCHS = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
_BLOCKS = {"llama": LlamaBlock, "opt": OPTBlock}


def build_model(cfg: ModelConfig, dtype: str = "float32") -> nn.Module:
    """The Linen module for an architecture; params come from `models.loader`."""
    return _ARCHS[cfg.arch](cfg, jnp.dtype(dtype))


def param_shapes(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """The param tree `build_model(cfg, dtype)` expects, as jax.ShapeDtypeStruct leaves (a
    fresh tree of the same leaves on every call; the leaves are immutable)."""
    return jax.tree.map(lambda s: s, _param_shapes(cfg, jnp.dtype(dtype).name))


@functools.lru_cache(maxsize=16)
def _param_shapes(cfg: ModelConfig, dtype: str) -> dict:
    # tracing the model's init takes 0.1-0.2 s, and a load asks two or three times
    module = build_model(cfg, dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), tokens, dense_batch(tokens.shape))["params"]


def build_block(cfg: ModelConfig, dtype: str = "float32", attention_backend: str = "reference",
                heads: HeadSharding | None = None) -> nn.Module:
    """One decoder layer of the architecture, applied with one layer's slice of `layers/*`:
    `block.apply({"params": layer_params}, (h, cache, layer_index), batch)`. The serving
    launches run their layers as a Python loop of these (see sharding/pipeline.py), so the
    layer index is static and the Pallas attention backend ("pallas", attention.py) can run;
    `heads`: its head shards on a tensor-parallel stage (attention.HeadSharding)."""
    return _BLOCKS[cfg.arch](cfg, jnp.dtype(dtype), attention_backend, heads)


def demo_model_path() -> str:
    """Directory of the bundled demo model (HF format: config, safetensors, tokenizer)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
