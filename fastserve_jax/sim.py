"""Discrete-event simulator: the real scheduler and KV manager against a cost model.

Each simulated iteration does what LLMEngine.step does, with the cost model's step time in
place of the device:

    admit arrivals up to now -> plan = scheduler.schedule(now)
    -> preempted lose their KV, scheduled get KV (the same KVManager, sized in blocks)
    -> now += cost_model.iteration_time(plan)
    -> num_computed_tokens += n; a chunk that reaches the end of a request samples a token
    -> requests at their output length finish (remove) -> scheduler.on_iteration(plan, dt, now)

When nothing is live the clock jumps to the next arrival. Requests end exactly at their
trace output length (ignore_eos), so `max_tokens` is the true length (what srpt reads).
Prompts are `range(n)`: the simulator never reads token values.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence


from fastserve_jax.config import SamplingParams, SchedulerConfig
from fastserve_jax.cost_model import CostModel, plan_time
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request, RequestStatus
from fastserve_jax.scheduler import Limits, make_scheduler
from fastserve_jax.metrics import summarize
from fastserve_jax.workload import TraceRequest


@dataclass(frozen=True)
class SimConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_capacity_tokens: int = 0          # 0: the cost model's
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)

    def num_blocks(self, cost: CostModel) -> int:
        tokens = self.kv_capacity_tokens or cost.kv_capacity_tokens
        if tokens <= 0:
            raise ValueError(f"cost model {cost.name!r} does not say how many KV tokens the device holds; "
                             "give kv_capacity_tokens (--kv-capacity-tokens)")
        return tokens // self.block_size + 1          # + the null block


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

    def metrics(self) -> dict[str, float]:
        """Latencies in seconds, throughputs per second (see docs/scheduling.md)."""
        return dict(summarize(self.requests), iterations=self.iterations, preemptions=self.preemptions,
                    mean_batch=self.scheduled_seqs / max(1, self.iterations), sim_wall_seconds=self.wall_seconds)


def simulate(trace: Sequence[TraceRequest], policy: str, cost: CostModel, cfg: SimConfig = SimConfig()) -> SimResult:
    kv = KVManager(cfg.num_blocks(cost), cfg.block_size)
    sched = make_scheduler(policy, Limits(cfg.max_num_seqs, cfg.max_num_batched_tokens), kv,
                           cfg.scheduler_config, cost)
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival)
    reqs = []
    for i in order:
        t = trace[i]
        if kv.blocks_for_tokens(t.prompt_tokens + t.output_tokens) > kv.num_usable_blocks:
            raise ValueError(f"trace request {i} needs {t.prompt_tokens + t.output_tokens} tokens of KV but the "
                             f"pool holds {kv.num_usable_blocks * kv.block_size}; raise --kv-capacity-tokens")
        reqs.append(Request(f"r{i}", range(t.prompt_tokens), SamplingParams(max_tokens=t.output_tokens,
                                                                             ignore_eos=True), t.arrival))
    wall0 = time.perf_counter()
    now, nxt, live = 0.0, 0, 0
    iterations = preemptions = seqs = max_batch = max_tokens = max_blocks = 0
    while nxt < len(reqs) or live:
        while nxt < len(reqs) and reqs[nxt].arrival_time <= now:
            sched.add(reqs[nxt])
            nxt += 1
            live += 1
        if not live:
            now = reqs[nxt].arrival_time
            continue
        plan = sched.schedule(now)
        if not plan.scheduled:
            raise RuntimeError(f"{policy} scheduled nothing with {live} live requests at t={now:.3f}s: "
                               "the policy cannot make progress")
        for r in plan.preempted:
            kv.free(r)
            r.num_computed_tokens = 0
            r.status = RequestStatus.WAITING
            r.num_preemptions += 1
        preemptions += len(plan.preempted)
        for s in plan.scheduled:
            kv.allocate(s.request, s.num_tokens)
            s.request.status = RequestStatus.RUNNING
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        max_batch = max(max_batch, len(plan.scheduled))
        max_tokens = max(max_tokens, plan.num_tokens)
        max_blocks = max(max_blocks, kv.num_used_blocks)
        dt = plan_time(cost, plan.scheduled)
        now += dt
        for s in plan.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_tokens
            if r.num_computed_tokens == r.num_tokens:      # the chunk reached the end: a token
                r.output_token_ids.append(0)
                if r.metrics.first_token_time is None:
                    r.metrics.first_token_time = now
                if len(r.output_token_ids) >= r.sampling.max_tokens:
                    r.status = RequestStatus.FINISHED
                    r.finish_reason = "length"
                    r.metrics.finish_time = now
                    kv.free(r)
                    sched.remove(r)
                    live -= 1
        sched.on_iteration(plan, dt, now)
        iterations += 1
        seqs += len(plan.scheduled)
    kv.check_integrity()
    assert kv.num_free_blocks == kv.num_usable_blocks, "KV leaked: blocks still owned after every request finished"
    return SimResult(policy, reqs, iterations, preemptions, seqs, time.perf_counter() - wall0, max_batch, max_tokens,
                     max_blocks)
