"""Orca-style iteration-level FCFS: run to completion in arrival order (the paper's baseline).

Every iteration the running requests (arrival order) get their next token or prefill chunk,
then waiting requests are admitted in arrival order while the batch size, the token budget
and free KV blocks allow (a request without KV only if its whole context fits). When the
running requests outgrow the KV pool, the latest arrival loses its KV and is recomputed
later (vLLM's default), or with swapping on, its KV moves to the host pool while that has
room and comes back when it is readmitted.

Waiting requests may hold device KV too: proactive swapping uploads an evicted request's KV
ahead of its readmission. Such KV is the first to go when a running request or the head of
the queue needs blocks (latest arrival first): FCFS once evicted only running requests, so a
running request gave way to an uploaded waiting one that could not start either, and
neither ran again (two requests, a 3-block pool: tests/test_scheduler.py).
"""

from __future__ import annotations

from collections import deque

from fastserve_jax.kv_cache import ON_HOST, KVLocation
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, ScheduledRequest, Scheduler
from fastserve_jax.scheduler.batch import evict


class FCFSScheduler(Scheduler):
    name = "fcfs"

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self.running: list[Request] = []   # hold KV, arrival order
        self.waiting: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def priority_order(self):
        yield from self.running
        yield from self.waiting

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def schedule(self, now: float) -> Plan:
        plan = Plan()
        evicted: list[Request] = []
        parked: set[str] = set()                 # waiting requests whose device KV this plan evicts
        budget = self.limits.max_num_batched_tokens
        free = self.kv.num_free_blocks
        running, scheduled, blocks_needed = self.running, plan.scheduled, self.kv.blocks_needed
        max_seqs = self.limits.max_num_seqs
        i = 0
        while i < len(running) and len(scheduled) < max_seqs and budget > 0:
            req = running[i]
            if req.in_flight:                    # pipeline mode: its last token is not back yet
                i += 1
                continue
            n = min(req.num_pending_tokens, budget)
            need = blocks_needed(req, n)
            while need > free and running[-1] is not req and not running[-1].in_flight:
                victim = running.pop()
                free += evict(plan, victim, self.kv, self.swap_on_evict)
                evicted.append(victim)
            if need > free:
                free += self._evict_waiting(plan, need - free, parked)
            if need > free:                      # even alone it does not fit now: give way
                running.pop(i)
                evict(plan, req, self.kv, self.swap_on_evict)
                evicted.append(req)
                break
            scheduled.append(ScheduledRequest(req, n))
            budget -= n
            free -= need
            i += 1
        for victim in evicted:                   # latest first, so the earliest ends up in front
            self.waiting.appendleft(victim)
        if evicted or parked:                    # memory is short: admit nobody this iteration
            return plan
        while self.waiting and len(plan.scheduled) < self.limits.max_num_seqs and budget > 0:
            req = self.waiting[0]
            if self.kv.location(req) is KVLocation.SWAPPING_IN:     # its upload lands first
                break
            holds = self.kv.has_kv(req)           # a start's tokens in the prefix cache are out of the budget
            cached, shares = (self.kv.cached_prefix(req, plan.kv_released) if self.kv.caching and not holds
                              else (0, ()))
            if holds and self.kv.caching and self.kv.location(req) in ON_HOST:   # a swap-in shares too
                shares = self.kv.swap_in_shares(req, plan.kv_released)[1]
            n = min(req.num_pending_tokens, budget + cached)
            need = self.kv.blocks_needed(req, n) - len(shares)
            # Like the preemptive policies (batch.py), a request without KV starts only if its
            # whole context fits: admitting it by its first chunk let running requests evict it
            # again before its prefill was done (heavy-tailed outputs, a tenth of OPT-13B's
            # device KV, load 0.5: 3,378 recomputations of 400 requests, 3.4 s per output token).
            fit = need if holds else max(need, self.kv.blocks_for_tokens(req.num_tokens) - len(shares))
            counted = plan.count_shared(shares)
            if fit > free:
                free += self._evict_waiting(plan, fit - free, parked, head=req)
            if fit > free or req.request_id in parked:         # one just parked: next time
                if counted:
                    plan.kv_shared.difference_update(counted)
                break
            self.waiting.popleft()
            self.running.append(req)
            plan.scheduled.append(ScheduledRequest(req, n, cached))
            budget -= n - cached
            free -= fit
        return plan

    def _evict_waiting(self, plan: Plan, want: int, parked: set[str], head: Request | None = None) -> int:
        """Evict the device KV of waiting requests other than `head`, latest first, if that
        frees `want` blocks; they keep their place in the queue and join `parked`. Returns
        the blocks freed."""
        kv = self.kv
        skip = parked | {r.request_id for r in self.running}
        if head is not None:
            skip.add(head.request_id)
        ids = {rid for rid, where in kv.where.items() if where is KVLocation.DEVICE and rid not in skip}
        if not ids:                              # the common case: only running requests hold KV
            return 0
        holders = [r for r in reversed(self.waiting) if r.request_id in ids and not r.in_flight]
        if sum(len(kv.freeable_blocks(r, plan.kv_shared)) for r in holders) < want:
            return 0
        freed = 0
        for r in holders:
            if freed >= want:
                break
            freed += evict(plan, r, kv, self.swap_on_evict)
            parked.add(r.request_id)
        return freed
