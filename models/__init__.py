"""Flax model definitions, Hugging Face checkpoint loading, orbax checkpoints, the demo model."""

from __future__ import annotations

import os

import flax.linen as nn
import jax.numpy as jnp

from models.config import ModelConfig
from models.llama import LlamaBlock, LlamaForCausalLM
from models.opt import OPTBlock, OPTForCausalLM

_ARCHS = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}
_BLOCKS = {"llama": LlamaBlock, "opt": OPTBlock}


def build_model(cfg: ModelConfig, dtype: str = "float32") -> nn.Module:
    """The Linen module for an architecture; params come from `models.loader`."""
    return _ARCHS[cfg.arch](cfg, jnp.dtype(dtype))


def build_block(cfg: ModelConfig, dtype: str = "float32") -> nn.Module:
    """One decoder layer of the architecture, applied with one layer's slice of `layers/*`:
    `block.apply({"params": layer_params}, (h, cache, layer_index), batch)`. The serving
    launches run their layers as a Python loop of these (see sharding/pipeline.py)."""
    return _BLOCKS[cfg.arch](cfg, jnp.dtype(dtype))


def demo_model_path() -> str:
    """Directory of the bundled demo model (HF format: config, safetensors, tokenizer)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
