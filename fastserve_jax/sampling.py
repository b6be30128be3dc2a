"""Sampling on the device: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs.

Pure functions of (logits, per-row parameters); the runner jits them with the mode static:

- greedy mode: argmax only (the common serving and benchmark case);
- random mode: temperature, then min-p, then top-k (tokens tied with the k-th stay), then
  top-p over the distribution min-p and top-k left (renormalized): vLLM's order (its v1
  sampler applies min-p before top-k/top-p; transformers applies it after top-p, which
  differs when top_p < 1 too). Each filter is a cut on the logit value, found without sorting
  the vocabulary unless a row's cut lies deeper than its top few hundred logits, and the draw
  is Gumbel-max in token-id order (sampling_draw.py). Rows with temperature 0 (or below
  GREEDY_BELOW) still take the argmax.

A `Penalties` applies, in vLLM's order, logit biases (OpenAI's; min_tokens bans EOS and stop
tokens as a bias of -inf), then the repetition penalty (transformers' and vLLM's: over the
prompt and the output), then the presence and frequency penalties (OpenAI's: over the output
only); passing None instead is a different pytree structure, hence its own compiled variant,
so batches without them pay nothing for them. Logprobs are those of the raw model
distribution, before penalties, biases and temperature.

Randomness is per request: row i draws with key fold_in(PRNGKey(seed_i), step_i), where
step_i is the number of tokens the request has generated so far, and its noise is a function
of that key and the token id alone. A request's samples therefore do not depend on what else
shares its batch, nor on which of the sampler's internal paths (sampling_draw.py) it took.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fastserve_jax.config import MAX_LOGPROBS
from fastserve_jax.sampling_draw import draw, row_keys
from fastserve_jax.sampling_params import GREEDY_BELOW


class SamplingArrays(NamedTuple):
    """Per-row sampling parameters, all shape (N,)."""

    temperature: jax.Array  # float32, 0 (or below GREEDY_BELOW) = greedy
    top_k: jax.Array        # int32, <= 0 = disabled
    top_p: jax.Array        # float32 in (0, 1]
    min_p: jax.Array        # float32 in [0, 1], 0 = disabled
    seed: jax.Array         # uint32
    step: jax.Array         # int32, tokens generated so far


class Penalties(NamedTuple):
    """Per-row penalties, the tokens each row has seen, and logit biases.

    history holds the first out_start entries, a row's distinct prompt tokens (each once:
    apply_penalties counts on it; only where its repetition penalty is not 1), then its output
    so far, padded with -1 to a fixed length: the runner uses max_model_len, which a prompt
    and its output never exceed, so one shape serves every request and nothing compiles after
    warm-up. bias_ids is padded likewise to sampling_params.BIAS_SLOTS."""

    presence: jax.Array     # (N,) float32
    frequency: jax.Array    # (N,) float32
    repetition: jax.Array   # (N,) float32 > 0, 1 = off
    out_start: jax.Array    # (N,) int32 history entries before the output (the prompt's)
    history: jax.Array      # (N, H) int32 token ids: prompt's distinct ones, then output; -1 = padding
    bias_ids: jax.Array     # (N, B) int32 token ids, -1 = padding
    bias: jax.Array         # (N, B) float32 added to those tokens' logits (-inf: banned)
    exclusive: jax.Array    # (N,) bool: the row may sample only its bias_ids (allowed_token_ids)


class Sampled(NamedTuple):
    tokens: jax.Array                     # (N,) int32
    logprob: jax.Array | None = None      # (N,) logprob of the sampled token
    top_ids: jax.Array | None = None      # (N, MAX_LOGPROBS)
    top_logprobs: jax.Array | None = None
    rank: jax.Array | None = None         # (N,) int32: the sampled token's rank (token_rank)


def _sample_random(logits: jax.Array, s: SamplingArrays) -> jax.Array:
    live = s.temperature >= GREEDY_BELOW
    scaled = logits / jnp.where(live, s.temperature, 1.0)[:, None]
    return draw(scaled, s.top_k, s.top_p, s.min_p, row_keys(s.seed, s.step), live)


def apply_penalties(logits: jax.Array, p: Penalties) -> jax.Array:
    """vLLM's order: x = logits[i, t] + bias_i(t) (-inf for a t outside an exclusive row's
    biased tokens: allowed_token_ids); where t is in row i's history (prompt or
    output) a positive x is divided by repetition[i] and any other multiplied by it; then
    x -= frequency[i] * count_i(t) + presence[i] * (count_i(t) > 0), where count_i(t) is how
    often t occurs in row i's output.

    One scatter-add gives both the counts and the seen tokens: an output entry adds 1, a
    prompt entry big = H + 1, more than any count, and the prompt part holds each token once,
    so total = count + big * (t in the prompt), seen = total > 0 (exact in float32 while
    2H < 2**24, H being max_model_len). A scatter of its own for the seen tokens took this
    function from 0.72 to 1.9 ms (32 rows, 32k vocabulary, 2,048-token history, one core of
    the 2-core VM), and `total mod big` to 3.1 ms; this takes 0.73."""
    n, v = logits.shape
    h = p.history.shape[1]
    valid = p.history >= 0                                          # (N, H)
    out = valid & (jnp.arange(h)[None, :] >= p.out_start[:, None])
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], p.history.shape)
    big = float(h + 1)
    total = jnp.zeros((n, v), jnp.float32).at[rows, jnp.where(valid, p.history, 0)].add(
        jnp.where(out, 1.0, jnp.where(valid, big, 0.0)))           # (N, V)
    counts = jnp.where(total >= big, total - big, total)
    seen = total > 0
    biased = p.bias_ids >= 0                                        # (N, B)
    brows = jnp.broadcast_to(jnp.arange(n)[:, None], p.bias_ids.shape)
    at = (brows, jnp.where(biased, p.bias_ids, 0))
    bias = jnp.zeros((n, v), jnp.float32).at[at].add(jnp.where(biased, p.bias, 0.0))          # (N, V)

    def exclusive(x):         # a second (N, V) scatter: 0.3 ms of this function's 1 ms; skipped where no row asks
        slot = jnp.zeros((n, v), jnp.float32).at[at].add(biased.astype(jnp.float32)) > 0
        return jnp.where(p.exclusive[:, None] & ~slot, -jnp.inf, x)
    x = jax.lax.cond(p.exclusive.any(), exclusive, lambda x: x, logits + bias)
    rep = p.repetition[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    return x - p.frequency[:, None] * counts - p.presence[:, None] * (counts > 0)


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
    return Sampled(tokens, chosen, top_ids.astype(jnp.int32), top_lp, token_rank(logp, chosen))


def token_rank(logp: jax.Array, chosen: jax.Array) -> jax.Array:
    """vLLM's rank of a token in its row of the raw distribution: how many tokens are at least
    as likely as it, itself included (1 = the likeliest; a tie counts the tokens it ties with)."""
    return jnp.sum(logp >= chosen[:, None], axis=-1).astype(jnp.int32)
