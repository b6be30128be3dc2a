"""Random draws without sorting the vocabulary: each filter a cut on the logit value, noise per token id.

Every filter is a cut on a row's tempered logits x (N, V): the row keeps the tokens at or above
one value. Min-p's is top + log(min_p); top-k's the k-th largest logit (tokens tied with it
stay, as in vLLM); top-p's, over the distribution those two left (renormalized), the lowest
logit with less than top_p of that mass strictly above it. So at the top-p boundary tokens tied
with the last one kept all stay too, as at top-k's: vLLM keeps some of them, whichever its
sort puts first, and a stable sort kept the lower ids, a bias towards low token ids.

The draw is Gumbel-max over the kept logits in token-id order: argmax(kept x + g), g one Gumbel
draw of shape (V,) from the row's key. So a row's token depends only on its logits, parameters
and key, and on nothing a batch decides, provided its cut does not; how the cut is found is
the only thing a batch changes:

- no row has top-k or top-p on: no ordering at all (min-p needs only the row's maximum);
- otherwise lax.top_k gives every row's top CANDIDATES logits, which settle the cut of a row
  whose top_k is at most CANDIDATES and whose top-p mass those candidates reach;
- a row they do not settle (top_k above CANDIDATES, or top-p over a flat distribution) is cut
  by bisection over the float32 order (32 masked sums over its vocabulary), which runs only
  when some row needs it (a lax.cond on the batch, on the CPU; `_only_if`).

Which way a row's cut is found depends on that row alone, so it is the same computation on the
same values whichever branches the batch took.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The largest logits per row the cuts are looked for among before bisecting: the top_k values
# requests use (20, 40, 50, 100) fit, and so does top-p 0.9 over a trained model's peaked
# distribution at most steps. lax.top_k of 256 over 32 x 32k logits: 1-4 ms on the 2-core VM;
# a full argsort of them took 350.
CANDIDATES = 256


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """(N,) uint32 seeds and (N,) int32 steps -> (N,) keys fold_in(key(seed), step)."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, step)


def _argmax(y: jax.Array) -> jax.Array:
    """argmax over the last axis (the lowest index among ties). On XLA:CPU as lax.top_k of 1,
    which reads its operand from memory: jnp.argmax's reduction took the Gumbel noise's two
    logs into its loop unvectorized, 35 ms over 32 x 32k noisy logits against 12."""
    if jax.default_backend() == "cpu":
        return jax.lax.top_k(y, 1)[1][..., 0]
    return jnp.argmax(y, axis=-1)


def _only_if(pred: jax.Array, expensive, placeholder) -> jax.Array:
    """expensive() where some row needs it (pred), else placeholder(), whose value no row reads.
    A lax.cond on the CPU, where skipping the work is the gain; elsewhere expensive() always:
    XLA:GPU can read a conditional's predicate back to the host (its conditional outside
    command buffers; not measured here, no GPU was lent), which would stall the host at every
    sampling step (async scheduling dispatches the next step while the device runs this one),
    and the work is a few passes over the logits there.
    Each row's choice is made by masks of its own, so the tokens are the same either way."""
    if jax.default_backend() == "cpu":
        return jax.lax.cond(pred, expensive, placeholder)
    return expensive()


def _order_key(f: jax.Array) -> jax.Array:
    """float32 -> uint32 in the same order (-0.0 just below +0.0; NaNs outside -inf..+inf)."""
    b = jax.lax.bitcast_convert_type(f, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(0x80000000))


def _from_order_key(k: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k), jnp.float32)


def _lowest_cut(x: jax.Array, w: jax.Array, target: jax.Array, top: jax.Array) -> jax.Array:
    """Per row the smallest float c with sum(w[x > c]) < target, w >= 0 and target > 0: the
    k-th largest logit for w = 1, target = k; top-p's cut for w = the probabilities. The sum
    only falls as c rises (one reduction, its terms zeroed one by one, and rounding is
    monotone), so 32 halvings of the float32 order between -inf and the row's maximum (where
    the sum is 0) find c exactly: 32 masked sums over (N, V), no sort."""
    lo = jnp.broadcast_to(_order_key(jnp.float32(-jnp.inf)) - 1, top.shape)   # below every candidate
    hi = _order_key(top)                                                        # satisfies it

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(x > _from_order_key(mid)[:, None], w, 0.0), axis=-1) < target
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    return _from_order_key(jax.lax.fori_loop(0, 32, halve, (lo, hi))[1])


def cut_logits(x: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array | None = None,
               live: jax.Array | None = None) -> jax.Array:
    """x (N, V) tempered logits -> x with what min-p, top-k and then top-p (over what those
    left, renormalized) drop set to -inf. live (N,) bool: the rows that draw (the others'
    cuts are not looked for; all by default). top_k <= 0 or >= V and top_p >= 1 are off, min_p
    None or 0 too (float32's cumulative sum reaches 1 before a long tail ends)."""
    n, v = x.shape
    live = jnp.ones((n,), bool) if live is None else live
    top = jnp.max(x, axis=-1)                                         # (N,)
    k_on = live & (top_k > 0) & (top_k < v)
    p_on = live & (top_p < 1.0)
    m = min(CANDIDATES, v)
    vals = _only_if(jnp.any(k_on | p_on), lambda: jax.lax.top_k(x, m)[0],
                    lambda: jnp.full((n, m), -jnp.inf, x.dtype))      # (N, M) descending
    # min-p and top-k: one floor, the larger of top + log(min_p) and the k-th largest logit
    kth = jnp.take_along_axis(vals, jnp.clip(top_k - 1, 0, m - 1)[:, None], axis=-1)[:, 0]
    k_deep = k_on & (top_k > m)
    kth = jnp.where(k_deep, _only_if(jnp.any(k_deep), lambda: _lowest_cut(x, jnp.ones_like(x),
                                                                          top_k.astype(x.dtype), top),
                                     lambda: kth), kth)
    floor = jnp.where(k_on, kth, -jnp.inf)
    if min_p is not None:
        floor = jnp.maximum(floor, top + jnp.log(min_p))              # -inf at min_p 0
    # top-p over what the floor kept: the lowest value with less than top_p of that mass above it
    kept = lambda y: jnp.where(y >= floor[:, None], jnp.exp(y - top[:, None]), 0.0)
    z = jnp.sum(kept(x), axis=-1)                                     # (N,) in token-id order
    reached = jnp.cumsum(kept(vals) / z[:, None], axis=-1) >= top_p[:, None]   # (N, M)
    last = jnp.where(reached.any(-1), jnp.argmax(reached, axis=-1), m - 1)
    p_cut = jnp.take_along_axis(vals, last[:, None], axis=-1)[:, 0]
    p_deep = p_on & ~reached.any(-1) & (vals[:, -1] >= floor) & (m < v)
    p_cut = jnp.where(p_deep, _only_if(jnp.any(p_deep), lambda: _lowest_cut(x, kept(x) / z[:, None], top_p, top),
                                       lambda: p_cut), p_cut)
    cut = jnp.where(p_on, jnp.maximum(floor, p_cut), floor)
    return jnp.where(x >= cut[:, None], x, -jnp.inf)


def draw(x: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array, keys: jax.Array,
         live: jax.Array) -> jax.Array:
    """(N,) int32 tokens: Gumbel-max over cut_logits in token-id order where live, the argmax elsewhere."""
    noise = jax.vmap(lambda key: jax.random.gumbel(key, x.shape[-1:], jnp.float32))(keys)  # (N, V) by token id
    cut = cut_logits(x, top_k, top_p, min_p, live)
    # less the row's max, as a softmax takes it: at logits of 1e8 (a logit_bias) the noise rounded
    # away and tied tokens went to the lowest id
    noisy = cut - jnp.max(cut, axis=-1, keepdims=True) + noise
    return _argmax(jnp.where(live[:, None], noisy, x)).astype(jnp.int32)
