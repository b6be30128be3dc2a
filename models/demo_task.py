"""The bundled demo model's task: counting.

The prompt `count from A to B:` (0 <= A <= B <= 999) is answered by ` A A+1 ... B`
(single spaces) followed by EOS. Every ` N` is one token of the demo tokenizer, so an
answer of k numbers is k + 1 generated tokens (numbers, then EOS).

Two layers here:
- text level (no tokenizer, no jax): prompts, answers, checking, pair sampling for
  training, held-out pairs, pairs of a given output length for benchmarks;
- token level: encode examples, pack them into rows with segment ids, and measure
  greedy exact match with one teacher-forced forward (used by the training script and
  by tests/test_demo_task.py).

Greedy decoding reproduces an answer exactly iff at every answer position (the EOS
position included) the argmax of the teacher-forced logits is the target token, so the
teacher-forced check is an exact and cheap stand-in for running the engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MAX_NUMBER = 999
MAX_SPAN = 999            # B - A the demo model is trained and evaluated on (the full range)
HELD_OUT_SEED = 0
NUM_HELD_OUT = 2000       # training excludes held_out_pairs(NUM_HELD_OUT, HELD_OUT_SEED)

_PROMPT_RE = re.compile(r"count from (\d{1,3}) to (\d{1,3}):")


# ----------------------------------------------------------------------------- text level

def make_prompt(a: int, b: int) -> str:
    """`count from A to B:`; raises on a pair outside the task."""
    _check_pair(a, b)
    return f"count from {a} to {b}:"


def expected_answer(a: int, b: int) -> str:
    """` A A+1 ... B` (the completion text, without EOS)."""
    _check_pair(a, b)
    return "".join(f" {n}" for n in range(a, b + 1))


def check_answer(a: int, b: int, text: str) -> bool:
    """True iff `text` is exactly the answer (EOS not included in `text`)."""
    return text == expected_answer(a, b)


def parse_prompt(text: str) -> tuple[int, int] | None:
    """(A, B) if `text` is exactly a task prompt, else None."""
    m = _PROMPT_RE.fullmatch(text)
    if m is None:
        return None
    a, b = int(m.group(1)), int(m.group(2))
    if str(a) != m.group(1) or str(b) != m.group(2) or not 0 <= a <= b <= MAX_NUMBER:
        return None
    return a, b


def answer_num_tokens(a: int, b: int) -> int:
    """Generated tokens of the answer: B - A + 1 numbers plus EOS."""
    return b - a + 2


def _check_pair(a: int, b: int) -> None:
    if not (isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)) and 0 <= a <= b <= MAX_NUMBER):
        raise ValueError(f"need integers 0 <= A <= B <= {MAX_NUMBER}, got A={a!r}, B={b!r}")


def _pair_with_span(span: int, rng: np.random.Generator) -> tuple[int, int]:
    a = int(rng.integers(0, MAX_NUMBER - span + 1))
    return a, a + span


def _hard_pair(rng: np.random.Generator, max_span: int) -> tuple[int, int]:
    """Pairs around the places a counter gets wrong: carries (9->10, 99->100, 199->200),
    stopping right at or just after a carry, A == B, and the ends of the range."""
    kind = int(rng.integers(0, 5))
    if kind in (0, 1):
        c = _carry_point(rng)
    if kind == 0:      # stop at or right after a carry: B in c-2 .. c+2
        b = min(MAX_NUMBER, c + int(rng.integers(-2, 3)))
        span = min(b, int(rng.integers(0, min(max_span, 64) + 1)))
        return b - span, b
    if kind == 1:      # start right before a carry, short count across it
        a = max(0, c - int(rng.integers(0, 4)))
        span = min(MAX_NUMBER - a, int(rng.integers(0, min(max_span, 16) + 1)))
        return a, a + span
    if kind == 2:      # tiny spans: A == B and a few numbers
        return _pair_with_span(int(rng.integers(0, min(max_span, 4) + 1)), rng)
    if kind == 3:      # crossing a hundreds carry (199 -> 200) with a medium span
        c = 100 * int(rng.integers(1, 10))
        a = max(0, c - int(rng.integers(1, 40)))
        b = min(MAX_NUMBER, c + int(rng.integers(0, 40)))
        b = min(b, a + max_span)
        return a, b
    # ends of the range
    span = int(rng.integers(0, max_span + 1))
    return (0, span) if rng.integers(0, 2) == 0 else (MAX_NUMBER - span, MAX_NUMBER)


def _carry_point(rng: np.random.Generator) -> int:
    """A number right after a carry: a multiple of 100 half the time, else of 10."""
    if rng.integers(0, 2) == 0:
        return 100 * int(rng.integers(1, 10))
    return 10 * int(rng.integers(1, 100))


def sample_pair(rng: np.random.Generator, max_span: int = MAX_SPAN) -> tuple[int, int]:
    """One pair from the training mixture: 40% spans uniform in [0, 255], 30% spans
    uniform in [256, max_span], 30% hard cases (see `_hard_pair`)."""
    u = rng.random()
    short = min(255, max_span)
    if u >= 0.7:
        return _hard_pair(rng, max_span)
    if u < 0.4 or max_span <= 255:
        return _pair_with_span(int(rng.integers(0, short + 1)), rng)
    return _pair_with_span(int(rng.integers(256, max_span + 1)), rng)


def sample_pairs(n: int, rng: np.random.Generator, max_span: int = MAX_SPAN,
                 exclude: frozenset[tuple[int, int]] | set[tuple[int, int]] = frozenset()) -> list[tuple[int, int]]:
    """`n` pairs from the training mixture, skipping any pair in `exclude`."""
    out: list[tuple[int, int]] = []
    while len(out) < n:
        p = sample_pair(rng, max_span)
        if p not in exclude:
            out.append(p)
    return out


def held_out_pairs(n: int, seed: int = HELD_OUT_SEED, max_span: int = MAX_SPAN) -> list[tuple[int, int]]:
    """`n` distinct pairs, drawn from the training mixture. Prefix-stable: the first k of
    `held_out_pairs(n)` are `held_out_pairs(k)`, so any n <= NUM_HELD_OUT with the default
    seed is excluded from the demo model's training data."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    while len(out) < n:
        p = sample_pair(rng, max_span)
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def pair_for_output_len(num_tokens: int, rng: np.random.Generator) -> tuple[int, int]:
    """A pair whose answer is `num_tokens` generated tokens, EOS included (B - A + 1
    numbers + EOS), clipped to [2, MAX_SPAN + 2]; A is uniform over the valid range."""
    span = int(np.clip(int(num_tokens) - 2, 0, MAX_SPAN))
    return _pair_with_span(span, rng)


# ----------------------------------------------------------------------------- token level

@dataclass(frozen=True)
class Example:
    """One tokenized prompt + answer. tokens: prompt ids, answer ids, EOS.
    answer_start: index of the first answer token (loss and checking start there)."""

    tokens: np.ndarray
    answer_start: int


@dataclass(frozen=True)
class PackedRows:
    """Examples packed into rows of equal length (shapes (R, L), int32).

    positions restart at 0 per example; seg is the example's segment within its row (-1
    for padding); targets[r, t] is the next token of the same example; loss_mask marks the
    positions whose target is an answer token or EOS; example[r, t] indexes the input list
    (-1 for padding)."""

    tokens: np.ndarray
    positions: np.ndarray
    seg: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    example: np.ndarray


def number_token_ids(tokenizer) -> np.ndarray:
    """(MAX_NUMBER + 1,) ids of the tokens ` 0` ... ` 999`; raises if one is not a single token."""
    ids = []
    for n in range(MAX_NUMBER + 1):
        enc = tokenizer.encode(f" {n}", add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"' {n}' is {len(enc)} tokens {enc}; the demo tokenizer makes it one")
        ids.append(enc[0])
    return np.asarray(ids, np.int32)


class ExampleEncoder:
    """Fast tokenization of (A, B) pairs: prompts through the tokenizer, answers from a
    table of number ids (checked once against the tokenizer)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.num_ids = number_token_ids(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        probe = tokenizer.encode(expected_answer(98, 101), add_special_tokens=False)
        if probe != self.num_ids[98:102].tolist():
            raise ValueError(f"answer ' 98 99 100 101' tokenizes to {probe}, not one token per number")

    def prompt_ids(self, a: int, b: int, bos: bool = True) -> list[int]:
        ids = self.tokenizer.encode(make_prompt(a, b), add_special_tokens=False)
        return ([self.bos_id] if bos else []) + ids

    def encode(self, a: int, b: int, bos: bool = True) -> Example:
        p = self.prompt_ids(a, b, bos)
        toks = np.concatenate([np.asarray(p, np.int32), self.num_ids[a:b + 1], np.asarray([self.eos_id], np.int32)])
        return Example(toks, len(p))


def pack(examples: list[Example], row_len: int, num_rows: int | None = None, pad_id: int = 0) -> PackedRows:
    """First-fit-decreasing packing of whole examples into rows of `row_len` tokens.
    `num_rows`: exact number of rows (raises if they do not fit); None: as many as needed."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].tokens))
    fill: list[int] = []
    rows: list[list[int]] = []
    for i in order:
        n = len(examples[i].tokens)
        if n > row_len:
            raise ValueError(f"example of {n} tokens does not fit a row of {row_len}")
        r = next((j for j, f in enumerate(fill) if f + n <= row_len), None)
        if r is None:
            fill.append(0)
            rows.append([])
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += n
    nr = len(rows) if num_rows is None else num_rows
    if len(rows) > nr:
        raise ValueError(f"{len(examples)} examples need {len(rows)} rows of {row_len}, only {nr} allowed")
    return pack_assigned(examples, rows + [[] for _ in range(nr - len(rows))], row_len, pad_id)


def pack_assigned(examples: list[Example], rows: list[list[int]], row_len: int, pad_id: int = 0) -> PackedRows:
    """Lay out examples in rows: rows[r] lists the example indices of row r, in order."""
    shape = (len(rows), row_len)
    out = {k: np.full(shape, v, np.int32) for k, v in
           dict(tokens=pad_id, positions=0, seg=-1, targets=pad_id, loss_mask=0, example=-1).items()}
    for r, members in enumerate(rows):
        off = 0
        for s, i in enumerate(members):
            ex = examples[i]
            n = len(ex.tokens)
            if off + n > row_len:
                raise ValueError(f"row {r} overflows: {off + n} tokens > {row_len}")
            sl = slice(off, off + n)
            out["tokens"][r, sl] = ex.tokens
            out["positions"][r, sl] = np.arange(n)
            out["seg"][r, sl] = s
            out["example"][r, sl] = i
            out["targets"][r, off:off + n - 1] = ex.tokens[1:]
            out["loss_mask"][r, off + ex.answer_start - 1:off + n - 1] = 1
            off += n
    return PackedRows(**out)


def packed_rows_to_batch(rows: PackedRows):
    """The dense-mode `AttnBatch` for packed rows."""
    import jax.numpy as jnp

    from fastserve_jax.models.attention import AttnBatch
    return AttnBatch(positions=jnp.asarray(rows.positions), seg=jnp.asarray(rows.seg))


def teacher_forced_exact(apply_fn, examples: list[Example], row_lens: tuple[int, ...] = (256, 1024),
                         tokens_per_call: int = 8192) -> np.ndarray:
    """(len(examples),) bool: greedy decoding would reproduce each answer exactly.

    apply_fn(tokens (R, L) int32, AttnBatch) -> logits (R*L, V). Each example goes to the
    shortest row length that holds it (attention cost grows with the row length); rows of
    length L run tokens_per_call // L at a time, so there is one shape per row length."""
    ok = np.ones(len(examples), bool)
    lens = np.asarray([len(e.tokens) for e in examples])
    bucket = np.searchsorted(np.asarray(row_lens), lens)  # first row length >= len
    if (bucket >= len(row_lens)).any():
        raise ValueError(f"an example of {lens.max()} tokens exceeds the longest row length {max(row_lens)}")
    for k, row_len in enumerate(row_lens):
        idx = np.flatnonzero(bucket == k)
        if not len(idx):
            continue
        packed = pack([examples[i] for i in idx], row_len)
        rows = max(1, tokens_per_call // row_len)
        for start in range(0, packed.tokens.shape[0], rows):
            sl = slice(start, start + rows)
            chunk = PackedRows(*(_pad_rows(getattr(packed, f)[sl], rows, fill)
                                 for f, fill in zip(PackedRows.__dataclass_fields__, (0, 0, -1, 0, 0, -1))))
            logits = apply_fn(chunk.tokens, packed_rows_to_batch(chunk))
            pred = np.asarray(logits).argmax(-1).reshape(chunk.tokens.shape)
            wrong = (chunk.loss_mask == 1) & (pred != chunk.targets)
            ok[idx[np.unique(chunk.example[wrong])]] = False
    return ok


def answerable(pairs: list[tuple[int, int]], tokenizer) -> list[tuple[int, int]]:
    """The pairs the bundled demo model answers exactly under greedy decoding (it misses
    ~0.6%, around carries; models/demo/TRAINING.md), by one teacher-forced forward. A server
    that is correct must then return exactly these answers, however it batches."""
    import jax

    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.loader import load_model

    _, module, params = load_model(demo_model_path(), cache_dir="")
    apply = jax.jit(lambda t, b: module.apply({"params": params}, t, b)[0])
    ok = teacher_forced_exact(apply, [ExampleEncoder(tokenizer).encode(a, b) for a, b in pairs], row_lens=(256,))
    return [p for p, good in zip(pairs, ok) if good]


def _pad_rows(a: np.ndarray, n: int, fill: int) -> np.ndarray:
    if a.shape[0] == n:
        return a
    return np.concatenate([a, np.full((n - a.shape[0],) + a.shape[1:], fill, a.dtype)])
