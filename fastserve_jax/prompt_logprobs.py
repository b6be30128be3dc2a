"""Prompt logprobs (SamplingParams.prompt_logprobs, vLLM's): each prompt token's logprob given
the tokens before it, and the top-k alternatives, computed on the device during prefill.

    host (launch.py)    a prefill launch whose chunks hold prompt positions still wanted gets
                        `targets` (T,) int32: at packed token j of position p, prompt[p + 1]
                        (what position p predicts), -1 elsewhere; and the spans to read back.
                        Its key is PrefillKey(..., prompt_logprobs=True): the last pipeline
                        stage then also runs `chunked_token_logprobs`, a variant compiled only
                        the first time a batch needs it (warm-up never does), so batches
                        without such a request pay nothing.
    device              logits of every packed token, a chunk of rows at a time (at most
                        LOGITS_CHUNK_BYTES of float32 logits at once, not the 1 GiB of a whole
                        2,048-token bucket over a 128k vocabulary) -> log-softmax -> the
                        target's logprob (T,) and the top MAX_LOGPROBS (T, K) of the raw
                        distribution.
    host (collect)      `record` appends each span's entries to Request.prompt_logprobs.

Chunked prefill: every chunk contributes its own positions; the last position of a chunk
predicts the next chunk's first token. The last prompt position predicts the first generated
token, which is no prompt token, so it gets no target. Entry i of Request.prompt_logprobs is
prompt token i's (entry 0 is None), appended in order: positions already recorded are not
asked for again (`wanted`), so a request recomputed after a preemption does not pay twice,
and a position computed twice anyway (async scheduling builds the next chunk before the
previous one is collected) is recorded once.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastserve_jax.request import Request, TokenLogprobs
from fastserve_jax.sampling import token_rank
from fastserve_jax.sampling_params import MAX_LOGPROBS

# float32 logits a prompt-logprobs prefill holds at once (`chunked_token_logprobs`): 256 rows of
# a 128k vocabulary; a whole 2,048-token bucket's would be 1 GiB, beside the KV pool
LOGITS_CHUNK_BYTES = 128 << 20

# (request, offset of its first wanted token in the launch, that token's position, count)
Span = tuple[Request, int, int, int]


def wanted(req: Request, p0: int, n: int) -> tuple[int, int]:
    """The positions [lo, hi) of a chunk of n tokens from position p0 whose next prompt
    token's logprob is still wanted (lo >= hi: none)."""
    if req.prompt_logprobs is None:
        return 0, 0
    return max(p0, len(req.prompt_logprobs) - 1), min(p0 + n, req.num_prompt_tokens - 1)


def needs_prompt_logprobs(req: Request, n: int) -> bool:
    """A chunk of n tokens from the request's computed ones holds a wanted position."""
    lo, hi = wanted(req, req.num_computed_tokens, n)
    return lo < hi


def fill_targets(targets: np.ndarray, spans: list[Span], req: Request, at: int, p0: int, n: int) -> None:
    """Set the targets of the chunk packed at offset `at` (positions p0 .. p0 + n - 1) and note
    its span."""
    lo, hi = wanted(req, p0, n)
    if lo < hi:
        targets[at + lo - p0:at + hi - p0] = req.prompt_token_ids[lo + 1:hi + 1]
        spans.append((req, at + lo - p0, lo, hi - lo))


def token_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """logits (T, V) float32, targets (T,) int32 (-1: none) -> (logprob of the target (T,),
    top ids (T, K) int32, top logprobs (T, K), the target's rank (T,) int32), K = MAX_LOGPROBS,
    of the raw distribution."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp, MAX_LOGPROBS)
    return chosen, top_ids.astype(jnp.int32), top_lp, token_rank(logp, chosen)


def chunked_token_logprobs(head: Callable, h: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """`token_logprobs` of every packed token, its logits made by `head` (rows of h (T, H) ->
    (N, V) float32) a chunk of rows at a time, so that no more than about LOGITS_CHUNK_BYTES of
    logits live at once. The last stage's extra output for prompt-logprobs prefills
    (sharding/pipeline.stage_forward's `every_token`)."""
    t = h.shape[0]
    vocab = jax.eval_shape(head, jax.ShapeDtypeStruct((1, h.shape[1]), h.dtype)).shape[-1]
    rows = min(t, max(8, LOGITS_CHUNK_BYTES // (4 * vocab)))
    chunks = -(-t // rows)
    pad = chunks * rows - t
    hs = jnp.pad(h, ((0, pad), (0, 0))).reshape(chunks, rows, h.shape[1])
    ts = jnp.pad(targets, (0, pad), constant_values=-1).reshape(chunks, rows)
    lp, ids, top, rank = jax.lax.map(lambda c: token_logprobs(head(c[0]), c[1]), (hs, ts))
    return (lp.reshape(-1)[:t], ids.reshape(-1, MAX_LOGPROBS)[:t], top.reshape(-1, MAX_LOGPROBS)[:t],
            rank.reshape(-1)[:t])


def record(spans: list[Span], host: tuple[np.ndarray, ...]) -> None:
    """Append the spans' entries (host copies of `token_logprobs`' outputs) to their requests."""
    lp, ids, top, rank = host
    for req, at, first, count in spans:
        got = req.prompt_logprobs
        if req.finished or got is None:          # aborted while its batch was in flight
            continue
        k = req.sampling.prompt_logprobs
        for j in range(count):
            p = first + j
            if p + 1 < len(got):                 # already recorded (computed twice)
                continue
            assert p + 1 == len(got), f"{req.request_id}: prompt logprob of position {p} before {len(got) - 1}"
            target = req.prompt_token_ids[p + 1]
            got.append(TokenLogprobs(target, float(lp[at + j]),
                                     {int(t): float(v) for t, v in zip(ids[at + j, :k], top[at + j, :k])},
                                     int(rank[at + j])))
