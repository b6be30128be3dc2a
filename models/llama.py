"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) as a Flax Linen module.

RMSNorm, rotary positions (rope_theta, Llama-3 rope_scaling), grouped-query attention,
gated MLP (SwiGLU, or hidden_act's gate), optional QKV (and o_proj, MLP) biases, tied or untied embeddings. The layers are one `nn.scan`,
so their params are stacked on a leading layer axis (the canonical tree checkpoints use).
Serving launches instead run `LlamaBlock` once per layer on per-layer arrays split from
that stack (sharding/pipeline.py, docs/performance.md).

Param tree (weights are (out, in), as torch stores them: models/linear.py; L = num_layers):
  embed_tokens/embedding (V, H)
  layers/input_norm/scale (L, H)        layers/post_attn_norm/scale (L, H)
  layers/attn/{q,k,v,o}_proj/weight     (L, Hq*D, H) ... (L, H, Hq*D); q,k,v bias if attention_bias,
                                        o bias if o_proj_bias
  layers/mlp/{gate,up}_proj/weight (L, I, H)    layers/mlp/down_proj/weight (L, H, I); biases if mlp_bias
  norm/scale (H)                        lm_head/weight (V, H)  (absent when tied)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastserve_jax.models.attention import AttnBatch, HeadSharding, KVCache, apply_rope, attention, rope_inv_freq
from fastserve_jax.models.causal_lm import CausalLM, scanned_layers
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.linear import Linear, activation


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (xf * scale).astype(self.dtype)


class LlamaAttention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    attention_backend: str = "reference"     # or "pallas": attention.attention
    heads: HeadSharding | None = None        # the kernel's head shards under tensor parallelism

    @nn.compact
    def __call__(self, x, batch: AttnBatch, cache: KVCache | None, layer):
        c = self.cfg
        r, q_len, _ = x.shape
        dense = lambda n, name, bias: Linear(n, use_bias=bias, dtype=self.dtype, param_dtype=self.dtype, name=name)
        q = dense(c.num_heads * c.head_dim, "q_proj", c.attention_bias)(x)
        k = dense(c.num_kv_heads * c.head_dim, "k_proj", c.attention_bias)(x)
        v = dense(c.num_kv_heads * c.head_dim, "v_proj", c.attention_bias)(x)
        q = q.reshape(r, q_len, c.num_heads, c.head_dim)
        k = k.reshape(r, q_len, c.num_kv_heads, c.head_dim)
        v = v.reshape(r, q_len, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        q = apply_rope(q, batch.positions, inv_freq)
        k = apply_rope(k, batch.positions, inv_freq)
        o, cache = attention(q, k, v, batch, cache, layer, self.attention_backend, self.heads)
        o = dense(c.hidden_size, "o_proj", c.o_proj_bias)(o.reshape(r, q_len, -1))
        return o, cache


class LlamaMLP(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: Linear(n, use_bias=self.cfg.mlp_bias, dtype=self.dtype, param_dtype=self.dtype,
                                       name=name)
        g = dense(self.cfg.intermediate_size, "gate_proj")(x)
        u = dense(self.cfg.intermediate_size, "up_proj")(x)
        return dense(self.cfg.hidden_size, "down_proj")(activation(self.cfg.activation)(g) * u)


class LlamaBlock(nn.Module):
    """One decoder layer, written as a scan body: carry = (h, cache, layer index)."""

    cfg: ModelConfig
    dtype: jnp.dtype
    attention_backend: str = "reference"
    heads: HeadSharding | None = None

    @nn.compact
    def __call__(self, carry, batch: AttnBatch):
        h, cache, layer = carry
        a, cache = LlamaAttention(self.cfg, self.dtype, self.attention_backend, self.heads, name="attn")(
            RMSNorm(self.cfg.norm_eps, self.dtype, name="input_norm")(h), batch, cache, layer)
        h = h + a
        h = h + LlamaMLP(self.cfg, self.dtype, name="mlp")(RMSNorm(self.cfg.norm_eps, self.dtype, name="post_attn_norm")(h))
        return (h, cache, layer + 1), None


class LlamaForCausalLM(CausalLM):
    """embed, decode, head (see causal_lm.py)."""

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        self.layers = scanned_layers(LlamaBlock, c, self.dtype)
        self.norm = RMSNorm(c.norm_eps, self.dtype)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)

    def embed(self, tokens, batch: AttnBatch):
        return self.embed_tokens(tokens)

    def logits(self, h):
        h = self.norm(h)
        return self.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
