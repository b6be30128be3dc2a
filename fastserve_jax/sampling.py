"""Sampling on the device: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Pure functions of (logits, per-row parameters); the runner jits them with the mode static:

- greedy mode: argmax only (the common serving and benchmark case, no vocabulary sort);
- random mode: temperature, then top-k (tokens tied with the k-th stay), then top-p over the
  distribution top-k left (renormalized), as vLLM and transformers do, over one descending
  sort; rows with temperature 0 (or below GREEDY_BELOW) still take the argmax.

Presence and frequency penalties and logit biases (OpenAI's; min_tokens bans EOS and stop
tokens as a bias of -inf) are applied first when a `Penalties` is given; passing None instead
is a different pytree structure, hence its own compiled variant, so batches without them pay
nothing for them. Logprobs are those of the raw model distribution, before penalties, biases
and temperature.

Randomness is per request: row i draws with key fold_in(PRNGKey(seed_i), step_i), where
step_i is the number of tokens the request has generated so far. A request's samples
therefore do not depend on what else shares its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastserve_jax.config import MAX_LOGPROBS
from fastserve_jax.sampling_params import GREEDY_BELOW


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, all shape (N,)."""

    temperature: jax.Array  # float32, 0 (or below GREEDY_BELOW) = greedy
    top_k: jax.Array        # int32, <= 0 = disabled
    top_p: jax.Array        # float32 in (0, 1]
    seed: jax.Array         # uint32
    step: jax.Array         # int32, tokens generated so far


class Penalties(NamedTuple):
    """Per-row presence/frequency penalties, each row's output so far, and logit biases.

    history is padded with -1 to a fixed length (the runner uses max_model_len, so one
    shape serves every request and nothing compiles after warm-up); bias_ids likewise to
    sampling_params.BIAS_SLOTS."""

    presence: jax.Array     # (N,) float32
    frequency: jax.Array    # (N,) float32
    history: jax.Array      # (N, H) int32 output token ids, -1 = padding
    bias_ids: jax.Array     # (N, B) int32 token ids, -1 = padding
    bias: jax.Array         # (N, B) float32 added to those tokens' logits (-inf: banned)


class Sampled(NamedTuple):
    tokens: jax.Array                     # (N,) int32
    logprob: jax.Array | None = None      # (N,) logprob of the sampled token
    top_ids: jax.Array | None = None      # (N, MAX_LOGPROBS)
    top_logprobs: jax.Array | None = None


def top_k_top_p(sorted_logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Descending logits (N, V) with what top-k and then top-p drop set to -inf. Top-k keeps
    every token at least as likely as the k-th (ties with it too); top-p runs over the
    distribution top-k left, renormalized (vLLM's and transformers' order), and a row with
    top_p 1 keeps everything (float32's cumulative sum reaches 1 before a long tail ends)."""
    v = sorted_logits.shape[-1]
    rank = jnp.arange(v)[None, :]
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)[:, None]
    kth = jnp.take_along_axis(sorted_logits, k - 1, axis=-1)      # (N, 1)
    in_top_k = jnp.where(sorted_logits >= kth, sorted_logits, -jnp.inf)
    probs = jax.nn.softmax(in_top_k, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                    # mass strictly above this rank
    keep = (before < top_p[:, None]) | (rank == 0) | (top_p[:, None] >= 1.0)
    return jnp.where(keep, in_top_k, -jnp.inf)


def _sample_random(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    greedy = s.temperature < GREEDY_BELOW
    scaled = logits / jnp.where(greedy, 1.0, s.temperature)[:, None]
    order = jnp.argsort(-scaled, axis=-1)                          # (N, V) descending
    masked = top_k_top_p(jnp.take_along_axis(scaled, order, axis=-1), s.top_k, s.top_p)
    keys = jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step))(s.seed, s.step)
    choice = jax.vmap(jax.random.categorical)(keys, masked)        # index into the sorted order
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(greedy, order[:, 0], drawn).astype(jnp.int32)


def apply_penalties(logits: jax.Array, p: Penalties) -> jax.Array:
    """logits[i, t] += bias_i(t) - frequency[i] * count_i(t) - presence[i] * (count_i(t) > 0),
    where count_i(t) is how often t occurs in row i's history. Counts and biases come from one
    scatter-add each."""
    n, v = logits.shape
    valid = p.history >= 0                                          # (N, H)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], p.history.shape)
    counts = jnp.zeros((n, v), jnp.float32).at[rows, jnp.where(valid, p.history, 0)].add(
        valid.astype(jnp.float32))                                  # (N, V)
    biased = p.bias_ids >= 0                                        # (N, B)
    brows = jnp.broadcast_to(jnp.arange(n)[:, None], p.bias_ids.shape)
    bias = jnp.zeros((n, v), jnp.float32).at[brows, jnp.where(biased, p.bias_ids, 0)].add(
        jnp.where(biased, p.bias, 0.0))                             # (N, V)
    return logits + bias - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


def sample(logits: jax.Array, s: SamplingArrays, penalties: Penalties | None = None, *, greedy: bool,
           with_logprobs: bool) -> Sampled:
    """logits: (N, V) float32 -> sampled tokens (and logprobs of the raw distribution)."""
    raw = logits
    if penalties is not None:
        logits = apply_penalties(logits, penalties)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else _sample_random(logits, s)
    if not with_logprobs:
        return Sampled(tokens)
    logp = jax.nn.log_softmax(raw, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
