"""Index policies over output lengths learned online: the part gittins and predictive share.

Both learn the output-length distribution from finished requests: a sliding window of the
last `gittins_window` lengths per prompt-length bucket and one pooled over all (see
SchedulerConfig.gittins_*), relearned every `gittins_refresh` finishes. Until `ready()`
(at least `gittins_min_samples` finished, and whatever a subclass adds) the policy is
skip-join MLFQ; then the live requests move over to the index, keeping their KV.
"""

from __future__ import annotations

import bisect
from abc import abstractmethod
from collections import deque
from typing import Iterator

from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan
from fastserve_jax.scheduler.index_policy import IndexPolicy
from fastserve_jax.scheduler.mlfq import SkipJoinMLFQScheduler
from fastserve_jax.scheduler.service import ServiceMeter


class LearnedLengthPolicy(IndexPolicy):
    needs_cost_model = True

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        c = self.config
        self.meter = ServiceMeter(self._require_cost_model(), limits.max_num_seqs)
        self.warmup: SkipJoinMLFQScheduler | None = SkipJoinMLFQScheduler(limits, kv, c, cost_model)
        self.edges = c.gittins_bucket_edges
        self.history = [deque(maxlen=c.gittins_window) for _ in range(len(self.edges) + 1)]
        self.pooled: deque[int] = deque(maxlen=c.gittins_window)
        self._new_finishes = 0

    def bucket(self, req: Request) -> int:
        return bisect.bisect_right(self.edges, req.num_prompt_tokens)

    # -- learning --------------------------------------------------------------------------
    def observe(self, req: Request) -> None:
        n = len(req.output_token_ids)
        if n < 1 or req.finish_reason == "abort":
            return
        self.history[self.bucket(req)].append(n)
        self.pooled.append(n)
        self._new_finishes += 1

    def ready(self) -> bool:
        """Enough learned to leave skip-join MLFQ."""
        return len(self.pooled) >= self.config.gittins_min_samples

    @abstractmethod
    def learn(self) -> None:
        """Rebuild what key() reads from the history."""

    def relearn(self) -> None:
        self.learn()
        self._new_finishes = 0
        if self.warmup is not None:               # switch over: live requests keep their KV
            for req in list(self.warmup.best_first()):
                self.warmup.remove(req)
                IndexPolicy.add(self, req)
            self.warmup = None
        else:
            self.rekey_all()

    # -- the Scheduler interface -----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._live) + (len(self.warmup) if self.warmup is not None else 0)

    def add(self, req: Request) -> None:
        if self.warmup is not None:
            self.warmup.add(req)
        else:
            super().add(req)

    def remove(self, req: Request) -> None:
        if req.finished:
            self.observe(req)
        if self.warmup is not None:
            self.warmup.remove(req)
        else:
            super().remove(req)

    def schedule(self, now: float) -> Plan:
        if self.ready() and (self.warmup is not None or self._new_finishes >= self.config.gittins_refresh):
            self.relearn()
        if self.warmup is not None:
            self.warmup.swap_on_evict, self.warmup.swap_in_blocks = self.swap_on_evict, self.swap_in_blocks
            return self.warmup.schedule(now)
        return self.schedule_ranked(now)

    def schedule_ranked(self, now: float) -> Plan:
        """The plan once learned: the batch filled in index order."""
        return super().schedule(now)

    def priority_order(self) -> Iterator[Request]:
        return self.warmup.priority_order() if self.warmup is not None else super().priority_order()

    def next_run_estimates(self, now: float, step_time: float) -> dict[str, float]:
        if self.warmup is not None:
            return self.warmup.next_run_estimates(now, step_time)
        return super().next_run_estimates(now, step_time)

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        if self.warmup is not None:
            self.warmup.on_iteration(plan, duration, now)
        else:
            super().on_iteration(plan, duration, now)
