"""What every decoder-only model here shares: the forward in three parts, and the scanned layers.

A pipeline stage runs only the parts it owns: `embed` (first stage), `decode` (each stage's
layers), `head` (last stage); `__call__` is all three. An architecture subclasses `CausalLM`,
builds `self.layers = scanned_layers(Block, cfg, dtype)` in its `setup`, and defines `embed`
and `logits` (its final norm and output projection).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fastserve_jax.models.attention import AttnBatch, KVCache
from fastserve_jax.models.config import ModelConfig


def scanned_layers(block: type[nn.Module], cfg: ModelConfig, dtype: jnp.dtype) -> nn.Module:
    """cfg.num_layers copies of `block` as one `nn.scan`, params stacked on a leading layer axis.
    The block is a scan body: carry = (h, cache, layer index), batch broadcast to every layer."""
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=nn.broadcast, length=cfg.num_layers)(cfg, dtype)


class CausalLM(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype = jnp.float32

    def __call__(self, tokens, batch: AttnBatch, cache: KVCache | None = None, logits_idx=None):
        """tokens: (R, Q) int32. logits_idx: flat indices into the R*Q tokens whose logits
        are wanted (None: all). Returns (logits (N, V) float32, cache)."""
        h, cache = self.decode(self.embed(tokens, batch), batch, cache)
        return self.head(h, logits_idx), cache

    def embed(self, tokens, batch: AttnBatch):
        """(R, Q) int32 -> (R, Q, H)."""
        raise NotImplementedError

    def decode(self, h, batch: AttnBatch, cache: KVCache | None):
        """This module's layers over (R, Q, H); the cache holds exactly these layers."""
        (h, cache, _), _ = self.layers((h, cache, jnp.int32(0)), batch)
        return h, cache

    def head(self, h, logits_idx=None):
        """(R, Q, H) -> logits (N, V) float32 of the rows picked by logits_idx."""
        h = h.reshape(-1, self.cfg.hidden_size)
        if logits_idx is not None:
            h = h[logits_idx]
        return self.logits(h).astype(jnp.float32)

    def logits(self, h):
        """(N, H) -> (N, V) in the model's dtype: the final norm and the output projection."""
        raise NotImplementedError
