"""Launch assembly: one iteration's scheduled requests -> padded host arrays (numpy only).

At most one decode launch (R sequences x 1 token, each row gathering its own blocks) plus
packed prefill launches (the chunks of several sequences back to back, cut into rows of
`prefill_tile` tokens). Every launch is padded to a bucket from EngineConfig, so its key is
one that warm-up compiled (`LaunchBuilder.launch_keys`). Nothing here touches a device;
tests build launches from a KVManager alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from fastserve_jax.config import EngineConfig
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.models.attention import AttnBatch
from fastserve_jax.prompt_logprobs import Span, fill_targets, needs_prompt_logprobs
from fastserve_jax.request import Request
from fastserve_jax.runner.keys import DecodeKey, LaunchKey, PrefillKey, launch_key_from_wire, launch_key_to_wire
from fastserve_jax.sampling import Penalties, SamplingArrays
from fastserve_jax.sampling_params import BIAS_SLOTS
from fastserve_jax.scheduler.base import ScheduledRequest


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= value."""
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


@dataclass
class Launch:
    """Host arrays of one padded launch; `rows[i]` is the request whose logits row i is."""

    key: LaunchKey
    tokens: np.ndarray              # (R, Q) int32
    batch: AttnBatch                # numpy arrays, shapes per models.attention
    logits_idx: np.ndarray          # (N,) int32
    rows: list[Request | None]      # requests to sample for, per logits row (None: discard)
    # (R,) int32, decode launches under async scheduling: row i's input token is entry src[i]
    # of the runner's token box when >= 0 (sampled by the batch before, not back on the host)
    src: np.ndarray | None = None
    # a prompt-logprobs prefill (PrefillKey.prompt_logprobs): (T,) int32 each packed token's
    # next prompt token, -1 for none, and the spans to record (fastserve_jax/prompt_logprobs.py)
    targets: np.ndarray | None = None
    spans: list[Span] | None = None


@dataclass
class LaunchWork:
    """One launch as plain arrays: the forward's inputs and, when some row is sampled, the
    sampler's variant and per-row arrays (what process 0 sends the others in multi-host mode)."""

    key: LaunchKey
    tokens: np.ndarray
    batch: AttnBatch
    logits_idx: np.ndarray
    greedy: bool = True
    logprobs: bool = False
    sampling: SamplingArrays | None = None
    penalties: Penalties | None = None
    src: np.ndarray | None = None
    targets: np.ndarray | None = None

    @classmethod
    def of(cls, ln: Launch, max_model_len: int) -> "LaunchWork":
        live = [r for r in ln.rows if r is not None]
        work = cls(ln.key, ln.tokens, ln.batch, ln.logits_idx, src=ln.src, targets=ln.targets)
        if live:
            work.greedy = all(r.sampling.greedy for r in live)
            work.logprobs = any(r.sampling.logprobs is not None for r in live)
            work.sampling = sampling_arrays(ln.rows)
            if any(r.sampling.penalized for r in live):
                work.penalties = penalty_arrays(ln.rows, max_model_len)
        return work

    def to_message(self) -> dict:
        return dict(key=launch_key_to_wire(self.key), tokens=self.tokens, batch=list(self.batch),
                    logits_idx=self.logits_idx, greedy=self.greedy, logprobs=self.logprobs,
                    sampling=None if self.sampling is None else list(self.sampling),
                    penalties=None if self.penalties is None else list(self.penalties), src=self.src,
                    targets=self.targets)

    @classmethod
    def from_message(cls, m: dict) -> "LaunchWork":
        return cls(launch_key_from_wire(m["key"]), m["tokens"], AttnBatch(*m["batch"]), m["logits_idx"], m["greedy"],
                   m["logprobs"], None if m["sampling"] is None else SamplingArrays(*m["sampling"]),
                   None if m["penalties"] is None else Penalties(*m["penalties"]), m.get("src"), m.get("targets"))


_INT32_MAX = np.iinfo(np.int32).max


def sampling_arrays(rows: list[Request | None]) -> SamplingArrays:
    n = len(rows)
    temp = np.zeros(n, np.float32)
    top_k = np.zeros(n, np.int32)
    top_p = np.ones(n, np.float32)
    min_p = np.zeros(n, np.float32)
    seed = np.zeros(n, np.uint32)
    step = np.zeros(n, np.int32)
    for i, r in enumerate(rows):
        if r is not None:
            sp = r.sampling
            # any top_k >= the vocabulary keeps every token, so one past int32 (vLLM takes any) is capped
            temp[i], top_k[i], top_p[i], min_p[i] = sp.temperature, min(sp.top_k, _INT32_MAX), sp.top_p, sp.min_p
            seed[i], step[i] = r.seed & 0xFFFFFFFF, r.num_tokens - r.num_prompt_tokens   # pending ones too
    return SamplingArrays(temp, top_k, top_p, min_p, seed, step)


def penalty_arrays(rows: list[Request | None], max_model_len: int) -> Penalties:
    """Penalties (N,); histories (N, max_model_len) padded with -1: a row's output so far,
    after its prompt's distinct tokens where its repetition penalty is not 1 (out_start of
    them; prompt and output together never exceed max_model_len); and logit biases,
    (N, BIAS_SLOTS) padded with -1: a row's logit_bias, while fewer than its min_tokens are
    out (pending ones too) -inf on its EOS and stop token ids, and -inf on what its bad words
    ban (`bad_word_bans`); with allowed_token_ids, exactly those tokens (with their biases) and
    the row marked exclusive. Rows without any keep an empty history and no biases."""
    n = len(rows)
    presence = np.zeros(n, np.float32)
    frequency = np.zeros(n, np.float32)
    repetition = np.ones(n, np.float32)
    out_start = np.zeros(n, np.int32)
    history = np.full((n, max_model_len), -1, np.int32)
    bias_ids = np.full((n, BIAS_SLOTS), -1, np.int32)
    bias = np.zeros((n, BIAS_SLOTS), np.float32)
    exclusive = np.zeros(n, np.bool_)
    for i, r in enumerate(rows):
        if r is None or not r.sampling.penalized:
            continue
        sp = r.sampling
        presence[i], frequency[i], repetition[i] = sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty
        seen, out_start[i] = r.penalty_history(sp.repetition_penalty != 1)
        history[i, :len(seen)] = seen
        row = dict(sp.logit_bias or {})
        if r.num_tokens - r.num_prompt_tokens < sp.min_tokens:
            row.update(dict.fromkeys(banned_until_min_tokens(r), -np.inf))
        if r.bad_words is not None:
            row.update(dict.fromkeys(bad_word_bans(r), -np.inf))
        if sp.allowed_token_ids is not None:     # the slots hold the allowed tokens, biased or not, and no others
            row, exclusive[i] = {t: row.get(t, 0.0) for t in sp.allowed_token_ids}, True
        if row:
            bias_ids[i, :len(row)] = list(row)
            bias[i, :len(row)] = list(row.values())
    return Penalties(presence, frequency, repetition, out_start, history, bias_ids, bias, exclusive)


def banned_until_min_tokens(r: Request) -> set[int]:
    """The tokens a request may not sample before its min_tokens: its EOS and stop token ids."""
    return set(r.eos_token_ids) | set(r.sampling.stop_token_ids)


def bad_word_bans(r: Request) -> set[int]:
    """The tokens a request's bad words ban at its next step (fastserve_jax/bad_words.py). With
    a token in flight (async scheduling) only the single-token words': the engine lets a row
    sample there only where no longer word can match whatever that token is (engine._advance)."""
    if r.pending_tokens:
        return set(r.bad_words.singles)
    return r.bad_words.bans(r.output_token_ids)


class LaunchBuilder:
    """Builds the padded launches of one plan from the KV manager's block tables.

    `ready`: None pads each launch to its own bucket (compiled on first use if need be);
    otherwise a predicate on launch keys, and each launch takes the smallest bucket that fits
    and is ready (warm-up in the background: the compiled set grows while serving)."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.bs = cfg.block_size
        self.ready: Callable[[LaunchKey], bool] | None = None
        # the most blocks a decode row gathers (one sequence of max_model_len)
        self.decode_top = bucket(cfg.max_blocks_per_seq, cfg.block_buckets)
        self._floors: dict[int, int] = {}          # rows -> floor (see `floor`)

    def _fit(self, exact: LaunchKey, size: int) -> LaunchKey | None:
        """`exact` if ready (or nothing is checked), else the cheapest ready key of its kind
        and size with at least its blocks (None if there is none)."""
        if self.ready is None or self.ready(exact):
            return exact
        fits = [k for k in self.launch_keys() if type(k) is type(exact) and k.blocks >= exact.blocks
                and (k.rows if isinstance(k, DecodeKey) else k.tokens) == size and self.ready(k)]
        return min(fits, key=lambda k: k.blocks) if fits else None

    # -- shapes ----------------------------------------------------------------------------
    def launch_keys(self) -> list[LaunchKey]:
        """Every launch shape serving can produce (what warm-up compiles)."""
        c = self.cfg
        keys: list[LaunchKey] = [DecodeKey(r, nb) for r in c.decode_batch_buckets for nb in c.block_buckets
                                 if self.floor(r, decode=True) <= nb <= self.decode_top]
        keys += [PrefillKey(t, nb) for t in c.prefill_token_buckets for nb in c.block_buckets
                 if nb >= self.floor(self.prefill_shape(t)[0])]
        return keys

    def floor(self, rows: int, decode: bool = False) -> int:
        """The fewest blocks per row a launch of `rows` rows compiles with: the largest bucket
        whose KV reads stay within min_launch_blocks (EngineConfig.launch_kv_fraction).
        Memoised: the builder asks for every launch it assembles."""
        low = self._floors.get(rows)
        if low is None:
            c = self.cfg
            under = [b for b in c.block_buckets if rows * b <= c.min_launch_blocks]
            low = self._floors[rows] = under[-1] if under else c.block_buckets[0]
        return min(low, self.decode_top) if decode else low

    def blocks_bucket(self, rows: int, blocks: int, decode: bool = False) -> int:
        """The block count a launch of `rows` rows gathering up to `blocks` per row pads to."""
        return max(bucket(blocks, self.cfg.block_buckets), self.floor(rows, decode))

    def sampler_rows(self) -> list[int]:
        """Logits rows a sampler sees: a decode bucket, or max_prefill_seqs for a prefill."""
        return sorted(set(self.cfg.decode_batch_buckets) | {self.cfg.max_prefill_seqs})

    def prefill_shape(self, t: int) -> tuple[int, int]:
        """(rows, tokens per row) of a prefill launch of t packed tokens."""
        tile = self.cfg.prefill_tile
        return (t // tile, tile) if t > tile and t % tile == 0 else (1, t)

    def launch_shape(self, key: LaunchKey) -> tuple[int, int, int]:
        """(rows, tokens per row, logits rows) of a launch."""
        if isinstance(key, DecodeKey):
            return key.rows, 1, key.rows
        return (*self.prefill_shape(key.tokens), self.cfg.max_prefill_seqs)

    # -- assembly --------------------------------------------------------------------------
    def _table(self, kv: KVManager, req: Request, upto_tokens: int) -> np.ndarray:
        nb = kv.blocks_for_tokens(upto_tokens)
        table = kv.block_table(req)
        assert len(table) >= nb, f"{req.request_id}: KV not allocated for {upto_tokens} tokens"
        return np.asarray(table[:nb], np.int32)

    def decode_key(self, rows: int, blocks: int) -> DecodeKey:
        """The launch key a decode of `rows` sequences gathering up to `blocks` blocks uses."""
        c = self.cfg
        r = bucket(rows, c.decode_batch_buckets)
        exact = DecodeKey(r, self.blocks_bucket(r, blocks, decode=True))
        for r in (b for b in c.decode_batch_buckets if b >= exact.rows):
            key = self._fit(DecodeKey(r, max(exact.blocks, self.floor(r, decode=True))), r)
            if key is not None:
                return key
        return exact

    def build_decode(self, items: list[ScheduledRequest], kv: KVManager) -> Launch:
        """One row per request, its next token at its position; each row gathers its blocks up
        to that position. One pass over the requests into Python lists, then one numpy
        conversion per array: per-row element writes took 1.7x as long (94 against 56 us for
        32 rows on the development VM), a third of the assemble phase."""
        bs = self.bs
        tokens_l, pos_l, slots_l, tables, rows_l = [], [], [], [], []
        src_l = None                         # async scheduling's pending input tokens (Launch.src)
        for i, s in enumerate(items):
            req = s.request
            p = req.num_computed_tokens
            table = kv.block_table(req)[:p // bs + 1]       # the blocks of p + 1 tokens
            assert len(table) == p // bs + 1, f"{req.request_id}: KV not allocated for {p + 1} tokens"
            prompt, out = req.prompt_token_ids, req.output_token_ids
            known = len(prompt) + len(out)
            if p < known:                                    # the token at position p
                tokens_l.append(prompt[p] if p < len(prompt) else out[p - len(prompt)])
            else:                                            # not back yet: read from the token box
                assert req.token_slot >= 0, f"{req.request_id}: its next input token is neither on the host nor in the box"
                tokens_l.append(0)
                src_l = src_l or [-1] * len(items)
                src_l[i] = req.token_slot
            pos_l.append(p)
            slots_l.append(table[-1] * bs + p % bs)
            tables.append(table)
            rows_l.append(req if known + req.pending_tokens - p == 1 else None)    # num_pending_tokens == 1
        n = len(items)
        key = self.decode_key(n, max(map(len, tables)))
        rows, nb = key.rows, key.blocks
        tokens = np.zeros((rows, 1), np.int32)
        tokens[:n, 0] = tokens_l
        pos = np.zeros((rows, 1), np.int32)
        pos[:n, 0] = pos_l
        seg = np.full((rows, 1), -1, np.int32)
        seg[:n] = 0
        slots = np.zeros((rows, 1), np.int32)
        slots[:n, 0] = slots_l
        block_ids = np.zeros((rows, nb), np.int32)
        block_ids[:n] = [t + [0] * (nb - len(t)) for t in tables]
        block_seg = np.full((rows, nb), -2, np.int32)
        block_seg[:n][np.arange(nb) < np.array([len(t) for t in tables])[:, None]] = 0
        block_pos = np.broadcast_to(np.arange(nb, dtype=np.int32) * bs, (rows, nb)).copy()
        src = None
        if src_l is not None:
            src = np.full(rows, -1, np.int32)
            src[:n] = src_l
        return Launch(key, tokens, AttnBatch(pos, seg, slots, block_ids, block_seg, block_pos),
                      np.arange(rows, dtype=np.int32), rows_l + [None] * (rows - n), src)

    def split_prefill(self, items: list[ScheduledRequest], kv: KVManager) -> list[list[ScheduledRequest]]:
        """Greedy packing into launches that fit the largest token and block buckets."""
        c = self.cfg
        groups, cur, toks, blocks = [], [], 0, 0
        for s in items:
            nb = kv.blocks_for_tokens(s.request.num_computed_tokens + s.num_tokens)
            if cur and (len(cur) == c.max_prefill_seqs or toks + s.num_tokens > c.prefill_token_buckets[-1]
                        or blocks + nb > c.block_buckets[-1]):
                groups.append(cur)
                cur, toks, blocks = [], 0, 0
            cur.append(s)
            toks += s.num_tokens
            blocks += nb
        if cur:
            groups.append(cur)
        return groups

    def build_prefill(self, items: list[ScheduledRequest], kv: KVManager) -> Launch:
        """The chunks of `items` packed back to back, cut into rows of `prefill_tile` tokens;
        each row gathers, per sequence it holds, the blocks up to its last token there."""
        c = self.cfg
        need = bucket(sum(s.num_tokens for s in items), c.prefill_token_buckets)
        tables = [self._table(kv, s.request, s.request.num_computed_tokens + s.num_tokens) for s in items]
        # the prompt-logprobs variant is never warmed up: its own bucket, compiled when first asked
        plp = any(needs_prompt_logprobs(s.request, s.num_tokens) for s in items)
        for t in (b for b in c.prefill_token_buckets if b >= need and not plp):
            packed = self._pack(items, tables, kv, t)
            key = self._fit(PrefillKey(t, self.blocks_bucket(self.prefill_shape(t)[0], packed[-1])), t)
            if key is not None:
                return self._prefill_launch(key, *packed)
        packed = self._pack(items, tables, kv, need)
        return self._prefill_launch(PrefillKey(need, self.blocks_bucket(self.prefill_shape(need)[0], packed[-1]),
                                               plp), *packed)

    def _pack(self, items: list[ScheduledRequest], tables: list[np.ndarray], kv: KVManager, t: int):
        """Token arrays of the chunks packed into t tokens, the blocks each row gathers and the
        most any row gathers."""
        c, bs = self.cfg, self.bs
        r, q = self.prefill_shape(t)
        tokens = np.zeros(t, np.int32)
        pos = np.zeros(t, np.int32)
        seg = np.full(t, -1, np.int32)
        slots = np.zeros(t, np.int32)
        logits_idx = np.zeros((c.max_prefill_seqs,), np.int32)
        rows: list[Request | None] = [None] * c.max_prefill_seqs
        row_blocks: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(r)]
        targets, spans = np.full(t, -1, np.int32), []
        at = 0
        for i, (s, table) in enumerate(zip(items, tables)):
            req, n = s.request, s.num_tokens
            p0 = req.num_computed_tokens
            p = np.arange(p0, p0 + n, dtype=np.int32)
            assert p0 + n <= req.num_known_tokens, f"{req.request_id}: a prefill over tokens not back on the host"
            tokens[at:at + n] = (req.prompt_token_ids + req.output_token_ids)[p0:p0 + n]
            pos[at:at + n] = p
            seg[at:at + n] = i
            slots[at:at + n] = table[p // bs] * bs + p % bs
            fill_targets(targets, spans, req, at, p0, n)
            for row in range(at // q, (at + n - 1) // q + 1):
                last = min(at + n, (row + 1) * q) - 1          # this sequence's last token in the row
                row_blocks[row].append((i, table[:kv.blocks_for_tokens(p0 + last - at + 1)]))
            at += n
            logits_idx[i] = at - 1
            if p0 + n == req.num_tokens:
                rows[i] = req
        most = max(sum(len(tb) for _, tb in rb) for rb in row_blocks)
        return tokens, pos, seg, slots, logits_idx, rows, (targets, spans), row_blocks, most

    def _prefill_launch(self, key: PrefillKey, tokens, pos, seg, slots, logits_idx, rows, plp, row_blocks,
                        most) -> Launch:
        r, q = self.prefill_shape(key.tokens)
        nb, bs = key.blocks, self.bs
        block_ids = np.zeros((r, nb), np.int32)
        block_seg = np.full((r, nb), -2, np.int32)
        block_pos = np.zeros((r, nb), np.int32)
        for row, rb in enumerate(row_blocks):
            bt = 0
            for i, tb in rb:
                block_ids[row, bt:bt + len(tb)] = tb
                block_seg[row, bt:bt + len(tb)] = i
                block_pos[row, bt:bt + len(tb)] = np.arange(len(tb), dtype=np.int32) * bs
                bt += len(tb)
        batch = AttnBatch(pos.reshape(r, q), seg.reshape(r, q), slots.reshape(r, q), block_ids, block_seg, block_pos)
        targets, spans = plp if key.prompt_logprobs else (None, None)
        return Launch(key, tokens.reshape(r, q), batch, logits_idx, rows, targets=targets, spans=spans)

    def build(self, scheduled: list[ScheduledRequest], kv: KVManager) -> list[Launch]:
        """All launches of one plan: the decode launch first, then the packed prefills (a
        one-token prompt chunk whose prompt logprob is wanted among them: a decode launch
        computes no prompt logprobs)."""
        decode, prefill = [], []
        for s in scheduled:
            one = s.num_tokens == 1 and not needs_prompt_logprobs(s.request, 1)
            (decode if one else prefill).append(s)
        launches = [self.build_decode(decode, kv)] if decode else []
        launches += [self.build_prefill(g, kv) for g in self.split_prefill(prefill, kv)]
        return launches
