"""Discrete-event simulator: the real scheduler, KV manager and swap policy against a cost model.

Each simulated iteration does what LLMEngine.step does, with the cost model's step time in
place of the device and its transfer-time model (bytes over bandwidth) in place of copies:

    admit arrivals up to now -> uploads whose copy is in land (the rest stay in flight)
    -> swap_policy.configure (the swap-in budget) -> plan = scheduler.schedule(now) (if only
       requests still uploading could run: wait for the first upload, counted as stall)
    -> kv_plan.apply_plan (drops, swap-outs, on-demand swap-ins: the step waits for those,
       charged to the stall credit) -> the swap policy's moves ahead, issued with the step
    -> now += cost_model.iteration_time(plan) + swap_issue_seconds per copy issued (+ the
       host time of the policy's own calls with SimConfig.host_time_scale; with
       SimConfig.async_scheduling the host work runs beside the launch dispatched before, as
       in LLMEngine.step: see read_later)
    -> num_computed_tokens += n; a chunk that reaches the end of a request samples a token
       (with async scheduling, first tokens and finishes are stamped when the engine would
       read them, during the next iteration: read_later)
    -> requests at their output length finish (remove) -> scheduler.on_iteration(plan,
       scheduler.service(plan) (taken before the plan ran), or dt where the policy takes none, now)

Each copy direction is one link: a copy starts when the link is free and takes
cost.swap_time(tokens). Swap-outs never stall the step (the device reads the blocks before
reusing them); a swap-in the step needs stalls it until the copy is in.
When nothing is live the clock jumps to the next arrival. Requests end exactly at their
trace output length (ignore_eos), so `max_tokens` is the true length (what srpt reads).
Prompts are `range(n)`: the simulator never reads token values.

Predicted output lengths (SimConfig.prediction_sigma or prediction_tau; sim_prediction.py):
when a request's prefill completes (its first token), it gets a prediction of the chosen
quality (with prediction_at="arrival", already when it arrives: a predictor that reads only
the prompt, as vLLM-LTR's; the engine's reads the prefill's hidden states), set before
scheduler.on_iteration as the engine does (scheduler/base.py); the predictor's prior
learns from the requests finished so far. The metrics carry the run's realised Kendall's
tau between the predictor's estimates and the true lengths (the posterior means under one
prior rank alike; under the moving prior, their tau drifts with when each prediction was
made: 0.45 for useless predictions in a 3x chat burst), and the calibration of each
request's latest prediction.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fastserve_jax.config import SamplingParams
from fastserve_jax.cost_model import CostModel, plan_time
from fastserve_jax.kv_cache import NULL_BLOCK, KVLocation, KVManager
from fastserve_jax.kv_plan import apply_ahead, apply_plan
from fastserve_jax.prefix_cache import PrefixCachingKVManager
from fastserve_jax.length_prediction import LengthPrediction, calibration, kendall_tau
from fastserve_jax.request import Request, RequestStatus
from fastserve_jax.swap_policy import SwapPolicy
from fastserve_jax.scheduler import Limits, Plan, make_scheduler
from fastserve_jax.sim_config import SimConfig
from fastserve_jax.slo import summarize
from fastserve_jax.workload import TraceRequest

@dataclass
class SimResult:
    policy: str
    requests: list[Request]
    iterations: int
    preemptions: int
    scheduled_seqs: int
    wall_seconds: float
    max_batch: int = 0                   # most requests in one iteration
    max_tokens: int = 0                  # most tokens in one iteration
    max_kv_blocks: int = 0               # most KV blocks in use at once
    swap: SwapCounts = field(default_factory=lambda: SwapCounts())
    # (latest prediction, true length, log of the predictor's point estimate) per predicted request
    predictions: list[tuple[LengthPrediction, int, float]] = field(default_factory=list)
    prediction_sigma: float | None = None
    policy_host_seconds: float = 0.0     # wall clock in the policy's calls (SimConfig.host_time_scale)
    launch_seconds: float = 0.0          # simulated time in the cost model's launches alone
    prefix_cache: tuple[int, int] | None = None    # with caching: tokens looked up, tokens found

    def metrics(self) -> dict[str, float]:
        """Latencies in seconds, throughputs per second (see docs/scheduling.md)."""
        m = dict(summarize(self.requests), iterations=self.iterations, preemptions=self.preemptions,
                 mean_batch=self.scheduled_seqs / max(1, self.iterations), sim_wall_seconds=self.wall_seconds,
                 policy_host_seconds=self.policy_host_seconds, launch_seconds=self.launch_seconds,
                 **{f"swap_{k}": v for k, v in dataclasses.asdict(self.swap).items()},
                 swap_stall_fraction=self.swap.stall_seconds / self.swap.busy_seconds if self.swap.busy_seconds else 0.0)
        if self.prefix_cache is not None:
            queries, hits = self.prefix_cache
            m.update(prefix_cache_hit_rate=hits / queries if queries else 0.0,
                     prefix_cached_tokens=sum(r.num_cached_tokens for r in self.requests))
        if self.prediction_sigma is not None:
            preds, true, est = zip(*self.predictions) if self.predictions else ((), (), ())
            cal = calibration(preds, true)
            m.update(prediction_sigma=self.prediction_sigma, prediction_kendall_tau=kendall_tau(est, true),
                     prediction_true_bin_prob=cal["true_bin_prob"], prediction_coverage_80=cal["coverage_80"])
        return m


def advance(plan: Plan, now: float, stamped: list[Request] | None = None) -> list[Request]:
    """The plan ran, ending at `now`: num_computed_tokens += n, a chunk that reaches the end
    of its request samples a token (token id 0: nothing reads it), and requests at their
    max_tokens finish with "length". Returns the finished ones; the caller frees their KV and
    removes them from the policy. `stamped`: a list that gets the requests whose first token
    or finish this stamped (for read_later)."""
    done = []
    for s in plan.scheduled:
        r = s.request
        r.num_computed_tokens += s.num_tokens
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(0)
            first = r.metrics.first_token_time is None
            if first:
                r.metrics.first_token_time = now
            if len(r.output_token_ids) >= r.sampling.max_tokens:
                r.status, r.finish_reason = RequestStatus.FINISHED, "length"
                r.metrics.finish_time = now
                done.append(r)
            elif first and stamped is not None:
                stamped.append(r)
    if stamped is not None:
        stamped += done
    return done


def read_later(stamped: list[Request], t: float) -> None:
    """Async scheduling: the engine reads batch N's tokens in the next step, once it has planned
    and dispatched batch N + 1 and N's launch is done (LLMEngine.step), so the first tokens and
    finishes that iteration N stamped at its end (`stamped`: those requests) are seen at `t`:
    in iteration N + 1, after its host work before the dispatch (p: the policy's calls, the
    swap copies it issues, iteration_overhead) or when launch N ends, whichever is later; the
    last iteration's updates (q) follow the read. The step that starts a busy period has no
    batch to read: it dispatches and returns, so its launch runs beside the next step's host
    work. The last batch of a busy period is read when its launch ends. With the launch the
    longer, a request planned in a busy period's first step has its first token one launch
    after it is dispatched, one planned later about two launches after it is planned, as in
    the engine, against one in the synchronous loop."""
    for r in stamped:
        m = r.metrics
        if len(r.output_token_ids) == 1:
            m.first_token_time = t
        if m.finish_time is not None:
            m.finish_time = t


@dataclass
class SwapCounts:
    blocks_out: int = 0
    blocks_in: int = 0
    ins_on_demand: int = 0
    ins_ahead: int = 0
    stall_seconds: float = 0.0           # simulated time the steps waited for swap-ins
    recomputed_tokens: int = 0           # computed tokens dropped, to be prefilled again
    busy_seconds: float = 0.0            # simulated time spent in steps (stalls included)
    copies_issued: int = 0               # swap copies (one per request and direction) issued


class _Links:
    """One link per copy direction; returns when each copy is in."""

    def __init__(self, cost: CostModel, block_size: int) -> None:
        self.cost, self.bs = cost, block_size
        self.out_free = self.in_free = 0.0

    def out(self, now: float, blocks: int) -> float:
        self.out_free = max(now, self.out_free) + self.cost.swap_time(blocks * self.bs)
        return self.out_free

    def into(self, now: float, blocks: int, after: float = 0.0) -> float:
        if not blocks:          # all of it found on the device (prefix caching): nothing crosses
            return now
        self.in_free = max(now, self.in_free, after) + self.cost.swap_time(blocks * self.bs)
        return self.in_free


def simulate(trace: Sequence[TraceRequest], policy: str, cost: CostModel, cfg: SimConfig = SimConfig()) -> SimResult:
    kv = (PrefixCachingKVManager if cfg.enable_prefix_caching else KVManager)(
        cfg.num_blocks(cost), cfg.block_size, cfg.num_host_blocks() if cfg.swap_policy != "recompute" else 0)
    sched = make_scheduler(policy, Limits(cfg.max_num_seqs, cfg.max_num_batched_tokens), kv,
                           cfg.scheduler_config, cfg.policy_cost or cost)
    if cfg.prior_lengths and hasattr(sched, "restore_lengths"):
        buckets = len(cfg.scheduler_config.gittins_bucket_edges) + 1      # the prompts are not saved
        prior = list(cfg.prior_lengths)
        sched.restore_lengths({"edges": list(cfg.scheduler_config.gittins_bucket_edges), "pooled": prior,
                               "history": [prior] if buckets == 1 else [[] for _ in range(buckets)]})
    swap = SwapPolicy(cfg.swap_policy, kv, cfg.max_num_batched_tokens, cfg.swap_reserve_blocks,
                      cost.swap_time(cfg.block_size) if cfg.swap_policy != "recompute" and kv.num_host_blocks else 0.0)
    links = _Links(cost, cfg.block_size)
    oracle = cfg.oracle(trace)
    noise = dict(zip((f"r{i}" for i in range(len(trace))),
                     np.random.default_rng(cfg.prediction_seed).standard_normal(len(trace)).tolist()))
    predicted: dict[str, tuple[int, LengthPrediction, int]] = {}    # id -> (oracle version, latest, true length)
    counts = SwapCounts()
    live_reqs: dict[str, Request] = {}
    out_ready: dict[str, float] = {}                   # request id -> when its swap-out copy is in
    fills: dict[str, tuple[float, int]] = {}           # request id -> when a fill is in, blocks it fills

    def copy_out(c) -> None:
        """Model a swap-out copy. A fill (prefix_cache.py's pins: their blocks, then NULL_BLOCK)
        only delays a swap-in that copies some of those blocks back (not found on the device)."""
        rid, ready = c.request.request_id, links.out(now, c.num_blocks)
        if c.fill:
            fills[rid] = (ready, c.num_blocks)
        else:
            out_ready[rid] = ready
        counts.blocks_out += c.num_blocks

    def copied_out(c) -> float:
        """When the host copy a swap-in reads is in."""
        ready, fill = out_ready.pop(c.request.request_id, 0.0), fills.pop(c.request.request_id, None)
        if fill is not None and any(b != NULL_BLOCK for b in c.device_blocks[:fill[1]]):
            ready = max(ready, fill[0])
        return ready
    uploading: list[tuple[Request, float]] = []        # (request, when its upload is in)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    reqs = []
    for i in order:
        t = trace[i]
        if kv.blocks_for_tokens(t.prompt_tokens + t.output_tokens) > kv.num_usable_blocks:
            raise ValueError(f"trace request {i} needs {t.prompt_tokens + t.output_tokens} tokens of KV but the "
                             f"pool holds {kv.num_usable_blocks * kv.block_size}; raise --kv-capacity-tokens")
        reqs.append(Request(f"r{i}", cfg.prompt_ids(i, t), SamplingParams(max_tokens=t.output_tokens,
                                                                             ignore_eos=True), t.arrival))

    def land(ups: list[tuple[Request, float]], t: float) -> list[tuple[Request, float]]:
        """Uploads whose copy is in by `t` land; the rest stay in flight (not schedulable)."""
        for r, ready in ups:
            if ready <= t and kv.location(r) is KVLocation.SWAPPING_IN:
                kv.finish_swap_in(r)
        return [(r, ready) for r, ready in ups if ready > t and kv.location(r) is KVLocation.SWAPPING_IN]

    at_arrival = oracle is not None and cfg.prediction_at == "arrival"
    clock = time.perf_counter
    wall0 = clock()
    now, nxt, live, policy_host, launches = 0.0, 0, 0, 0.0, 0.0
    carried = 0.0                                      # async: the last iteration's updates, after the next read
    launch_end: float | None = None                    # async: when the batch not yet read ends its launch
    stamped: list[Request] | None = []                 # async: first tokens and finishes of the last iteration
    iterations = preemptions = seqs = max_batch = max_tokens = max_blocks = 0
    while nxt < len(reqs) or live:
        while nxt < len(reqs) and reqs[nxt].arrival_time <= now:
            if at_arrival:
                r = reqs[nxt]
                r.length_prediction = oracle.predict(r.sampling.max_tokens, noise[r.request_id], 0)
                predicted[r.request_id] = (oracle.version, r.length_prediction, r.sampling.max_tokens)
            sched.add(reqs[nxt])
            swap.on_arrival(reqs[nxt], reqs[nxt].arrival_time)
            live_reqs[reqs[nxt].request_id] = reqs[nxt]
            nxt += 1
            live += 1
        if not live:
            if launch_end is not None:                 # async: the engine's next step reads the last batch
                read_later(stamped, launch_end)
                counts.busy_seconds += max(0.0, launch_end - now)
                now, launch_end, carried, stamped = max(now, launch_end), None, 0.0, []
                continue                               # arrivals while it waited are planned next
            now, carried, stamped = reqs[nxt].arrival_time, 0.0, []    # the last updates ran while nothing was live
            continue
        t_start = now
        uploading = land(uploading, now)
        for rid, ready in list(out_ready.items()):
            if ready <= now:
                kv.finish_swap_out(live_reqs[rid])
                del out_ready[rid]
        if iterations >= cfg.max_iterations:
            raise RuntimeError(f"{policy} ran {iterations} iterations with {live} requests still live at "
                               f"t={now:.1f}s: the plan rotates without finishing (raise max_iterations if the "
                               "trace is that long)")
        h0 = clock()
        swap.configure(sched)
        plan = sched.schedule(now)
        host = clock() - h0
        if not plan.scheduled and uploading:           # only requests still uploading could run: wait
            ready = min(t for _, t in uploading)
            counts.stall_seconds += ready - now
            now = ready
            uploading = land(uploading, now)
            h0 = clock()
            plan = sched.schedule(now)
            host += clock() - h0
        if not plan.scheduled:
            raise RuntimeError(f"{policy} scheduled nothing with {live} live requests at t={now:.3f}s: "
                               "the policy cannot make progress")
        preemptions += len(plan.preempted)
        counts.recomputed_tokens += sum(r.num_computed_tokens for r in plan.preempted)
        h0 = clock()
        copies = apply_plan(plan, kv, now)
        host += clock() - h0
        for c in copies.swap_out:
            copy_out(c)
        for c in copies.swap_in:                       # the step waits for these
            ready = links.into(now, c.num_blocks, copied_out(c))
            counts.stall_seconds += ready - now
            counts.blocks_in += c.num_blocks
            counts.ins_on_demand += 1
            swap.charge(ready - now)
            now = ready
        max_batch = max(max_batch, len(plan.scheduled))
        max_tokens = max(max_tokens, plan.num_tokens)
        max_blocks = max(max_blocks, kv.num_used_blocks)
        h0 = clock()
        ahead = swap.plan_ahead(plan, live_reqs, sched, now)
        moves = apply_ahead(ahead, kv)                 # empty when nothing is planned
        host_ahead = clock() - h0
        host += host_ahead
        for c in moves.swap_out:
            copy_out(c)
        for c in moves.swap_in:
            uploading.append((c.request, links.into(now, c.num_blocks, copied_out(c))))
            counts.blocks_in += c.num_blocks
            counts.ins_ahead += 1
        issued = len(copies.swap_out) + len(copies.swap_in) + len(moves.swap_out) + len(moves.swap_in)
        counts.copies_issued += issued
        dt = plan_time(cost, plan.scheduled)
        # what the policy is charged, as the engine charges it: Scheduler.service, taken before
        # the plan advances (with the policy on the clock's own model that is dt so far), or,
        # where the policy takes none, the whole iteration, as the engine's measured one
        service = dt if cfg.policy_cost is None else sched.service(plan)
        launch = dt - cost.iteration_overhead
        launches += launch
        host_seconds = issued * cost.swap_issue_seconds + cfg.host_time_scale * host     # 0.0 exactly by default
        if cfg.async_scheduling:
            # LLMEngine.step: host work, the dispatch, the swap policy's moves (post), the read of
            # the last batch once its launch is done, then its updates (carried); the device runs
            # the launches in order. The shorter side's unhidden share (async_overlap) slows the longer.
            post = len(moves.swap_out + moves.swap_in) * cost.swap_issue_seconds + cfg.host_time_scale * host_ahead
            beside = cost.iteration_overhead + host_seconds + carried
            shared = (1.0 - cfg.async_overlap) * min(launch, beside)
            dispatch = now + cost.iteration_overhead + host_seconds - post
            done = dispatch + post + (shared if beside > launch else 0.0)    # the host work before the read
            if launch_end is None:                     # a busy period's first step: nothing to read
                dt = done - now
            else:
                read_later(stamped, max(done, launch_end))
                dt = max(done, launch_end) + carried - now
            launch_end = max(dispatch, launch_end or 0.0) + launch + (0.0 if beside > launch else shared)
        else:
            dt += host_seconds
        now += dt
        stamped = [] if cfg.async_scheduling else None
        for r in advance(plan, now, stamped):
            kv.free(r)
            sched.remove(r)
            out_ready.pop(r.request_id, None)
            fills.pop(r.request_id, None)
            del live_reqs[r.request_id]
            live -= 1
            if oracle is not None:
                oracle.observe(len(r.output_token_ids))
        if oracle is not None:           # first tokens, or the prior relearned: predict, before on_iteration
            for s in plan.scheduled:
                r = s.request
                if r.output_token_ids and predicted.get(r.request_id, (-1,))[0] != oracle.version:
                    r.length_prediction = oracle.predict(r.sampling.max_tokens, noise[r.request_id],
                                                         len(r.output_token_ids))
                    predicted[r.request_id] = (oracle.version, r.length_prediction, r.sampling.max_tokens)
        h0 = clock()
        sched.on_iteration(plan, dt if service is None else service, now)
        swap.on_iteration(now - t_start)
        after = clock() - h0
        policy_host += host + after
        if cfg.async_scheduling:
            carried = cfg.host_time_scale * after
        else:
            now += cfg.host_time_scale * after
        counts.busy_seconds += now - t_start
        iterations += 1
        seqs += len(plan.scheduled)
    if launch_end is not None:                         # async: the last batch, read when its launch ends
        counts.busy_seconds += max(0.0, launch_end - now)
        read_later(stamped, launch_end)
    kv.check_integrity()
    assert kv.num_free_blocks == kv.num_usable_blocks and kv.num_host_used_blocks == 0, \
        "KV leaked: blocks still owned after every request finished"
    return SimResult(policy, reqs, iterations, preemptions, seqs, time.perf_counter() - wall0, max_batch, max_tokens,
                     max_blocks, counts,
                     [(p, n, oracle.log_estimate(n, noise[rid])) for rid, (_, p, n) in predicted.items()],
                     oracle.sigma if oracle is not None else None, policy_host, launches,
                     (kv.queries, kv.hits) if kv.caching else None)
