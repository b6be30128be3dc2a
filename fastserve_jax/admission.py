"""The engine's boundary: a prompt and its sampling parameters are checked in full before
anything is queued, and a bad one raises ValueError saying what to change."""

from __future__ import annotations

import math
import time
from numbers import Integral, Real

from fastserve_jax.bad_words import BadWords, bad_words_of
from fastserve_jax.sampling_params import BIAS_SLOTS, SamplingParams, bias_tokens
from fastserve_jax.kv_cache import KVManager


def context_limit(max_model_len: int, kv) -> int:
    """The most tokens, prompt and output, one request can hold: max_model_len, or fewer where
    the device pool is smaller (a request runs with all of its KV on the device). `kv` is a
    KVManager or anything with its num_usable_blocks and block_size."""
    return min(max_model_len, kv.num_usable_blocks * kv.block_size)


def arrival_clock(t: float | None) -> float:
    """An arrival time on the engine's clock, time.monotonic()'s (now when None). vLLM's
    LLMEngine.add_request takes time.time()'s: a time nearer the wall clock than the
    monotonic one is read as such and moved onto the engine's."""
    now = time.monotonic()
    if t is None:
        return now
    if isinstance(t, bool) or not isinstance(t, Real) or not math.isfinite(t):       # numpy's floats too
        raise ValueError(f"arrival_time must be a finite number of seconds (time.monotonic()'s clock, or "
                         f"time.time()'s), got {t!r:.60}")
    wall = time.time()
    t = float(t)
    return now - (wall - t) if abs(t - wall) < abs(t - now) else t


def truncate_prompt(ids: list[int], k: int, head: int = 0) -> list[int]:
    """vLLM's truncate_prompt_tokens: the last k of `ids`, where the first `head` (the special
    tokens a tokenizer put before a text prompt, BOS) stay first among them, as the tokenizer's
    left truncation in vLLM keeps them."""
    if k <= head:
        return ids[:k]
    return ids[:head] + ids[len(ids) - (k - head):] if len(ids) > k else ids


def truncation_length(k: int, limit: int, max_tokens: int | None) -> int:
    """truncate_prompt_tokens as a number of tokens: -1 is what the context (`limit`) holds next
    to max_tokens (the rest of it: one token); more than the context is a ValueError."""
    if k == -1:
        return limit - (max_tokens if max_tokens is not None and max_tokens < limit else 1)
    if k > limit:
        raise ValueError(f"truncate_prompt_tokens is {k}, more than the {limit} tokens of the context "
                         "(max_model_len, or what the device pool holds); give a smaller value or -1")
    return k


def validate_request(prompt: str | list[int], params: SamplingParams, tokenizer, vocab_size: int, max_model_len: int,
                     kv: KVManager, eos_ids: frozenset[int] = frozenset()) -> tuple[str | None, list[int]]:
    """(text or None, token ids) of one prompt. `eos_ids`: the model's, which min_tokens bans."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    if params.n != 1:
        raise ValueError(f"the engine runs one completion per request, got n={params.n}; LLM.generate and the "
                         "server run n requests for it")
    if isinstance(prompt, str):          # "" is a prompt where the tokenizer adds BOS (vLLM's)
        text, ids = prompt, tokenizer.encode(prompt, add_special_tokens=True)
        head = len(ids) - len(tokenizer.encode(prompt, add_special_tokens=False)) if params.truncate_prompt_tokens else 0
    elif isinstance(prompt, (list, tuple)) and all(isinstance(t, Integral) and not isinstance(t, bool) for t in prompt):
        text, ids, head = None, [int(t) for t in prompt], 0
    else:
        raise ValueError("a prompt must be a string or a list of integer token ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad and text is None:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {bad[:5]}")
    if bad:         # a tokenizer with more tokens than the model's embedding (the embedding read NaN)
        raise ValueError(f"the tokenizer gives this prompt token ids {sorted(set(bad))[:5]} beyond the model's "
                         f"vocabulary of {vocab_size}: the tokenizer does not match the model (--tokenizer?)")
    if params.truncate_prompt_tokens is not None:
        ids = truncate_prompt(ids, truncation_length(params.truncate_prompt_tokens, context_limit(max_model_len, kv),
                                                     params.max_tokens), head)
    if not ids:
        raise ValueError("prompt is empty: no token ids" if text is None else "prompt is empty (no tokens: this "
                         "tokenizer adds no BOS); give at least one character")
    limit = context_limit(max_model_len, kv)   # a longer max_tokens ends there (LLMEngine.add_request)
    if len(ids) >= limit:
        what, raise_it = ((f"max_model_len is {max_model_len}", "max_model_len") if limit == max_model_len else
                          (f"the device pool holds {limit} for one request (max_model_len {max_model_len})",
                           "num_device_blocks"))
        raise ValueError(f"prompt has {len(ids)} tokens but {what}, which must also hold at least one generated "
                         f"token; shorten the prompt to at most {limit - 1} tokens or raise {raise_it}")
    bad_stop = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise ValueError(f"stop_token_ids must be < vocab size {vocab_size}, got {bad_stop}")
    bias = params.logit_bias or {}
    bad_bias = sorted(t for t in bias if t >= vocab_size)
    if bad_bias:
        raise ValueError(f"logit_bias token ids must be < vocab size {vocab_size}, got {bad_bias[:5]}")
    bad_allowed = [t for t in params.allowed_token_ids or () if t >= vocab_size]
    if bad_allowed:
        raise ValueError(f"allowed_token_ids must be < vocab size {vocab_size}, got {bad_allowed[:5]}")
    if params.min_tokens and params.allowed_token_ids is None:     # allowed tokens are all a row's slots hold
        biased = bias_tokens(bias, params.stop_token_ids, () if params.ignore_eos else eos_ids)
        if len(biased) > BIAS_SLOTS:
            raise ValueError(f"with min_tokens, logit_bias and stop_token_ids (and EOS) may name at most {BIAS_SLOTS} "
                             f"tokens together, got {len(biased)}")
    check_bad_words(params, tokenizer, vocab_size, eos_ids)
    return text, ids


def check_bad_words(params: SamplingParams, tokenizer, vocab_size: int,
                    eos_ids: frozenset[int] = frozenset()) -> BadWords | None:
    """The request's bad words tokenized (fastserve_jax/bad_words.py); ValueError where they do
    not tokenize, or where their bans at some step could overflow the sampler's BIAS_SLOTS
    together with logit_bias and min_tokens' bans (the worst step counted, never truncated)."""
    bw = bad_words_of(params.bad_words, tokenizer, vocab_size)
    if bw is None or params.allowed_token_ids is not None:     # then the slots hold the allowed tokens only
        return bw
    biased = set(params.logit_bias or ())
    if params.min_tokens:
        biased = bias_tokens(biased, params.stop_token_ids, () if params.ignore_eos else eos_ids)
    need = min(len(biased | bw.tokens), len(biased) + bw.max_bans)
    if need > BIAS_SLOTS:
        raise ValueError(f"bad_words can ban {bw.max_bans} tokens at one step, which with the {len(biased)} that "
                         f"logit_bias (and min_tokens' stop and EOS ids) names makes {need}; the sampler biases at "
                         f"most {BIAS_SLOTS} tokens of a row at once, so give fewer words or fewer logit_bias entries")
    return bw
