"""Sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Pure functions of (logits, per-row parameters); the runner jits them with the mode static:

- greedy mode: argmax only (the common serving and benchmark case, no vocabulary sort);
- random mode: temperature, then top-k and top-p over one descending sort; rows with
  temperature 0 still take the argmax.

Randomness is per request: row i draws with key fold_in(PRNGKey(seed_i), step_i), where
step_i is the number of tokens the request has generated so far. A request's samples
therefore do not depend on what else shares its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastserve_jax.config import MAX_LOGPROBS


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, all shape (N,)."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array        # int32, <= 0 = disabled
    top_p: jax.Array        # float32 in (0, 1]
    seed: jax.Array         # uint32
    step: jax.Array         # int32, tokens generated so far


class Sampled(NamedTuple):
    tokens: jax.Array                     # (N,) int32
    logprob: jax.Array | None = None      # (N,) logprob of the sampled token
    top_ids: jax.Array | None = None      # (N, MAX_LOGPROBS)
    top_logprobs: jax.Array | None = None


def _sample_random(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    n, v = logits.shape
    greedy = s.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, s.temperature)[:, None]
    order = jnp.argsort(-scaled, axis=-1)                          # (N, V) descending
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(v)[None, :]
    k = jnp.where(s.top_k > 0, s.top_k, v)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                    # mass strictly above this rank
    keep = (rank < k) & ((before < s.top_p[:, None]) | (rank == 0))
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
    choice = jax.vmap(jax.random.categorical)(keys, masked)        # index into the sorted order
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(greedy, order[:, 0], drawn).astype(jnp.int32)


def sample(logits: jax.Array, s: SamplingArrays, *, greedy: bool, with_logprobs: bool) -> Sampled:
    """logits: (N, V) float32 -> sampled tokens (and logprobs of the raw distribution)."""
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else _sample_random(logits, s)
    if not with_logprobs:
        return Sampled(tokens)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
