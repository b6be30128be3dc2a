"""A request's sampling parameters (vLLM's names), validated at construction."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from numbers import Integral, Real
from dataclasses import dataclass, field
from typing import Any

MAX_LOGPROBS = 20  # OpenAI's limit for top logprobs; the sampler always computes this many.
# Tokens one row's logits can be biased on (sampling.Penalties): a request's logit_bias entries
# plus, while it is below min_tokens, its EOS and stop token ids.
BIAS_SLOTS = 320
MAX_LOGIT_BIAS = 300
# A temperature below this samples greedily, as in vLLM: logits over a tiny temperature
# overflow float32 (2 / 1e-38 is +inf), and ties at +inf would lose the argmax.
GREEDY_BELOW = 1e-5
# vLLM's _MAX_TEMP: a temperature in (0, this) is raised to it, with a warning, so that only 0
# is greedy (a near-zero temperature still samples, if barely)
MIN_TEMPERATURE = 1e-2


def bias_tokens(logit_bias, stop_token_ids, eos_ids) -> set[int]:
    """The tokens a request with min_tokens biases at once (at most BIAS_SLOTS may be): its
    logit_bias entries, its stop token ids and its EOS ids (pass none under ignore_eos)."""
    return set(logit_bias or ()) | set(stop_token_ids) | set(eos_ids)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_INT_FIELDS = ("max_tokens", "n", "top_k", "seed", "logprobs", "prompt_logprobs", "min_tokens",
               "truncate_prompt_tokens")
_FLOAT_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p")
# float32's range, in which the sampler divides and multiplies logits by these (a repetition
# penalty of 1e-300 is 0 there: every logit became inf and the sampler gave token 0)
FLOAT32_SAFE = (1e-30, 1e30)


def sampler_seed(seed: int) -> int:
    """A request's seed as the sampler's uint32: itself in [0, 2**32), else a hash of all its
    digits, so seeds that differ only above bit 31 or in sign (0, 2**32, -1) do not collide
    the way truncation makes them."""
    if 0 <= seed < 1 << 32:
        return seed
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of completion j of a request seeded `seed` (n > 1): the sampler's seed + j, so
    choices differ yet repeat, and `LLM` and the server draw the same for any seed. (Until
    2026-12-07 both added j to the seed itself: `LLM` made seed -2's second choice -1, "no
    seed", and the server took -1 modulo 2**64, a fixed seed where vLLM draws at random.)"""
    return None if seed is None else (sampler_seed(seed) + j) % (1 << 32)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request's output (vLLM's names and defaults), by keyword only (vLLM's
    first field is n, this one's max_tokens: `SamplingParams(2)` set max_tokens until 2026-12-07).

    max_tokens=None (vLLM's): as many as the context holds after the prompt (the engine sets it
    when the request is added). truncate_prompt_tokens (vLLM's): the prompt's last k tokens are
    kept (a text prompt keeps its BOS among them; admission.truncate_prompt), -1 what the
    context holds next to max_tokens. temperature=0 means greedy; one in (0, 0.01) is raised to
    0.01 with a warning, as in vLLM. top_k=-1 (or 0) disables top-k; top_p=1 disables top-p.
    presence_penalty and frequency_penalty follow OpenAI: before sampling, the logit of each
    token t is lowered by frequency_penalty * (times t occurs in the output so far) +
    presence_penalty * (1 if it occurs at all); negative values favour repetition.
    repetition_penalty (vLLM's and transformers'; > 0, 1 disables it): before those, the logit
    of each token that occurs in the prompt or the output so far is divided by it when
    positive and multiplied by it otherwise; above 1 discourages repetition, below favours it.
    min_p (vLLM's; in [0, 1], 0 disables it): after temperature, tokens whose probability is
    below min_p times the most likely token's are dropped, before top-k and top-p (vLLM's
    order); greedy decoding ignores it.
    n: completions of the prompt (`LLM.generate` runs n requests, seeded `choice_seed(seed, j)`
    when a seed is given; the engine itself takes n = 1). A seed is any integer: one outside
    [0, 2**32) is hashed to the sampler's 32 bits (`sampler_seed`), so 0 and 2**32 differ;
    -1 is no seed, as in vLLM (until 2026-12-07 it was a seed of its own, so ported scripts
    that wrote -1 for "unseeded" drew the same text on every call).
    logit_bias: {token id: bias} added to the logits before sampling (OpenAI's; any number
    float32 holds, unclamped as in vLLM's SamplingParams; the HTTP server clamps to OpenAI's
    [-100, 100]; at most MAX_LOGIT_BIAS tokens; logprobs stay the raw model's). min_tokens (vLLM's): until
    that many tokens are out, EOS and stop_token_ids cannot be sampled and stop strings are
    not checked. prompt_logprobs (vLLM's): the logprob of each prompt token given the tokens
    before it, with the top-k alternatives (k = prompt_logprobs), in the output's
    `prompt_logprobs`: one entry per prompt token, the first None (nothing precedes it).
    Output text (vLLM's, fastserve_jax/detokenizer.py): skip_special_tokens drops special
    tokens' text; spaces_between_special_tokens=False writes a special token right after
    another without the space a decoder may put between them; include_stop_str_in_output keeps
    the matched stop string (and the text of a stop token or EOS) at the end of the text.
    bad_words (vLLM's): words the output may not contain; the engine tokenizes each (with and
    without a leading space) and bans the last token of a word once the output ends with its
    other tokens (fastserve_jax/bad_words.py); an empty list is None.
    allowed_token_ids (vLLM's): the only tokens the output may hold (every other token's logit
    is -inf before sampling; at most BIAS_SLOTS of them, as they take the sampler's logit-bias
    slots; logit_bias, min_tokens and bad_words still act on them; logprobs stay the raw
    model's); an empty list is refused, None allows every token. Where min_tokens or bad_words
    ban every allowed token at a step, every logit is -inf and the sampler's pick (token 0)
    is not checked.
    cache_salt (vLLM's, which carries it on the request): not a sampling setting but the prefix
    cache's (fastserve_jax/prefix_cache.py): a request shares cached blocks only with requests of
    the same salt (None: with the other unsalted ones), so that clients of different salts cannot
    learn from timing whether another sent the same prefix. A non-empty string; out of the repr
    (request logs print the params).
    vLLM's other keywords, so its scripts construct these unchanged (keyword-only, out of the
    repr): best_of (None or n), detokenize (text is always written), output_kind (outputs come
    whole), extra_args (read by nothing here) are accepted with no effect; guided_decoding,
    structured_outputs and logits_processors must be None or empty (not implemented).
    Immutable (vLLM's is not): `clone()` or dataclasses.replace(params, field=...) make variants.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    n: int = 1
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    bad_words: list[str] | None = None
    allowed_token_ids: list[int] | None = None
    cache_salt: str | None = field(default=None, repr=False)
    truncate_prompt_tokens: int | None = None
    best_of: int | None = field(default=None, repr=False, kw_only=True)
    detokenize: bool = field(default=True, repr=False, kw_only=True)
    output_kind: Any = field(default=None, repr=False, kw_only=True)
    extra_args: dict | None = field(default=None, repr=False, kw_only=True)
    guided_decoding: Any = field(default=None, repr=False, kw_only=True)
    structured_outputs: Any = field(default=None, repr=False, kw_only=True)
    logits_processors: Any = field(default=None, repr=False, kw_only=True)

    def clone(self) -> "SamplingParams":
        """vLLM's: a deep copy (change it with dataclasses.replace; these are immutable)."""
        return copy.deepcopy(self)

    def __post_init__(self) -> None:
        if self.seed == -1:             # vLLM's "no seed"
            object.__setattr__(self, "seed", None)
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of={self.best_of} with n={self.n}: returning the best of more completions "
                             "than n is not implemented; leave best_of out or equal to n")
        for name in ("guided_decoding", "structured_outputs", "logits_processors"):
            if getattr(self, name):
                raise ValueError(f"{name}: not implemented (structured output and custom logits processors); "
                                 "leave it None")
        for name in _INT_FIELDS + _FLOAT_FIELDS:        # numpy's scalars as Python's
            v = getattr(self, name)
            if isinstance(v, Integral) and not isinstance(v, (bool, int)):
                object.__setattr__(self, name, int(v))
            elif isinstance(v, Real) and not isinstance(v, (bool, int, float)) and name in _FLOAT_FIELDS:
                object.__setattr__(self, name, float(v))
        for name in ("max_tokens", "n"):
            v = getattr(self, name)
            if (v is not None or name == "n") and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1" + (" or None (the rest of the context)"
                                                                       if name == "max_tokens" else "") + f", got {v!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= FLOAT32_SAFE[1]:
            raise ValueError(f"temperature must be a number in [0, {FLOAT32_SAFE[1]:g}] (0 means greedy), "
                             f"got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logging.getLogger(__name__).warning(
                "temperature %g is below %g, which may make NaN or inf logits; raised to %g (vLLM's rule; 0 "
                "is greedy)", self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}; use 1.0 to disable it")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2.0 <= v <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 disables it), got {v!r}")
        if not _is_number(self.repetition_penalty) or not FLOAT32_SAFE[0] <= self.repetition_penalty <= FLOAT32_SAFE[1]:
            raise ValueError(f"repetition_penalty must be a number in [{FLOAT32_SAFE[0]:g}, {FLOAT32_SAFE[1]:g}] "
                             f"(1 disables it), got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be a number in [0, 1] (0 disables it), got {self.min_p!r}")
        # a list or tuple only: an iterator would be used up by the check below (its stops lost),
        # a dict or set would pass its keys, a number would raise TypeError
        stops = [self.stop] if isinstance(self.stop, str) else self.stop if isinstance(self.stop, (list, tuple)) \
            else [None] if self.stop is not None else []
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", list(stops))
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):         # "no" would be true
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        ids = self.stop_token_ids if self.stop_token_ids is not None else []      # 0 or an array: refused below
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0
                                                         for t in ids):
            raise ValueError(f"stop_token_ids must be a list of non-negative token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", [int(t) for t in ids])
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or \
                not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        bias = self.logit_bias if self.logit_bias is not None else {}      # 0 or []: refused below
        # -inf bans a token (an offline script's idiom; vLLM's SamplingParams takes it)
        if not isinstance(bias, dict) or not all(isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 and
                                                 _is_number(v) and (abs(v) <= FLOAT32_SAFE[1] or v == -math.inf)
                                                 for t, v in bias.items()):
            raise ValueError(f"logit_bias must map non-negative token ids to numbers in [-{FLOAT32_SAFE[1]:g}, "
                             f"{FLOAT32_SAFE[1]:g}] or -inf, got {self.logit_bias!r}")
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS} tokens, got {len(bias)}")
        object.__setattr__(self, "logit_bias", {int(t): float(v) for t, v in bias.items()} or None)
        words = self.bad_words if self.bad_words is not None else []
        if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
            raise ValueError(f"bad_words must be a list of strings, got {self.bad_words!r}")
        if not all(w.strip() for w in words):
            raise ValueError(f"bad_words entries must hold a character other than whitespace, got {self.bad_words!r}")
        object.__setattr__(self, "bad_words", list(words) or None)
        allowed = self.allowed_token_ids
        if allowed is not None:
            if not isinstance(allowed, (list, tuple)) or not allowed or not all(
                    isinstance(t, Integral) and not isinstance(t, bool) and t >= 0 for t in allowed):
                raise ValueError(f"allowed_token_ids must be a non-empty list of non-negative token ids (None allows "
                                 f"every token), got {allowed!r}")
            allowed = sorted({int(t) for t in allowed})
            if len(allowed) > BIAS_SLOTS:
                raise ValueError(f"allowed_token_ids may name at most {BIAS_SLOTS} distinct tokens (the sampler's "
                                 f"logit-bias slots), got {len(allowed)}")
            object.__setattr__(self, "allowed_token_ids", allowed)
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError("cache_salt must be a non-empty string (None: no salt)")
        k = self.truncate_prompt_tokens
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not (k == -1 or k >= 1)):
            raise ValueError(f"truncate_prompt_tokens must be None, -1 (what the context holds next to max_tokens) "
                             f"or an integer >= 1 (the prompt's last k tokens), got {k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """The sampler's penalties variant runs for it (sampling.Penalties)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1 or
                self.logit_bias is not None or self.min_tokens > 0 or self.bad_words is not None or
                self.allowed_token_ids is not None)
