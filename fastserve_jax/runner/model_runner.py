"""Device execution and sampling: launches through the pipeline stages, tokens back.

Each launch runs the forward that warm-up compiled for its key, stage after stage; every
stage's KV cache is donated into its step and returned updated, so it is never copied.
Logits stay on the device and go straight into a jitted sampler. Dispatch is asynchronous:
`dispatch` returns device results at once and `collect` waits for the sampled tokens.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastserve_jax.config import EngineConfig
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.kv_sizing import kv_block_bytes
from fastserve_jax.models import build_block, build_model
from fastserve_jax.models.attention import KVCache, pallas_kernel
from fastserve_jax.models.config import ModelConfig
from fastserve_jax.models.paged_attention import tuning as triton_tuning
from fastserve_jax.prompt_logprobs import chunked_token_logprobs, record as record_prompt_logprobs
from fastserve_jax.request import Request, TokenLogprobs
from fastserve_jax.runner import compiler
from fastserve_jax.runner.keys import LaunchKey, SamplerKey, key_from_wire, key_to_wire
from fastserve_jax.runner.kv_transfer import KVTransfer
from fastserve_jax.runner.launch import Launch, LaunchBuilder, LaunchWork
from fastserve_jax.runner.swap_ops import SwapOps
from fastserve_jax.runner.token_box import TokenBox
from fastserve_jax.sampling import sample
from fastserve_jax.scheduler.base import ScheduledRequest
from fastserve_jax.sharding.layout import ModelLayout, move
from fastserve_jax.sharding.pipeline import Stage, StageActivity, stage_forward


def fetch(tree):
    """Device results to numpy. Across processes an array is not fully addressable; the
    sampler's outputs are replicated, so this process's own copy is the whole value."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


class ModelRunner:
    """Runs launches through the pipeline stages of one `ModelLayout` (a single stage on one
    device by default). `params` is the canonical tree, already placed by the layout; each
    stage keeps its own part of it, with the layers as separate per-layer arrays.

    free_params: the runner owns `params`; its stacked `layers/*` leaves are deleted as they
    are split into per-layer arrays (see `ModelLayout.split_layers`). swap: keep a host pool's
    copies (`self.swaps`; None without one)."""

    def __init__(self, params, model_cfg: ModelConfig, cfg: EngineConfig, num_blocks: int,
                 layout: ModelLayout, swap: bool = False, record_stages: bool | None = None,
                 free_params: bool = False) -> None:
        # A dropped engine's executables stay in cyclic garbage (jax's tracing and lowering
        # structures refer to them) until the collector runs: about 11,000 memory maps each for
        # the demo model on CPU, and a handful of dead ones reach Linux's vm.max_map_count
        # (65,530), where the next compile fails ("LLVM ERROR: Unable to allocate section
        # memory"). Free them before this runner loads its own and allocates its caches.
        gc.collect()
        self.layout = layout
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.act_dtype = jnp.dtype(cfg.dtype)
        self.builder = LaunchBuilder(cfg)
        stage_cfg = dataclasses.replace(model_cfg, num_layers=layout.layers_per_stage)
        # The last stage also returns each logits row's hidden state pooled from the middle
        # layer of the model (or its own first layer, if the middle is in an earlier stage):
        # what the output-length predictor (predictor.py) reads.
        self.feature_layer = max(0, (model_cfg.num_layers - 1) // 2 - (layout.pp - 1) * layout.layers_per_stage)
        module = build_model(stage_cfg, cfg.dtype)
        shape = layout.cache_shape(num_blocks, cfg.block_size)
        self.stages: list[Stage] = []
        for s, sp in enumerate(layout.split_layers(params, free=free_params)):
            first, last = s == 0, s == layout.pp - 1
            cs = layout.cache_sharding(s, shape)
            rep = layout.replicated(s)
            x_in = rep if first else layout.activation_sharding(s)
            zeros = jax.jit(lambda: jnp.zeros(shape, cfg.dtype), out_shardings=cs)
            block = build_block(stage_cfg, cfg.dtype, cfg.attention_backend,
                                layout.head_sharding(s) if cfg.attention_backend == "pallas" else None)
            shardings = (jax.tree.map(lambda x: x.sharding, sp), KVCache(cs, cs), x_in, rep, rep)
            fn = jax.jit(stage_forward(module, block, first, last, self.feature_layer if last else None),
                         donate_argnames=("cache",), in_shardings=shardings, out_shardings=(rep, KVCache(cs, cs)))
            plp_fn = jax.jit(stage_forward(module, block, first, last, self.feature_layer,
                                           every_token=chunked_token_logprobs),
                             donate_argnames=("cache",), in_shardings=shardings + (rep,),
                             out_shardings=(rep, KVCache(cs, cs))) if last else None
            self.stages.append(Stage(s, first, last, sp, KVCache(zeros(), zeros()), cs, None if first else x_in,
                                     rep, fn, plp_fn=plp_fn, empty=lambda z=zeros: KVCache(z(), z())))
        backend = cfg.attention_backend + (f"-{pallas_kernel()}" if cfg.attention_backend == "pallas" else "")
        if backend == "pallas-triton":
            backend += f"-{triton_tuning().describe()}"         # the knobs change the program
        self.compiler = compiler.Compiler(self.builder, self.stages,
                                          jax.jit(sample, static_argnames=("greedy", "with_logprobs")),
                                          model_cfg.vocab_size, model_cfg.hidden_size, self.act_dtype,
                                          cfg.max_model_len,
                                          context=f"{stage_cfg!r}/{cfg.dtype}/{backend}/{layout.describe()}")
        # Multi-host leader: called with every device operation, as a message for the other
        # processes to replay in the same order (fastserve_jax/multihost.py); None on one host.
        self.mirror: Callable[[dict], None] | None = None
        self.swaps = (SwapOps(KVTransfer([st.cache_sharding for st in self.stages], cfg.max_blocks_per_seq,
                                         kv_block_bytes(model_cfg, cfg), shape), self.stages, self._mirror)
                      if swap else None)
        if record_stages is None:
            record_stages = layout.pp > 1
        self.activity = StageActivity(layout.pp) if record_stages else None
        # async scheduling: the next batch reads this batch's sampled tokens on the device
        self.token_box = (TokenBox(max(cfg.decode_batch_buckets) + 2 * cfg.max_prefill_seqs, self.stages[-1].replicated)
                          if cfg.async_scheduling else None)
        self.warmup_seconds = 0.0
        self.first_run_seconds = 0.0         # of warmup_seconds, running each program once (run_once)
        self.ran: set = set()                # launch and sampler keys that have run at least once

    @property
    def caches(self) -> list[KVCache]:
        return [st.cache for st in self.stages]

    def restore_lost_caches(self) -> bool:
        """Make anew, zeroed, each stage cache that a step donated and never got back: an
        exception raised by a signal handler (a timeout's SIGALRM) can land between the two,
        and every later step failed on the deleted buffer. True if one was lost; what it held
        is gone, so only for an engine where no request holds device KV. One process only (the
        zeros of a multi-host mesh would need every process's part)."""
        if jax.process_count() > 1:
            return False
        lost = [st for st in self.stages if st.cache.k.is_deleted() or st.cache.v.is_deleted()]
        for st in lost:
            st.cache = st.empty()
        return bool(lost)

    @property
    def transfer(self) -> KVTransfer | None:
        return self.swaps.transfer if self.swaps is not None else None

    def _mirror(self, msg: dict) -> None:
        if self.mirror is not None:
            self.mirror(msg)

    # -- compiled executables --------------------------------------------------------------
    def warmup(self, mode: str = "full", progress: Callable[[int, int], None] | None = None,
               threads: int | None = None) -> float:
        """Compile what the warm-up mode (compiler.py) wants before serving; returns seconds.
        "background" compiles the covering set now; `start_background_compile` does the rest."""
        mode = compiler.resolve_warmup(mode)
        if mode == "lazy":
            return 0.0
        t0 = time.perf_counter()
        if mode == "full":
            self.compiler.compile_now(self.compiler.all_keys(), progress, threads, self._swap_jobs())
        else:
            self.compiler.compile_now(self.compiler.covering_keys(), progress, threads)
            # weakly: the compiler holds the builder, and a cycle between them kept a dropped
            # engine's weights alive until a garbage collection after its background compile
            ready = weakref.WeakMethod(self.compiler.launch_ready)
            self.builder.ready = lambda key: ready()(key)
        if self.token_box is not None:
            self.token_box.compile_all(self.builder.sampler_rows(), list(self.cfg.decode_batch_buckets),
                                       self.cfg.max_model_len)
        if mode == "full" and (jax.process_count() == 1 or self.mirror is not None):
            self.run_once()          # a worker runs them when its leader's run reaches it (replay)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def run_once(self) -> float:
        """Run every compiled program once on padding (Compiler.run_once), so that no request
        pays a program's costlier first run; returns seconds. Across processes only the
        launches and samplers, mirrored to the workers (`_run_programs`)."""
        t0 = time.perf_counter()
        self._run_programs(self.first_runs_pending())
        one_process = jax.process_count() == 1      # else the token box's and swap copies' few ms are left
        if one_process and self.token_box is not None:
            self.token_box.run_once()
        if one_process and self.swaps is not None:
            caches = self.swaps.transfer.run_once(self.caches)
            for st, c in zip(self.stages, caches):
                st.cache = c
        self.first_run_seconds = time.perf_counter() - t0
        return self.first_run_seconds

    def _run_programs(self, keys: list) -> None:
        """Run these launch and sampler programs once on padding (Compiler.run_once); a leader
        mirrors it, and a worker compiles any it has not yet (its warm-up is a background one)."""
        self._mirror({"op": "run_once", "keys": [key_to_wire(k) for k in keys]})
        for k in keys:
            self.compiler.ensure(k)
        self.compiler.run_once(keys)
        self.ran.update(keys)

    def first_runs_pending(self) -> list:
        """The compiled launch and sampler keys that have not run yet, in all_keys' order
        (smallest first)."""
        return [k for k in self.compiler.all_keys() if k not in self.ran and self.compiler.compiled(k)]

    def run_pending(self, budget_s: float) -> bool:
        """Run compiled programs that have not run yet, one at a time on padding (as
        run_once), until `budget_s` is spent (at least one); returns whether any are left. For
        an idle engine after a background warm-up (serve/engine_loop.py): each program's
        costlier first run then happens before a request needs it, and a request arriving
        meanwhile waits at most about the budget and one program's run."""
        t0 = time.perf_counter()
        pending = self.first_runs_pending()
        for i, key in enumerate(pending, 1):
            self._run_programs([key])
            if time.perf_counter() - t0 >= budget_s:
                return i < len(pending)
        return False

    def start_background_compile(self) -> None:
        """After a "background" warm-up: compile every other shape on a thread (the engine
        calls this once it is otherwise ready, so the thread does not slow its start)."""
        if self.builder.ready is not None:
            self.compiler.start_background(self.compiler.all_keys(), self._swap_jobs())

    def fully_compiled(self) -> bool:
        """Every launch shape and sampler serving can use is compiled."""
        return all(self.compiler.compiled(k) for k in self.compiler.all_keys())

    def shapes_pending(self) -> bool:
        """A background warm-up has shapes left: launches pad to the compiled ones meanwhile."""
        return self.builder.ready is not None and not self.fully_compiled()

    def _swap_jobs(self) -> list:
        return self.swaps.transfer.compile_jobs(compiler.abstract(self.caches)) if self.swaps else []

    @property
    def samplers(self) -> dict[SamplerKey, Callable]:
        return self.compiler.samplers

    def executable(self, key: LaunchKey, stage: int = 0) -> Callable:
        """The compiled forward of `stage` for launch `key` (compiled now if it is not yet):
        fn(params, cache, x, batch, logits_idx) -> (output, cache)."""
        self.compiler.ensure(key)
        return self.stages[stage].compiled[key]

    def sampler(self, key: SamplerKey) -> Callable:
        """The compiled sampler variant for `key` (compiled now if it is not yet)."""
        self.compiler.ensure(key)
        return self.compiler.samplers[key]

    def abstract_args(self, key: LaunchKey, stage: int = 0):
        """(x, batch, logits_idx) as ShapeDtypeStructs for `key` on `stage` (for lowering)."""
        return compiler.abstract_launch_args(self.builder, key, self.stages[stage], self.model_cfg.hidden_size,
                                             self.act_dtype)

    # -- execution -------------------------------------------------------------------------
    def build_launches(self, scheduled: list[ScheduledRequest], kv: KVManager) -> list[Launch]:
        return self.builder.build(scheduled, kv)

    def keys_of(self, scheduled: list[ScheduledRequest], kv: KVManager) -> list:
        """The launch and sampler keys running `scheduled` would use; nothing runs or compiles."""
        keys: list = []
        for ln in self.build_launches(scheduled, kv):
            sk = sampler_key(LaunchWork.of(ln, self.cfg.max_model_len))
            keys += [ln.key] if sk is None else [ln.key, sk]
        return keys

    def forward(self, ln: Launch | LaunchWork, batch_id: int = -1):
        """Queue one launch through every stage (asynchronously); returns the logits."""
        self.compiler.ensure(ln.key)
        rec = self.activity.begin(batch_id) if self.activity is not None else None
        x = ln.tokens if ln.src is None else self.token_box.take(ln.tokens, ln.src)
        self.ran.add(ln.key)
        for st in self.stages:
            if not st.first:
                x = move(x, st.input_sharding)
            x = st.run(ln.key, x, ln.batch, ln.logits_idx, ln.targets if st.last else None)
            if rec is not None:
                self.activity.output(rec, st.index, x)
        return x

    def dispatch(self, launches: list[Launch], batch_id: int = -1) -> list:
        """Run the launches back to back (asynchronously); returns device results per launch."""
        work = [LaunchWork.of(ln, self.cfg.max_model_len) for ln in launches]
        self._mirror({"op": "dispatch", "launches": [w.to_message() for w in work]})
        return self.run(work, batch_id)

    def run(self, work: list[LaunchWork], batch_id: int = -1) -> list:
        """Per launch None (nothing sampled, no prompt logprobs) or (Sampled or None, pooled
        features, the offset of its tokens in the token box (None without one, when the box is
        full or nothing was sampled), the prompt logprobs or None)."""
        pending = []
        if self.token_box is not None:
            self.token_box.start_batch()
        for w in work:
            logits, feats, *plp = self.forward(w, batch_id)
            plp = plp[0] if plp else None
            if w.sampling is None:
                pending.append(None if plp is None else (None, feats, None, plp))
                continue
            key = sampler_key(w)
            penalties = w.penalties
            if penalties is not None and w.src is not None:         # a pending token joins the history
                penalties = penalties._replace(history=self.token_box.patch(penalties.history, w.src))
            sampled = self.sampler(key)(logits, w.sampling, *((penalties,) if key.penalties else ()))
            self.ran.add(key)
            pending.append((sampled, feats, self.token_box.put(sampled.tokens) if self.token_box is not None else None,
                            plp))
        return pending

    @staticmethod
    def collect(launches: list[Launch], pending: list) -> list[tuple[Request, int, TokenLogprobs | None]]:
        """Wait for the sampled tokens; one (request, token, logprobs) per sampled row. Prompt
        logprobs go straight into their requests, before any of their tokens."""
        results = []
        for ln, out in zip(launches, pending):
            if out is None:
                continue
            if out[3] is not None:
                record_prompt_logprobs(ln.spans, fetch(out[3]))
            if out[0] is None:
                continue
            host = fetch(out[0])
            for i, req in enumerate(ln.rows):
                if req is None or req.finished:      # aborted while its batch was in flight
                    continue
                tok = int(host.tokens[i])
                lp = None
                if host.logprob is not None and req.sampling.logprobs is not None:
                    k = req.sampling.logprobs
                    lp = TokenLogprobs(tok, float(host.logprob[i]),
                                       {int(t): float(v) for t, v in zip(host.top_ids[i, :k], host.top_logprobs[i, :k])},
                                       int(host.rank[i]))
                results.append((req, tok, lp))
        return results

    @staticmethod
    def features(launches: list[Launch], pending: list, wanted) -> dict[str, np.ndarray]:
        """Pooled hidden states (pipeline.pooled_features) of the rows whose request ids are
        in `wanted`, by request id; copies only the launches that hold one."""
        out = {}
        for ln, p in zip(launches, pending):
            idx = [i for i, req in enumerate(ln.rows) if req is not None and req.request_id in wanted]
            if p is not None and idx:
                host = np.asarray(jax.device_get(p[1]))
                out.update({ln.rows[i].request_id: host[i] for i in idx})
        return out

    def execute(self, scheduled: list[ScheduledRequest], kv: KVManager):
        launches = self.build_launches(scheduled, kv)
        return self.collect(launches, self.dispatch(launches))

    def replay(self, msg: dict) -> None:
        """Apply one of the leader's mirrored device operations (on a multi-host worker)."""
        if msg["op"] == "dispatch":
            self.run([LaunchWork.from_message(x) for x in msg["launches"]])
        elif msg["op"] == "run_once":
            self._run_programs([key_from_wire(w) for w in msg["keys"]])
        elif self.swaps is not None:
            self.swaps.replay(msg)
        else:
            raise ValueError(f"unknown operation {msg['op']!r} from the leader (versions differ?)")


def sampler_key(w: LaunchWork) -> SamplerKey | None:
    """The sampler variant a launch's logits go through; None for a launch that samples nothing."""
    if w.sampling is None:
        return None
    return SamplerKey(w.sampling.temperature.shape[0], w.greedy, w.logprobs, w.penalties is not None)
