"""The engine loop: schedule -> allocate and swap -> run -> sample -> append, finish, stream out.

`LLMEngine.step()` is one iteration. Preemption happens only between iterations: the
policy decides who runs each time, and a paused request keeps its KV, on the device or,
under memory pressure, in the host pool (swap_policy.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import jax

from fastserve_jax import policy_state
from fastserve_jax.admission import arrival_clock, check_bad_words, context_limit, validate_request
from fastserve_jax.config import EngineConfig, SchedulerConfig
from fastserve_jax.sampling_params import SamplingParams, sampler_seed
from fastserve_jax.cost_model import CostModel
from fastserve_jax.cost_profile import is_provisional, profile_engine
from fastserve_jax.detokenizer import IncrementalDetokenizer, decoder
from fastserve_jax.engine_vllm import VllmEngineMethods, add_request_arguments
from fastserve_jax.kv_sizing import check_prefill_scores, kv_block_bytes
from fastserve_jax.kv_plan import Copies, apply_plan
from fastserve_jax.lifecycle import finish_request, register_request
from fastserve_jax.prefix_cache import kv_manager
from fastserve_jax.request import Request, TokenLogprobs, output_of
from fastserve_jax.runner import ModelRunner
from fastserve_jax.runner.compiler import resolve_warmup
from fastserve_jax.scheduler import POLICIES, Limits, make_scheduler
from fastserve_jax.scheduler.base import Plan
from fastserve_jax.scheduler.engine_defaults import engine_policy_config
from fastserve_jax.stats import EngineStats, snapshot
from fastserve_jax.swap_copies import SwapCopies
from fastserve_jax.swap_policy import SwapPolicy
from fastserve_jax.sharding.layout import ModelLayout
from fastserve_jax.sharding.mesh import ParallelConfig


@dataclass
class _InFlight:
    """A dispatched batch whose sampled tokens are not collected yet."""

    batch: int
    plan: Plan
    launches: list
    pending: list
    started: float                   # perf_counter at the start of the step that dispatched it
    service: float | None = None     # what the policy charges for it (Scheduler.service)
    wait_first: bool = False         # async scheduling: collect it before the next plan (_advance)


class LLMEngine(VllmEngineMethods):
    """params: the model's param tree, placed by `layout` (from_pretrained loads it straight
    into place) or anywhere (it is then moved into the layout). own_params: the engine may
    free the tree's arrays once it has its own per-layer copies (from_pretrained does).
    warmup: what compiles before the engine serves ("lazy", "background" or "full", see
    runner/compiler.py; True means "full", False "lazy"). weights_id: which weights these are
    (models.loader.weights_id; from_pretrained's): what the policy learns is kept per model (policy_state.py)."""

    def __init__(self, model_cfg, params, tokenizer, cfg: EngineConfig, eos_ids: frozenset[int] = frozenset(),
                 warmup: str | bool = "lazy", progress=None, layout: ModelLayout | None = None,
                 mirror: Callable[[dict], None] | None = None, own_params: bool = False,
                 sampling_defaults: dict | None = None, weights_id: str = "") -> None:
        self.warmup_mode = resolve_warmup(warmup)     # "lazy" | "background" | "full" (runner/compiler.py)
        model_cfg.check_context(cfg.max_model_len)
        if model_cfg.sliding_window and cfg.max_model_len > model_cfg.sliding_window:
            raise ValueError(f"the model uses sliding-window attention (window {model_cfg.sliding_window}), which this "
                             f"engine does not implement; set max_model_len <= {model_cfg.sliding_window} so full "
                             "attention is exact")
        self.model_cfg, self.weights_id = model_cfg, weights_id
        self.tokenizer = tokenizer
        self.cfg = cfg.resolve(sum(x.nbytes for x in jax.tree.leaves(params)), kv_block_bytes(model_cfg, cfg),
                               (layout.devices[0].platform if layout else jax.devices()[0].platform))
        self.layout = layout or ModelLayout(model_cfg, ParallelConfig(cfg.tensor_parallel_size,
                                                                      cfg.pipeline_parallel_size))
        if self.layout.parallel != ParallelConfig(cfg.tensor_parallel_size, cfg.pipeline_parallel_size):
            raise ValueError(f"the layout ({self.layout.describe()}) does not match the config's tensor/pipeline "
                             "parallel sizes")
        check_prefill_scores(model_cfg, self.cfg, self.layout)     # before any weight is placed
        placed = self.layout.place_params(params)
        # the runner may free the stacked layer weights it splits unless the caller still holds them
        free = own_params or not any(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed)))
        params = placed     # in the devices' bytes in use; the per-layer copies to come where the stacked stay:
        pending = 0 if free else sum(x.nbytes for x in jax.tree.leaves(params.get("layers", {})))
        self.kv = kv_manager(model_cfg, self.cfg, pending, self.layout)
        num_blocks, num_host = self.kv.num_blocks, self.kv.num_host_blocks
        self.swap = SwapPolicy(self.cfg.swap_policy, self.kv, self.cfg.max_num_batched_tokens,
                               self.cfg.swap_reserve_blocks)
        self.runner = ModelRunner(params, model_cfg, self.cfg, num_blocks, self.layout, swap=self.swap.swaps,
                                  record_stages=self.cfg.record_stage_activity, free_params=free)
        del params, placed
        # Multi-host leader (fastserve_jax/multihost.py): the other processes size their pools like this
        # one, then replay every device operation it issues, in order.
        self.runner.mirror = mirror
        if mirror is not None:
            mirror({"op": "pools", "num_device_blocks": num_blocks, "num_host_blocks": num_host,
                    "async_scheduling": self.cfg.async_scheduling})
        self.stats = EngineStats()
        self._inflight: deque[_InFlight] = deque()     # oldest first; at most cfg.batches_in_flight
        self._batches = itertools.count()
        self._last_collected = 0.0
        self.copies = SwapCopies(self.runner, self.kv, self.swap, self.stats)
        self.eos_ids, self.sampling_defaults = eos_ids, dict(sampling_defaults or {})
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._decoders = {skip: decoder(tokenizer, skip) for skip in (True, False)}   # skip_special_tokens
        self._ids = itertools.count()
        self._last_scheduled: set[str] = set()      # ran in the latest iteration
        self.warmup_seconds = self.runner.warmup(self.warmup_mode, progress)
        self.cost_model: CostModel | None = None
        self.predictor = None                  # predictor.LengthPredictor under the predictive policy
        self.set_scheduler(self.cfg.scheduler, self.cfg.scheduler_config)
        self.runner.start_background_compile()

    def set_scheduler(self, name: str, config: SchedulerConfig | None = None) -> None:
        """Switch the policy (only while idle). Policies that need a cost model get the
        engine's own, profiled on first use and cached on disk, unless cfg.cost_model names one.
        What a policy learns is kept across switches and restarts (policy_state.py)."""
        if self.has_unfinished():
            raise RuntimeError("switch schedulers only while the engine is idle")
        if POLICIES.get(name) is None:
            raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(POLICIES)}")
        policy_state.save_lengths(self)
        if self.cost_model is None and POLICIES[name].needs_cost_model:   # provisional in a background warm-up
            self.cost_model = (CostModel.load(self.cfg.cost_model) if self.cfg.cost_model
                               else profile_engine(self, provisional=self.runner.shapes_pending()))
        self._scheduler_config = config
        self.scheduler = make_scheduler(name, Limits(self.cfg.max_num_seqs, self.cfg.max_num_batched_tokens),
                                        self.kv, self.policy_config(), self.cost_model)
        policy_state.attach(self, name)

    def policy_config(self) -> SchedulerConfig:
        """set_scheduler's config, else the defaults fitted to this engine's cost model
        (scheduler/engine_defaults.py: one decode step as the base quantum, starvation limits
        scaled to its full-batch decode time)."""
        return self._scheduler_config or engine_policy_config(
            self.cost_model, self.cfg.max_num_seqs, self.cfg.starvation_threshold,
            protect_decodes=self.cfg.protect_decodes, tail_slowdown=self.cfg.tail_slowdown,
            prompt_neighbors=self.cfg.prompt_neighbors)

    @property
    def profile_provisional(self) -> bool:          # see cost_profile.refine_profile
        return is_provisional(self.cost_model)

    @classmethod
    def from_pretrained(cls, model_path: str, cfg: EngineConfig, model_cfg=None, generation_config: str = "auto",
                        tokenizer: str | None = None, **kwargs) -> "LLMEngine":
        """Load a Hugging Face model directory (`model_cfg`: its ModelConfig, when read already;
        `tokenizer`: another directory to load the tokenizer from)."""
        from fastserve_jax.models.config import ModelConfig
        from fastserve_jax.models.generation_config import sampling_defaults
        from fastserve_jax.models.loader import load_model, weights_id
        from fastserve_jax.models.tokenizer import eos_ids, load_tokenizer

        model_cfg = model_cfg or ModelConfig.from_pretrained(model_path)
        layout = ModelLayout(model_cfg, ParallelConfig(cfg.tensor_parallel_size, cfg.pipeline_parallel_size))
        cfg = cfg.for_platform(layout.devices[0].platform)           # dtype "auto" resolved before loading
        tokenizer = load_tokenizer(tokenizer or model_path)          # a broken one fails before the weights load
        defaults = sampling_defaults(model_path, generation_config)   # and so does a bad generation_config.json
        eos = eos_ids(model_path, model_cfg, tokenizer, generation_config)                # (its eos_token_id too)
        # Across processes the converted-params cache is off: orbax would need a shared filesystem.
        _, _, params = load_model(model_path, dtype=cfg.dtype, place=layout.abstract_params,
                                  cache_dir="" if jax.process_count() > 1 else None, cfg=model_cfg)
        return cls(model_cfg, params, tokenizer, cfg, eos, layout=layout,
                   own_params=True, sampling_defaults=defaults, weights_id=weights_id(model_path), **kwargs)

    # -- admission (the boundary: validate everything before anything is queued) -----------
    def validate(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and check one prompt; raises ValueError saying what to change (admission.py)."""
        return validate_request(prompt, params, self.tokenizer, self.model_cfg.vocab_size, self.cfg.max_model_len,
                                self.kv, self.eos_ids)

    @property
    def context_limit(self) -> int:
        """Tokens one request can hold: max_model_len, or the device pool where smaller (admission.py)."""
        return context_limit(self.cfg.max_model_len, self.kv)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time: float | None = None, lora_request=None, priority: int = 0) -> Request:
        prompt, params, request_id = add_request_arguments(prompt, params, request_id, lora_request, priority)
        text, ids = self.validate(prompt, params)
        arrival = arrival_clock(arrival_time)
        rest = self.context_limit - len(ids)    # vLLM's: the rest of the context, or up to it (the pool's end)
        if params.max_tokens is None or params.max_tokens > rest:   # min_tokens past it too (it was an error)
            params = dataclasses.replace(params, max_tokens=rest, min_tokens=min(params.min_tokens, rest))
        n = next(self._ids)
        rid = request_id if request_id is not None else f"req-{n}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already live; ids must be unique")
        seed = sampler_seed(params.seed) if params.seed is not None else hash((self.cfg.seed, n)) & 0xFFFFFFFF
        req = Request(rid, ids, params, arrival, prompt=text,
                      seed=seed, eos_token_ids=frozenset() if params.ignore_eos else self.eos_ids,
                      bad_words=check_bad_words(params, self.tokenizer, self.model_cfg.vocab_size, self.eos_ids))
        register_request(self, req, IncrementalDetokenizer.for_request(self.tokenizer, ids, params, self._decoders))
        return req

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, "abort", time.monotonic())
        while self._inflight and not self._requests:   # idle now: collect what is in flight (a server steps only
            self._complete(self._inflight.popleft())   # for live requests; the next one's step counted the gap busy)

    def close(self) -> None:
        """Save what the engine learned (policy_state.py); it may still serve."""
        policy_state.save(self)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def live_request_ids(self) -> list[str]:
        return list(self._requests)

    def snapshot(self) -> dict:
        """Gauges and counters for monitoring (stats.snapshot; serve/ exports them to Prometheus)."""
        return {**snapshot(self.stats, self._requests, self._last_scheduled, self.kv, self.scheduler),
                **(self.predictor.metrics() if self.predictor is not None else {})}

    # -- one iteration ---------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one iteration; returns the requests that got a token (finished ones included).

        Callers turn them into outputs with `output_of` only when they need to. Order of device
        work (kv_plan.py): last iteration's uploads land, this plan's swap-outs and on-demand
        swap-ins, the step, then the swap policy's moves for later iterations, which overlap
        the step. With cfg.batches_in_flight = k > 1 (pipeline mode), an iteration dispatches a
        batch of requests that are not in flight and collects the oldest batch only once k are
        in flight (or nothing more can be dispatched), so each pipeline stage holds a different
        batch; requests in flight are neither scheduled again nor evicted until collected.

        With cfg.async_scheduling (k = 2, one stage) the batch in flight is the previous
        iteration's, and its requests may run again in this one (`_advance`): the host plans,
        assembles and dispatches batch N+1 while the device runs batch N, then reads N's tokens
        while N+1 runs. A request that N ends (EOS, a stop string) wastes its row in N+1."""
        st, started, now = self.stats, time.perf_counter(), time.monotonic()
        plan = Plan()
        got: list[Request] = []
        if self._inflight and self._inflight[-1].wait_first:
            got = self._complete(self._inflight.popleft())
        if len(self._inflight) < self.cfg.batches_in_flight:
            with st.phase("schedule"):
                plan, copies = self._schedule(now)
                service = self.scheduler.service(plan)        # before _advance moves its requests on
            with st.phase("assemble"):
                launches = self.runner.build_launches(plan.scheduled, self.kv)
            with st.phase("device"):
                pending, batch, wait_first = self._dispatch(plan, copies, launches)
            with st.phase("schedule"):
                self.copies.ahead(plan, self._requests, self.scheduler, now)
            if plan.scheduled:
                self._inflight.append(_InFlight(batch, plan, launches, pending, started, service, wait_first))
        if self._inflight and (len(self._inflight) >= self.cfg.batches_in_flight or not plan.scheduled):
            got += self._complete(self._inflight.popleft())
        while self._inflight and not self._requests:      # only finished requests' rows are left
            self._complete(self._inflight.popleft())
        if self.cfg.async_scheduling and plan.scheduled:       # the latest batch: the one on the device now
            self._last_scheduled = {s.request.request_id for s in plan.scheduled}
        else:
            self._last_scheduled = {s.request.request_id for f in self._inflight for s in f.plan.scheduled} | \
                {r.request_id for r in got}
        self.copies.count()
        st.iterations += 1
        return got

    def _schedule(self, now: float) -> tuple[Plan, Copies]:
        """Land finished uploads, ask the policy for a plan and apply it to the KV ledger;
        returns the plan and the swap copies it needs before its step."""
        self.copies.land()
        self.swap.configure(self.scheduler)
        plan = self.scheduler.schedule(now)
        if not plan.scheduled and self.copies.uploading:     # only requests still uploading could run
            self.copies.land(wait=True)
            plan = self.scheduler.schedule(now)
        self.stats.count_drops(plan.preempted, self.kv)
        copies = apply_plan(plan, self.kv, now)
        for req in plan.preempted:
            self.copies.forget(req)
        return plan, copies

    def _dispatch(self, plan: Plan, copies: Copies, launches: list) -> tuple[list, int, bool]:
        """The plan's on-demand swaps, then its launches (asynchronously); returns the device
        results, the batch's number and whether its tokens are needed before the next plan."""
        self.copies.on_demand(copies)
        batch = next(self._batches)
        pending = self.runner.dispatch(launches, batch)
        if self.cfg.async_scheduling:
            return pending, batch, self._advance(plan, launches, pending, batch)
        for s in plan.scheduled:
            s.request.in_flight = True
        return pending, batch, False

    def _advance(self, plan: Plan, launches: list, pending: list, batch: int) -> bool:
        """Async scheduling: the dispatched batch's progress, counted before its tokens are
        back, so the next plan can run its requests again. A sampled row's token waits in the
        runner's token box (`Request.token_slot`, read by the next decode launch); a request
        whose token ends it for sure (max_tokens, max_model_len) stays in flight. Returns True
        when some request's next step needs its token on the host (the box was full, or a bad
        word may match through it: launch.bad_word_bans): the engine then collects this batch
        before the next plan, an iteration without overlap rather than a request that runs every other one."""
        wait_first = False
        for s in plan.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_tokens
            req.flight_batch = batch
            req.in_flight = False                  # the next prefill chunk's tokens are on the host
        for ln, out in zip(launches, pending):
            for i, req in enumerate(ln.rows if out is not None else ()):
                if req is None:
                    continue
                req.pending_tokens += 1
                sp = req.sampling
                last = (len(req.output_token_ids) + req.pending_tokens >= sp.max_tokens
                        or req.num_tokens >= self.cfg.max_model_len)
                if out[2] is None or last or (req.bad_words is not None and     # a bad word may match through it
                                              req.bad_words.needs_history(req.output_token_ids, req.pending_tokens)):
                    req.token_slot, req.in_flight = -1, True
                    wait_first |= not last
                else:
                    req.token_slot = out[2] + i
        return wait_first

    def _complete(self, f: _InFlight) -> list[Request]:
        """Collect a batch's tokens and account for it."""
        st = self.stats
        with st.phase("device"):
            sampled = self.runner.collect(f.launches, f.pending)
            if self.runner.activity is not None:
                self.runner.activity.collect(f.batch)
        with st.phase("postprocess"):
            now = time.monotonic()
            if self.predictor is not None:          # prefills that just ended (and refresh points)
                due = {req.request_id: req for req, _, _ in sampled if self.predictor.wants(req)}
                if due:
                    self.predictor.on_features(list(due.values()), lambda: self.runner.features(f.launches, f.pending, due))
            for s in f.plan.scheduled:
                req = s.request
                if not self.cfg.async_scheduling:
                    req.in_flight = False
                    req.num_computed_tokens += s.num_tokens        # async: counted at dispatch
                elif req.flight_batch == f.batch:
                    req.in_flight = False
                if s.num_tokens == 1 and not req.is_prefilling:
                    st.decode_tokens += 1
                else:
                    st.prefill_tokens += s.num_tokens
            for req, tok, lp in sampled:
                if self.cfg.async_scheduling:
                    req.pending_tokens -= 1                # now a known output token
                self._append(req, tok, lp, now)
            for ln in f.launches:
                st.launches[ln.key] = st.launches.get(ln.key, 0) + 1
        with st.phase("schedule"):
            # The batch's time: from its step's start, or (pipelined) from the previous
            # collection, whichever is later, so overlapping batches are not counted twice; the
            # policy is charged its modeled time where it has a cost model (Scheduler.service).
            t = time.perf_counter()
            duration = t - max(f.started, self._last_collected)
            self._last_collected = t
            self.scheduler.on_iteration(f.plan, duration if f.service is None else f.service, time.monotonic())
            self.swap.on_iteration(duration)
            st.busy += duration
        return [req for req, _, _ in sampled]

    def _append(self, req: Request, token: int, lp: TokenLogprobs | None, now: float) -> None:
        req.output_token_ids.append(token)
        self.stats.generated_tokens += 1
        if req.logprobs is not None and lp is not None:
            req.logprobs.append(lp)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self.stats.prompt_tokens += req.num_prompt_tokens     # its prefill is done (vLLM's count)
        sp = req.sampling
        reason, stop_token = None, token in req.eos_token_ids or token in sp.stop_token_ids
        # a stop token's text is written only with include_stop_str_in_output (detokenizer.py)
        req.output_text, hit = self._detok[req.request_id].push(
            token, req.output_text, len(req.output_token_ids) > sp.min_tokens, stop_token)
        if stop_token or hit:
            reason = "stop"
        elif len(req.output_token_ids) >= sp.max_tokens or req.num_known_tokens >= self.cfg.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(req, reason, now)

    def _finish(self, req: Request, reason: str, now: float) -> None:
        finish_request(self, req, reason, now)

    output_of = staticmethod(output_of)
