"""The seam between the engine and scheduling policies. Pure Python; never imports jax.

Each iteration the engine asks the policy for a `Plan`: which requests run and with how
many tokens each (a prefill chunk, or 1 for decode), and which lose their KV to be
recomputed later. The policy sees the KV manager read-only (`blocks_needed`,
`num_free_blocks`); the engine applies the plan.

The engine's side of the contract, per iteration:

    plan = scheduler.schedule(now)
    apply plan.preempted (free KV, num_computed_tokens = 0), then plan.scheduled (allocate)
    run; num_computed_tokens += n; append sampled tokens
    finished requests: set status/finish_reason, then scheduler.remove(req)
    scheduler.on_iteration(plan, duration, now)      # measured seconds of this iteration

`remove` of a request whose finish_reason is not "abort" is also how a policy learns the
output length of a finished request (gittins does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_tokens: int


@dataclass
class Plan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)   # KV dropped: recompute later

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int
    max_num_batched_tokens: int


class Scheduler(ABC):
    """A policy over the live requests. Method pairs: add/remove, schedule/(engine applies)."""

    name: str = ""
    needs_cost_model: bool = False   # True: make_scheduler must be given a CostModel

    def __init__(self, limits: Limits, kv: KVManager, config: SchedulerConfig | None = None,
                 cost_model: CostModel | None = None) -> None:
        self.limits = limits
        self.kv = kv
        self.config = config if config is not None else SchedulerConfig()
        self.cost_model = cost_model

    @abstractmethod
    def add(self, req: Request) -> None:
        """A newly admitted request."""

    @abstractmethod
    def remove(self, req: Request) -> None:
        """A finished or aborted request leaves the policy."""

    @abstractmethod
    def schedule(self, now: float) -> Plan:
        """The next iteration's plan."""

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        """The engine ran `plan` for `duration` seconds, ending at `now`; tokens are appended
        and finished requests already removed. Charges every scheduled live request the
        iteration's duration (FastServe's accounting). Policies extend this."""
        for s in plan.scheduled:
            req = s.request
            if not req.finished:
                req.attained_service += duration
                req.last_run_time = now

    @abstractmethod
    def __len__(self) -> int:
        """Number of live requests."""

    def queue_lengths(self) -> list[int]:
        """Live requests per priority level, highest first (one level unless the policy has queues)."""
        return [len(self)]

    def _require_cost_model(self) -> CostModel:
        if self.cost_model is None:
            raise ValueError(f"the {self.name} scheduler needs a cost model: pass cost_model=CostModel.load("
                             "'opt-13b-a100') or a JSON table path, or profile the engine with "
                             "fastserve_jax.cost_profile.profile_engine(engine)")
        return self.cost_model
