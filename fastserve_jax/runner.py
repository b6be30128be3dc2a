"""Device side: params, the KV cache buffers, jitted bucketed launches, sampling.

One iteration's plan becomes at most one decode launch (R sequences x 1 token, each row
gathering its own blocks) plus packed prefill launches (1 row of chunks from several
sequences). Every launch is padded to a bucket from EngineConfig and runs a forward that
was compiled at warm-up; the KV cache is donated in and returned updated, so it is never
copied. Logits stay on the device and go straight into a jitted sampler.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastserve_jax.config import MAX_LOGPROBS, EngineConfig, bucket
from fastserve_jax.kv_cache import KVManager, SwapCopy
from fastserve_jax.kv_transfer import KVTransfer
from fastserve_jax.request import Request, TokenLogprobs
from fastserve_jax.sampling import Penalties, SamplingArrays, sample
from fastserve_jax.scheduler.base import ScheduledRequest
from fastserve_jax.xla_flags import launch_compiler_options
from fastserve_jax.models import build_block, build_model
from fastserve_jax.models.attention import AttnBatch, KVCache
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.sharding.layout import ModelLayout, move
from fastserve_jax.sharding.pipeline import Stage, StageActivity, stage_forward


@dataclass
class Launch:
    """Host arrays of one padded launch; `rows[i]` is the request whose logits row i is."""

    key: tuple                      # ("decode", R, NB) or ("prefill", T, NB)
    tokens: np.ndarray              # (R, Q) int32
    batch: AttnBatch                # numpy arrays, shapes per models.attention
    logits_idx: np.ndarray          # (N,) int32
    rows: list[Request | None]      # requests to sample for, per logits row (None: discard)


@dataclass
class LaunchWork:
    """One launch as plain arrays: the forward's inputs and, when some row is sampled, the
    sampler's variant and per-row arrays."""

    key: tuple
    tokens: np.ndarray
    batch: AttnBatch
    logits_idx: np.ndarray
    greedy: bool = True
    logprobs: bool = False
    sampling: SamplingArrays | None = None
    penalties: Penalties | None = None

    def to_message(self) -> dict:
        return dict(key=list(self.key), tokens=self.tokens, batch=list(self.batch), logits_idx=self.logits_idx,
                    greedy=self.greedy, logprobs=self.logprobs,
                    sampling=None if self.sampling is None else list(self.sampling),
                    penalties=None if self.penalties is None else list(self.penalties))

    @classmethod
    def from_message(cls, m: dict) -> "LaunchWork":
        return cls(tuple(m["key"]), m["tokens"], AttnBatch(*m["batch"]), m["logits_idx"], m["greedy"], m["logprobs"],
                   None if m["sampling"] is None else SamplingArrays(*m["sampling"]),
                   None if m["penalties"] is None else Penalties(*m["penalties"]))


def _wire(moves: list[tuple[str, tuple[int, ...]]]) -> list:
    return [[rid, np.asarray(blocks, np.int32)] for rid, blocks in moves]


def fetch(tree):
    """Device results to numpy. Across processes an array is not fully addressable; the
    sampler's outputs are replicated, so this process's own copy is the whole value."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def _attn_batch(positions, seg, slots, block_ids, block_seg, block_pos) -> AttnBatch:
    return AttnBatch(positions, seg, slots, block_ids, block_seg, block_pos)


class ModelRunner:
    """Runs launches through the pipeline stages of one `ModelLayout` (a single stage on one
    device by default). `params` is the canonical tree, already placed by the layout; each
    stage keeps its own part of it, with the layers as separate per-layer arrays."""

    def __init__(self, params, model_cfg: ModelConfig, cfg: EngineConfig, num_blocks: int,
                 layout: ModelLayout, swap: bool = False, record_stages: bool | None = None,
                 free_params: bool = False) -> None:
        """free_params: the runner owns `params`; its stacked `layers/*` leaves are deleted as
        they are split into per-layer arrays (see `ModelLayout.split_layers`)."""
        self.layout = layout
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.bs = cfg.block_size
        self.act_dtype = jnp.dtype(cfg.dtype)
        stage_cfg = dataclasses.replace(model_cfg, num_layers=layout.layers_per_stage)
        module, block = build_model(stage_cfg, cfg.dtype), build_block(stage_cfg, cfg.dtype)
        shape = layout.cache_shape(num_blocks, cfg.block_size)
        self.stages: list[Stage] = []
        for s, sp in enumerate(layout.split_layers(params, free=free_params)):
            first, last = s == 0, s == layout.pp - 1
            cs = layout.cache_sharding(s, shape)
            rep = layout.replicated(s)
            x_in = rep if first else layout.activation_sharding(s)
            zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=cs)
            fn = jax.jit(stage_forward(module, block, first, last), donate_argnames=("cache",),
                         in_shardings=(jax.tree.map(lambda x: x.sharding, sp), KVCache(cs, cs), x_in, rep, rep),
                         out_shardings=(rep, KVCache(cs, cs)))
            self.stages.append(Stage(s, first, last, sp, KVCache(zeros(), zeros()), cs, None if first else x_in,
                                     rep, fn))
        self._sample = jax.jit(sample, static_argnames=("greedy", "with_logprobs"))
        self._compiled: dict[tuple, Callable] = {}      # sampler variants
        # Swap copies (kv_transfer.py), every stage's shard of a request at once; None without a host pool.
        self.transfer = (KVTransfer([st.cache_sharding for st in self.stages], cfg.max_blocks_per_seq,
                                    kv_block_bytes(model_cfg, cfg)) if swap else None)
        if record_stages is None:
            record_stages = layout.pp > 1
        self.activity = StageActivity(layout.pp) if record_stages else None
        self.warmup_seconds = 0.0
        # Multi-host leader: called with every device operation, as a message for the other
        # processes to replay in the same order (sharding/worker.py); None on one host.
        self.mirror: Callable[[dict], None] | None = None

    @property
    def caches(self) -> list[KVCache]:
        return [st.cache for st in self.stages]

    def _set_caches(self, caches: list[KVCache]) -> None:
        for st, c in zip(self.stages, caches):
            st.cache = c

    # -- shapes ----------------------------------------------------------------------------
    def launch_keys(self) -> list[tuple]:
        """Every launch shape serving can produce (what warm-up compiles)."""
        c = self.cfg
        dec_nb = [b for b in c.block_buckets if b <= bucket(c.max_blocks_per_seq, c.block_buckets)]
        keys = [("decode", r, nb) for r in c.decode_batch_buckets for nb in dec_nb]
        keys += [("prefill", t, nb) for t in c.prefill_token_buckets for nb in c.block_buckets]
        return keys

    def _abstract_args(self, key: tuple, stage: Stage):
        kind, a, nb = key
        r, q = (a, 1) if kind == "decode" else self.prefill_shape(a)
        n = a if kind == "decode" else self.cfg.max_prefill_seqs
        i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
        batch = _attn_batch(i32(r, q), i32(r, q), i32(r, q), i32(r, nb), i32(r, nb), i32(r, nb))
        x = i32(r, q) if stage.first else jax.ShapeDtypeStruct((r, q, self.model_cfg.hidden_size), self.act_dtype,
                                                               sharding=stage.input_sharding)
        return x, batch, i32(n)

    def _sampler_rows(self) -> list[int]:
        return sorted(set(self.cfg.decode_batch_buckets) | {self.cfg.max_prefill_seqs})

    def warmup(self, progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> float:
        """Compile every launch shape and sampler variant; returns seconds taken.

        XLA compiles outside the GIL, so a small thread pool overlaps them (lowering stays
        serial); on a 2-core machine that is close to 2x. Each launch shape gets the compiler
        options of its size (xla_flags.py: small CPU launches run their dots through Eigen)."""
        t0 = time.perf_counter()
        jobs: list[tuple[tuple, Callable]] = []
        options: dict[tuple, dict[str, str]] = {}
        for st in self.stages:
            platform = st.devices[0].platform
            for key in self.launch_keys():
                x, batch, idx = self._abstract_args(key, st)
                job = ("stage", st.index, key)
                jobs.append((job, functools.partial(st.fn.lower, st.params, st.cache, x, batch, idx)))
                options[job] = launch_compiler_options(platform, tokens=key[1])
        vocab = self.model_cfg.vocab_size
        # the sampler runs where the logits are: replicated over the last stage's devices
        sds = functools.partial(jax.ShapeDtypeStruct, sharding=self.stages[-1].replicated)
        for n in self._sampler_rows():
            logits = sds((n, vocab), jnp.float32)
            s = SamplingArrays(*(sds((n,), dt) for dt in (jnp.float32, jnp.int32, jnp.float32, jnp.uint32, jnp.int32)))
            pen = Penalties(sds((n,), jnp.float32), sds((n,), jnp.float32), sds((n, self.cfg.max_model_len), jnp.int32))
            for greedy in (True, False):
                for lp in (False, True):
                    for with_pen in (False, True):
                        args = (logits, s, pen) if with_pen else (logits, s)
                        jobs.append((("sample", n, greedy, lp, with_pen),
                                     functools.partial(self._sample.lower, *args, greedy=greedy, with_logprobs=lp)))
        if self.transfer is not None:
            jobs += self.transfer.lowerings(self.caches)
        workers = threads or min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = {pool.submit(lambda lower, opts: lower().compile(compiler_options=opts or None), lower,
                                   options.get(key)): key for key, lower in jobs}
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                key = futures[fut]
                if key[0].startswith("swap_"):
                    self.transfer.add_compiled(key, fut.result())
                elif key[0] == "stage":
                    self.stages[key[1]].compiled[key[2]] = fut.result()
                else:
                    self._compiled[key] = fut.result()
                if progress:
                    progress(done, len(jobs))
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    # -- launch assembly (host, numpy) -----------------------------------------------------
    def _table(self, kv: KVManager, req: Request, upto_tokens: int) -> np.ndarray:
        nb = kv.blocks_for_tokens(upto_tokens)
        table = kv.block_table(req)
        assert len(table) >= nb, f"{req.request_id}: KV not allocated for {upto_tokens} tokens"
        return np.asarray(table[:nb], np.int32)

    def build_decode(self, items: list[ScheduledRequest], kv: KVManager) -> Launch:
        c, bs = self.cfg, self.bs
        r = bucket(len(items), c.decode_batch_buckets)
        tables = [self._table(kv, s.request, s.request.num_computed_tokens + 1) for s in items]
        nb = bucket(max(len(t) for t in tables), c.block_buckets)
        tokens = np.zeros((r, 1), np.int32)
        pos = np.zeros((r, 1), np.int32)
        seg = np.full((r, 1), -1, np.int32)
        slots = np.zeros((r, 1), np.int32)
        block_ids = np.zeros((r, nb), np.int32)
        block_seg = np.full((r, nb), -2, np.int32)
        for i, (s, table) in enumerate(zip(items, tables)):
            p = s.request.num_computed_tokens
            tokens[i, 0] = s.request.token_at(p)
            pos[i, 0] = p
            seg[i, 0] = 0
            slots[i, 0] = table[p // bs] * bs + p % bs
            block_ids[i, :len(table)] = table
            block_seg[i, :len(table)] = 0
        block_pos = np.broadcast_to(np.arange(nb, dtype=np.int32) * bs, (r, nb)).copy()
        rows = [s.request if s.request.num_pending_tokens == 1 else None for s in items] + [None] * (r - len(items))
        return Launch(("decode", r, nb), tokens, _attn_batch(pos, seg, slots, block_ids, block_seg, block_pos),
                      np.arange(r, dtype=np.int32), rows)

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

    def prefill_shape(self, t: int) -> tuple[int, int]:
        """(rows, tokens per row) of a prefill launch of t packed tokens."""
        tile = self.cfg.prefill_tile
        return (t // tile, tile) if t > tile and t % tile == 0 else (1, t)

    def build_prefill(self, items: list[ScheduledRequest], kv: KVManager) -> Launch:
        """The chunks of `items` packed back to back, cut into rows of `prefill_tile` tokens;
        each row gathers, per sequence it holds, the blocks up to its last token there."""
        c, bs = self.cfg, self.bs
        t = bucket(sum(s.num_tokens for s in items), c.prefill_token_buckets)
        r, q = self.prefill_shape(t)
        tables = [self._table(kv, s.request, s.request.num_computed_tokens + s.num_tokens) for s in items]
        tokens = np.zeros(t, np.int32)
        pos = np.zeros(t, np.int32)
        seg = np.full(t, -1, np.int32)
        slots = np.zeros(t, np.int32)
        logits_idx = np.zeros((c.max_prefill_seqs,), np.int32)
        rows: list[Request | None] = [None] * c.max_prefill_seqs
        row_blocks: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(r)]
        at = 0
        for i, (s, table) in enumerate(zip(items, tables)):
            req, n = s.request, s.num_tokens
            p0 = req.num_computed_tokens
            p = np.arange(p0, p0 + n, dtype=np.int32)
            tokens[at:at + n] = (req.prompt_token_ids + req.output_token_ids)[p0:p0 + n]
            pos[at:at + n] = p
            seg[at:at + n] = i
            slots[at:at + n] = table[p // bs] * bs + p % bs
            for row in range(at // q, (at + n - 1) // q + 1):
                last = min(at + n, (row + 1) * q) - 1          # this sequence's last token in the row
                row_blocks[row].append((i, table[:kv.blocks_for_tokens(p0 + last - at + 1)]))
            at += n
            logits_idx[i] = at - 1
            if p0 + n == req.num_tokens:
                rows[i] = req
        nb = bucket(max(sum(len(tb) for _, tb in rb) for rb in row_blocks), c.block_buckets)
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
        batch = _attn_batch(pos.reshape(r, q), seg.reshape(r, q), slots.reshape(r, q), block_ids, block_seg, block_pos)
        return Launch(("prefill", t, nb), tokens.reshape(r, q), batch, logits_idx, rows)

    def build_launches(self, scheduled: list[ScheduledRequest], kv: KVManager) -> list[Launch]:
        decode = [s for s in scheduled if s.num_tokens == 1]
        prefill = [s for s in scheduled if s.num_tokens > 1]
        launches = [self.build_decode(decode, kv)] if decode else []
        launches += [self.build_prefill(g, kv) for g in self.split_prefill(prefill, kv)]
        return launches

    # -- execution -------------------------------------------------------------------------
    def _sample_fn(self, key: tuple, greedy: bool, with_logprobs: bool) -> Callable:
        fn = self._compiled.get(key)
        if fn is None:  # not warmed up (only when warm-up was skipped): compile on demand
            return lambda *a: self._sample(*a, greedy=greedy, with_logprobs=with_logprobs)
        return fn

    def _sampling_arrays(self, rows: list[Request | None]) -> SamplingArrays:
        n = len(rows)
        temp = np.zeros(n, np.float32)
        top_k = np.zeros(n, np.int32)
        top_p = np.ones(n, np.float32)
        seed = np.zeros(n, np.uint32)
        step = np.zeros(n, np.int32)
        for i, r in enumerate(rows):
            if r is not None:
                sp = r.sampling
                temp[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
                seed[i], step[i] = r.seed & 0xFFFFFFFF, len(r.output_token_ids)
        return SamplingArrays(temp, top_k, top_p, seed, step)

    def _penalty_arrays(self, rows: list[Request | None]) -> Penalties:
        """Penalties and output histories, (N,) and (N, max_model_len) padded with -1; rows
        without penalties keep an empty history (their penalties are 0 anyway)."""
        n = len(rows)
        presence = np.zeros(n, np.float32)
        frequency = np.zeros(n, np.float32)
        history = np.full((n, self.cfg.max_model_len), -1, np.int32)
        for i, r in enumerate(rows):
            if r is not None and r.sampling.penalized:
                presence[i], frequency[i] = r.sampling.presence_penalty, r.sampling.frequency_penalty
                history[i, :len(r.output_token_ids)] = r.output_token_ids
        return Penalties(presence, frequency, history)

    def forward(self, ln: Launch | LaunchWork, batch_id: int = -1):
        """Queue one launch through every stage (asynchronously); returns the logits."""
        rec = self.activity.begin(batch_id) if self.activity is not None else None
        x = ln.tokens
        for st in self.stages:
            if not st.first:
                x = move(x, st.input_sharding)
            x = st.run(ln.key, x, ln.batch, ln.logits_idx)
            if rec is not None:
                self.activity.output(rec, st.index, x)
        return x

    def prepare(self, ln: Launch) -> LaunchWork:
        """Everything the device needs for one launch, as plain arrays (what process 0 sends to
        the other processes in multi-host mode)."""
        live = [r for r in ln.rows if r is not None]
        work = LaunchWork(ln.key, ln.tokens, ln.batch, ln.logits_idx)
        if live:
            work.greedy = all(r.sampling.greedy for r in live)
            work.logprobs = any(r.sampling.logprobs is not None for r in live)
            work.sampling = self._sampling_arrays(ln.rows)
            if any(r.sampling.penalized for r in live):
                work.penalties = self._penalty_arrays(ln.rows)
        return work

    def dispatch(self, launches: list[Launch], batch_id: int = -1) -> list:
        """Run the launches back to back (asynchronously); returns device results per launch."""
        work = [self.prepare(ln) for ln in launches]
        self._mirror("dispatch", launches=[w.to_message() for w in work])
        return self.run(work, batch_id)

    def run(self, work: list[LaunchWork], batch_id: int = -1) -> list:
        pending = []
        for w in work:
            logits = self.forward(w, batch_id)
            if w.sampling is None:
                pending.append(None)
                continue
            pen = w.penalties is not None
            n = w.sampling.temperature.shape[0]
            args = (logits, w.sampling) + ((w.penalties,) if pen else ())
            pending.append(self._sample_fn(("sample", n, w.greedy, w.logprobs, pen), w.greedy, w.logprobs)(*args))
        return pending

    @staticmethod
    def collect(launches: list[Launch], pending: list) -> list[tuple[Request, int, TokenLogprobs | None]]:
        """Wait for the sampled tokens; one (request, token, logprobs) per sampled row."""
        results = []
        for ln, out in zip(launches, pending):
            if out is None:
                continue
            host = fetch(out)
            for i, req in enumerate(ln.rows):
                if req is None or req.finished:      # aborted while its batch was in flight
                    continue
                tok = int(host.tokens[i])
                lp = None
                if host.logprob is not None and req.sampling.logprobs is not None:
                    k = req.sampling.logprobs
                    lp = TokenLogprobs(tok, float(host.logprob[i]),
                                       {int(t): float(v) for t, v in zip(host.top_ids[i, :k], host.top_logprobs[i, :k])})
                results.append((req, tok, lp))
        return results

    # -- swap copies (kv_transfer.py); order: swap_out, swap_in_now, dispatch, then ahead moves --
    def _mirror(self, op: str, **args) -> None:
        if self.mirror is not None:
            self.mirror({"op": op, **args})

    @staticmethod
    def _moves(copies: list[SwapCopy]) -> list[tuple[str, tuple[int, ...]]]:
        return [(c.request.request_id, c.device_blocks) for c in copies]

    def swap_out(self, copies: list[SwapCopy]) -> None:
        self.swap_out_moves(self._moves(copies))

    def swap_in_now(self, copies: list[SwapCopy]) -> None:
        """Copies the next step needs: issued and scattered before it (the step waits for them)."""
        self.swap_in_now_moves(self._moves(copies))

    def start_swap_in(self, copies: list[SwapCopy]) -> None:
        self.start_swap_in_moves(self._moves(copies))

    # The same operations on plain (request id, device blocks) pairs, which is what the other
    # processes replay in multi-host mode (sharding/worker.py).
    def swap_out_moves(self, moves: list[tuple[str, tuple[int, ...]]]) -> None:
        self._mirror("swap_out", moves=_wire(moves))
        for rid, blocks in moves:
            self.transfer.swap_out(self.caches, rid, tuple(blocks))

    def swap_in_now_moves(self, moves: list[tuple[str, tuple[int, ...]]]) -> None:
        self._mirror("swap_in_now", moves=_wire(moves))
        for rid, blocks in moves:
            self._set_caches(self.transfer.swap_in_now(self.caches, rid, tuple(blocks)))

    def start_swap_in_moves(self, moves: list[tuple[str, tuple[int, ...]]]) -> None:
        self._mirror("start_swap_in", moves=_wire(moves))
        for rid, blocks in moves:
            self.transfer.start_swap_in(rid, tuple(blocks))

    def land_swap_in(self, request_id: str) -> None:
        self._mirror("land_swap_in", request_id=request_id)
        self._set_caches(self.transfer.land_swap_in(self.caches, request_id))

    def discard(self, request_id: str) -> None:
        """Forget a request's host copy or pending upload (it finished, or its KV was dropped)."""
        if self.transfer is not None:
            self._mirror("discard", request_id=request_id)
            self.transfer.discard(request_id)

    def execute(self, scheduled: list[ScheduledRequest], kv: KVManager):
        launches = self.build_launches(scheduled, kv)
        return self.collect(launches, self.dispatch(launches))


def kv_block_bytes(model_cfg: ModelConfig, cfg: EngineConfig) -> int:
    itemsize = jnp.dtype(cfg.dtype).itemsize
    return 2 * model_cfg.num_layers * cfg.block_size * model_cfg.num_kv_heads * model_cfg.head_dim * itemsize


def auto_num_blocks(model_cfg: ModelConfig, cfg: EngineConfig, param_bytes: int, layout: ModelLayout,
                    memory_fraction: float = 0.9, cpu_budget_bytes: int = 4 << 30) -> int:
    """Blocks that fit: on an accelerator, a fraction of one device's memory minus its share of
    the weights, over its share of a block (a block splits over the pp stages and the tp_kv
    KV-head shards); on CPU, a fixed budget for the whole pool. Never more than max_num_seqs
    full-length sequences need."""
    per_block = kv_block_bytes(model_cfg, cfg)
    dev = layout.devices[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        shards = layout.pp * layout.meshes.tp_kv
        avail = (int(stats["bytes_limit"] * memory_fraction) - param_bytes // len(layout.devices)
                 - stats.get("bytes_in_use", 0)) * shards
    else:
        avail = cpu_budget_bytes
    wanted = cfg.max_num_seqs * cfg.max_blocks_per_seq + 1
    return max(2, min(wanted, avail // per_block))


def auto_num_host_blocks(model_cfg: ModelConfig, cfg: EngineConfig, num_device_blocks: int,
                         budget_bytes: int = 4 << 30) -> int:
    """As many host blocks as the device pool has, within `budget_bytes` of host memory (the
    default swap space of vLLM; pinned host memory on CUDA is a capped pool, see JAX_NOTES)."""
    return max(0, min(num_device_blocks - 1, budget_bytes // kv_block_bytes(model_cfg, cfg)))
