"""vLLM's `bad_words`: words a request may not generate, as -inf logit biases per step.

Tokenization (vLLM's SamplingParams.update_from_tokenizer): each word, stripped of leading
whitespace, is encoded without special tokens; that sequence is banned, and so is the encoding
of " " + word where it starts with another token and has as many tokens (the word in the middle
of a text). A word that encodes to nothing is refused.

Matching (vLLM's sampler): a one-token sequence's token is banned at every step; a longer one's
last token is banned when the request's output so far ends with its other tokens. Only the
output is matched, not the prompt before it (vLLM matches output_token_ids). So only the last
token of a word is ever banned: the model may still write its first tokens, and go on another way.

The bans ride in the sampler's logit-bias slots (sampling_params.BIAS_SLOTS, with logit_bias and
min_tokens' bans; runner/launch.penalty_arrays), so a request must fit its worst step in them:
`BadWords.max_bans` bounds it, and admission.py refuses a request that could overflow.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

# vLLM's limits: token sequences after tokenization (VLLM_MAX_NUM_BAD_WORDS) and their tokens
# together (VLLM_MAX_BAD_WORDS_TOTAL_TOKENS, its model runner's)
MAX_BAD_WORDS = 128
MAX_BAD_WORD_TOKENS = 1024


def tokenize_bad_words(words: Sequence[str], tokenizer) -> list[tuple[int, ...]]:
    """The token sequences `words` ban (module docstring); ValueError for a word that encodes
    to nothing or past MAX_BAD_WORDS / MAX_BAD_WORD_TOKENS."""
    seqs: list[tuple[int, ...]] = []
    for word in words:
        plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not plain:
            raise ValueError(f"bad_words entries must tokenize to at least one token, got {word!r}")
        seqs.append(plain)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            seqs.append(spaced)
        if len(seqs) > MAX_BAD_WORDS:
            raise ValueError(f"bad_words make {len(seqs)} token sequences after tokenization (each word, and "
                             f"it after a space); at most {MAX_BAD_WORDS} are allowed")
    total = sum(map(len, seqs))
    if total > MAX_BAD_WORD_TOKENS:
        raise ValueError(f"bad_words tokenize to {total} tokens; at most {MAX_BAD_WORD_TOKENS} are allowed")
    return seqs


@dataclass(frozen=True)
class BadWords:
    """One request's banned sequences, indexed once for the per-step lookups.

    singles: tokens banned at every step; lasts: prefix (the other tokens of a longer sequence)
    -> the tokens banned right after it; lengths: the distinct prefix lengths, ascending.
    tokens: every token a step may ban; max_bans: the most one step can ban (at most one prefix
    of each length can end the output at a time)."""

    singles: frozenset[int]
    lasts: dict[tuple[int, ...], frozenset[int]]
    lengths: tuple[int, ...]
    tokens: frozenset[int]
    max_bans: int
    _heads: dict = field(default_factory=dict, repr=False, compare=False)   # (length, k) -> prefixes' first k

    @classmethod
    def of(cls, seqs: Sequence[Sequence[int]]) -> "BadWords":
        singles = frozenset(s[0] for s in seqs if len(s) == 1)
        lasts: dict[tuple[int, ...], set[int]] = defaultdict(set)
        for s in seqs:
            if len(s) > 1:
                lasts[tuple(s[:-1])].add(s[-1])
        frozen = {p: frozenset(t - singles) for p, t in lasts.items() if t - singles}
        lengths = tuple(sorted({len(p) for p in frozen}))
        tokens = singles.union(*frozen.values())
        worst = len(singles) + sum(max(len(t) for p, t in frozen.items() if len(p) == m) for m in lengths)
        return cls(singles, frozen, lengths, tokens, min(worst, len(tokens)))

    def bans(self, output: Sequence[int]) -> set[int]:
        """The tokens banned at the step after `output` (the request's output so far, all of it
        known): the single tokens, and the last token of each sequence whose prefix ends it."""
        out = set(self.singles)
        n = len(output)
        for m in self.lengths:
            if m > n:
                break
            hit = self.lasts.get(tuple(output[n - m:]))
            if hit:
                out |= hit
        return out

    def needs_history(self, output: Sequence[int], unknown: int) -> bool:
        """Whether the bans of the step after `output` and `unknown` more tokens, not known yet,
        can depend on those tokens: a prefix of some sequence may end there. Every prefix that
        ends the output includes its last token, so where this is False no longer sequence can
        match and the step bans `singles` alone."""
        n = len(output)
        for m in self.lengths:
            if m > n + unknown:
                break
            if m <= unknown:
                return True
            k = m - unknown                    # of the prefix's tokens, the known ones
            heads = self._heads.get((m, k))
            if heads is None:
                heads = self._heads[m, k] = {p[:k] for p in self.lasts if len(p) == m}
            if tuple(output[n - k:]) in heads:
                return True
        return False


@lru_cache(maxsize=256)
def _cached(tokenizer, words: tuple[str, ...]) -> BadWords:
    return BadWords.of(tokenize_bad_words(words, tokenizer))


def bad_words_of(words: Sequence[str] | None, tokenizer, vocab_size: int) -> BadWords | None:
    """A request's BadWords (None without bad words); ValueError as tokenize_bad_words, or for a
    token the model's vocabulary does not have. Kept per tokenizer and words: the boundary checks
    a request once per choice, the engine again when it admits it."""
    if not words:
        return None
    try:
        bw = _cached(tokenizer, tuple(words))
    except TypeError:                       # a tokenizer that cannot be a dict key
        bw = BadWords.of(tokenize_bad_words(words, tokenizer))
    bad = sorted(t for t in bw.tokens | {t for p in bw.lasts for t in p} if not 0 <= t < vocab_size)
    if bad:
        raise ValueError(f"bad_words tokenize to ids outside this model's vocabulary [0, {vocab_size}): {bad[:5]}")
    return bw
