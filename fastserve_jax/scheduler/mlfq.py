"""Multi-level feedback queues: plain MLFQ and FastServe's skip-join MLFQ.

    level 0   quantum q0 = base            [ r7  r9 ]          <- new jobs (plain MLFQ)
    level 1   quantum q1 = base * ratio    [ r3 ]
    level 2   quantum q2 = base * ratio^2  [ r1  r4  r8 ]      <- skip-join: first queue with
    ...                                                          q_i >= prefill time of the prompt
    level K-1 (no demotion below)          [ r2 ]

Each iteration the batch is filled from the top queue down, FIFO within a queue (see
batch.fill_batch for KV limits). A request that ran keeps its place in its queue; it is
demoted to the back of the next queue once the service it received in its current queue
(`Request.attained_service`: seconds of the iterations it ran in, by the policy's cost model,
Scheduler.service) exceeds that queue's quantum. A
request that has not run for `starvation_threshold` seconds, stretched by the live requests
per batch slot (base.starvation_limit), is promoted to the back of the top queue. Skip-join (beyond the paper) also learns output lengths and stops charging a
decoding request while they say it is worth more per token than a fresh one (see
skip_join.py). Pure Python; each queue is an insertion-ordered dict, so add,
remove, demote and promote are O(1) and a schedule() walks only as far as the batch fills.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Container, Iterator

from fastserve_jax.cost_model import plan_time
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, Scheduler, starvation_limit
from fastserve_jax.scheduler.batch import QueueWalk, fill_batch


class MLFQScheduler(Scheduler):
    """Plain MLFQ: every request enters the top queue."""

    name = "mlfq"

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        c = self.config
        self.quanta = [c.quantum(i) for i in range(c.num_queues)]
        self.queues: list[dict[str, Request]] = [{} for _ in self.quanta]
        self._live: dict[str, Request] = {}
        self._idle: OrderedDict[str, float] = OrderedDict()   # request id -> idle since, oldest first
        self._promoted: set[str] = set()     # moved to the top queue by promote_starving, not moved since

    def __len__(self) -> int:
        return len(self._live)

    def use_cost_model(self, cost_model, config) -> None:
        super().use_cost_model(cost_model, config)
        self.quanta = [config.quantum(i) for i in range(config.num_queues)]
        self.queues = [{} for _ in self.quanta]

    def entry_level(self, req: Request) -> int:
        return 0

    def queue_lengths(self) -> list[int]:
        return [len(q) for q in self.queues]

    # -- membership ------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        level = self.entry_level(req)
        req.queue_level = level
        req.attained_service = 0.0
        self.queues[level][req.request_id] = req
        self._live[req.request_id] = req
        self._idle[req.request_id] = req.arrival_time

    def remove(self, req: Request) -> None:
        """Out of the policy, from wherever it is: also where an exception cut its move between
        queues short (in neither: its abort raised KeyError), its add or an earlier remove (one
        queue held it and the live set did not: the next schedule took a request the engine no
        longer had), until 2026-12-07. Idempotent, so a remove that raised can run again."""
        rid = req.request_id
        for q in (self.queues[req.queue_level], *self.queues):
            if q.pop(rid, None) is not None:
                break
        self._idle.pop(rid, None)
        self._promoted.discard(rid)
        self._live.pop(rid, None)

    def promoted(self) -> Container[str]:
        return self._promoted

    def _move(self, req: Request, level: int) -> None:
        """To the back of queue `level`, its service there starting from zero."""
        self._take(req, level)
        self.queues[level][req.request_id] = req

    def _take(self, req: Request, level: int) -> None:
        """Out of its queue, bound for `level` (no longer promoted for waiting); the caller
        inserts it there."""
        self._promoted.discard(req.request_id)
        del self.queues[req.queue_level][req.request_id]
        req.queue_level = level
        req.attained_service = 0.0

    # -- the iteration ---------------------------------------------------------------------
    def best_first(self) -> Iterator[Request]:
        for q in self.queues:
            yield from q.values()

    priority_order = best_first

    def next_run_estimates(self, now: float, step_time: float,
                           only: Container[str] | None = None) -> dict[str, float]:
        """FastServe's ENST: the smaller of the time until starvation promotion and the time
        until the jobs ahead have been served down to this job's queue, over the batch size.

        A job ahead in a higher queue l < i must receive q_l + ... + q_{i-1} minus what it
        already got there before it joins queue i behind this one; a job ahead in queue i
        must use up the rest of q_i. Quanta are seconds of iteration time charged to every
        job of a batch, so max_num_seqs jobs are served at once. One walk, O(live); `only`
        (request ids) limits the estimates made, not the walk."""
        b = self.limits.max_num_seqs
        below = [0.0]                           # below[i] = q_0 + ... + q_{i-1}
        for q in self.quanta:
            below.append(below[-1] + q)
        limit = self.starvation_limit()
        idle = self._idle
        out: dict[str, float] = {}
        count = 0                               # jobs in the queues above the current one
        owed = 0.0                              # their sum of (below[l_k] + attained_k)
        for i, q in enumerate(self.queues):
            if not q:
                continue
            quantum, base = self.quanta[i], below[i]
            same = 0.0                          # the rest of q_i owed by the jobs ahead in queue i
            for rid, req in q.items():
                if only is None or rid in only:
                    t = (count * base - owed + same) / b
                    if limit > 0:               # min(t, max(0, time to promotion)), without the calls
                        w = limit - (now - idle[rid])
                        w = w if w > 0.0 else 0.0
                        if w < t:
                            t = w
                    out[rid] = t
                rest = quantum - req.attained_service
                if rest > 0.0:
                    same += rest
            count += len(q)
            for req in q.values():
                owed += base + req.attained_service
        return out

    def worst_first(self) -> Iterator[Request]:
        for q in reversed(self.queues):
            yield from reversed(q.values())

    def starvation_limit(self) -> float:
        """Seconds without running after which a request is promoted to the top queue."""
        return starvation_limit(self.config.starvation_threshold, len(self._live), self.batch_slots())

    def batch_slots(self) -> int:
        """How many requests run at once: max_num_seqs unless the policy knows memory binds."""
        return self.limits.max_num_seqs

    def promote_starving(self, now: float) -> None:
        limit = self.starvation_limit()
        if limit <= 0:
            return
        idle = self._idle
        while idle:
            rid, since = next(iter(idle.items()))
            if now - since <= limit:
                break
            req = self._live[rid]
            if req.queue_level != 0:
                self._move(req, 0)
                self._promoted.add(rid)
            idle.move_to_end(rid)
            idle[rid] = now

    def schedule(self, now: float) -> Plan:
        self.promote_starving(now)
        return fill_batch(QueueWalk(self.queues, self.kv.where), self.worst_first(), self.limits, self.kv, self.swap_on_evict,
                          self.swap_in_blocks, self.starts_on_host(), self.drops_to_start(), self.kept_from_starts(),
                          self.start_headroom(), self.host_pools(),
                          self.backfilled if self.backfills() else None, self.promoted())

    def drops_to_start(self) -> bool:
        """Whether new requests may drop lower-ranked host KV to start (batch.fill_batch)."""
        return False

    def kept_from_starts(self) -> Callable[[Request], bool] | None:
        """None, or which resident requests new ones may not evict to start (fill_batch's keep)."""
        return None

    def start_headroom(self) -> int | None:
        """None, or the blocks of growth running requests are expected to need (fill_batch)."""
        return None

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        last = len(self.quanta) - 1
        idle = self._idle
        for s in plan.scheduled:
            req = s.request
            rid = req.request_id
            if req.finished or rid not in self._live:     # finished and removed
                continue
            idle.move_to_end(rid)
            idle[rid] = now
            if not self.charge(req, s.num_tokens, duration):
                continue
            level = req.queue_level
            if level < last and req.attained_service > self.quanta[level]:
                self._move(req, level + 1)

    def service(self, plan: Plan) -> float | None:
        """The plan's launch time by the policy's cost model (cost_model.plan_time), taken
        before it runs (None without a cost model: the measured seconds). The model's time, not
        the clock's, so a quantum stays the same amount of work when the host stalls (a garbage
        collection, the HTTP server's thread holding the GIL) or the machine runs slower than
        when it was profiled, and the engine demotes a request where the simulator does:
        charged by the clock, a 1.4x slower spell doubled the iterations 20-49-token requests
        waited paused in a burst (docs/scheduling_log.md, "Service charged by the cost model")."""
        return None if self.cost_model is None else plan_time(self.cost_model, plan.scheduled)

    def charge(self, req: Request, num_tokens: int, duration: float) -> bool:
        """Charge `req` for an iteration it ran `num_tokens` in (FastServe: the iteration's
        duration); False if it was not charged, so it is not demoted either."""
        req.attained_service += duration
        return True
