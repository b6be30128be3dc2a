"""OPT decoder (the family the FastServe paper evaluates) as a Flax Linen module.

Learned positions (offset 2, as in HF), LayerNorm (pre- or post-attention per
`do_layer_norm_before`), ReLU (or activation_function's) MLP, biases everywhere, lm_head tied
to the embedding (or its own when tie_word_embeddings is false), optional
project_in/project_out when word_embed_proj_dim differs from hidden_size.

Param tree (weights are (out, in), as torch stores them: models/linear.py; L = num_layers):
  embed_tokens/embedding (V, E)         embed_positions/embedding (max_pos + 2, H)
  project_in/weight (H, E), project_out/weight (E, H)   (only when E != H)
  layers/attn_norm/{scale,bias} (L, H)  layers/{q,k,v,out}_proj/{weight,bias}
  layers/ffn_norm/{scale,bias} (L, H)   layers/fc1/{weight,bias} (L, I, H)  layers/fc2 (L, H, I)
  final_norm/{scale,bias} (H)           (only for pre-LN models)
  lm_head/weight (V, E)                 (only when untied)
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fastserve_jax.models.attention import AttnBatch, HeadSharding, attention
from fastserve_jax.models.causal_lm import CausalLM, scanned_layers
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.linear import Linear, activation

POSITION_OFFSET = 2  # HF OPTLearnedPositionalEmbedding reserves the first two rows


class OPTBlock(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    attention_backend: str = "reference"     # or "pallas": attention.attention
    heads: HeadSharding | None = None        # the kernel's head shards under tensor parallelism

    @nn.compact
    def __call__(self, carry, batch: AttnBatch):
        h, cache, layer = carry
        c = self.cfg
        r, q_len, _ = h.shape
        dense = lambda n, name: Linear(n, use_bias=True, dtype=self.dtype, param_dtype=self.dtype, name=name)
        norm = lambda name: nn.LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.dtype, name=name)

        x = norm("attn_norm")(h) if c.do_layer_norm_before else h
        q = dense(c.hidden_size, "q_proj")(x).reshape(r, q_len, c.num_heads, c.head_dim)
        k = dense(c.hidden_size, "k_proj")(x).reshape(r, q_len, c.num_heads, c.head_dim)
        v = dense(c.hidden_size, "v_proj")(x).reshape(r, q_len, c.num_heads, c.head_dim)
        o, cache = attention(q, k, v, batch, cache, layer, self.attention_backend, self.heads)
        h = h + dense(c.hidden_size, "out_proj")(o.reshape(r, q_len, -1))
        if not c.do_layer_norm_before:
            h = norm("attn_norm")(h)

        x = norm("ffn_norm")(h) if c.do_layer_norm_before else h
        h = h + dense(c.hidden_size, "fc2")(activation(c.activation)(dense(c.intermediate_size, "fc1")(x)))
        if not c.do_layer_norm_before:
            h = norm("ffn_norm")(h)
        return (h, cache, layer + 1), None


class OPTForCausalLM(CausalLM):
    """embed, decode, head (see causal_lm.py)."""

    def setup(self):
        c = self.cfg
        e_dim = c.word_embed_proj_dim or c.hidden_size
        self.embed_tokens = nn.Embed(c.vocab_size, e_dim, dtype=self.dtype, param_dtype=self.dtype)
        self.embed_positions = nn.Embed(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, dtype=self.dtype,
                                        param_dtype=self.dtype)
        if e_dim != c.hidden_size:
            self.project_in = Linear(c.hidden_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
            self.project_out = Linear(e_dim, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = scanned_layers(OPTBlock, c, self.dtype)
        if c.do_layer_norm_before:
            self.final_norm = nn.LayerNorm(c.norm_eps, dtype=self.dtype, param_dtype=self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)

    def _projected(self) -> bool:
        return bool(self.cfg.word_embed_proj_dim) and self.cfg.word_embed_proj_dim != self.cfg.hidden_size

    def embed(self, tokens, batch: AttnBatch):
        h = self.embed_tokens(tokens)
        if self._projected():
            h = self.project_in(h)
        return h + self.embed_positions(jnp.maximum(batch.positions, 0) + POSITION_OFFSET)

    def logits(self, h):
        if self.cfg.do_layer_norm_before:
            h = self.final_norm(h)
        if self._projected():
            h = self.project_out(h)
        return self.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
