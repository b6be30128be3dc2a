"""The seam between the engine and scheduling policies. Pure Python; never imports jax.

Each iteration the engine asks the policy for a `Plan`: which requests run and with how
many tokens each (a prefill chunk, or 1 for decode), which lose their KV to be recomputed
later, and which move their KV to the host pool to make room. The policy sees the KV
manager read-only (`blocks_needed`, `num_free_blocks`, `location`); the engine applies the
plan (kv_plan.apply_plan, shared with the simulator).

The engine's side of the contract, per iteration:

    plan = scheduler.schedule(now)
    apply_plan: plan.preempted (free KV, num_computed_tokens = 0), plan.swapped_out (to the
    host), then plan.scheduled (KV on the host comes back first, then allocate)
    run; num_computed_tokens += n; append sampled tokens
    finished requests: set status/finish_reason, then scheduler.remove(req)
    scheduler.on_iteration(plan, service, now)       # service: scheduler.service(plan), taken
                                                     # before the run, else the measured seconds

`remove` of a request whose finish_reason is not "abort" is also how a policy learns the
output length of a finished request (gittins and predictive do).

Predicted output lengths (predictive reads them; the others ignore them): whoever predicts
(the engine's learned head, or the simulator's noisy oracle) sets `req.length_prediction`
(length_prediction.LengthPrediction) on requests of the iteration's plan BEFORE calling
`scheduler.on_iteration(plan, ...)`, so that index policies re-key them there. A prediction
arrives when a request's prefill completes (its first token) and may be replaced by a
refined one on any later iteration the request runs in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Container, Iterator, NamedTuple

from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request

# Where memory binds, a backlog of more than this many waiting requests per batch slot turns
# on fill_batch's drop_to_start (Scheduler.backlog_waits; skip-join's and gittins' drops_to_start).
BACKLOG_PER_SLOT = 4
# Where memory binds and lengths are heavy-tailed (Scheduler.heavy_bound), new requests may start
# on this many device pools' worth of host blocks with proactive swapping (Scheduler.host_pools).
HEAVY_TAIL_HOST_POOLS = 2


class ScheduledRequest(NamedTuple):
    """One request's part of an iteration: a prefill chunk, or 1 for a decode. A named tuple,
    not a frozen dataclass: `fill_batch` makes one per request per iteration, and a frozen
    dataclass's constructor took 1.6x as long (306 against 189 ns on the development VM)."""

    request: Request
    num_tokens: int
    # of num_tokens, those a request without KV is expected to find in the prefix cache
    # (KVManager.cached_prefix): left out of the iteration's token budget; kv_plan.apply_plan
    # computes at most num_tokens - cached of them
    cached: int = 0


@dataclass
class Plan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)     # KV dropped: recompute later
    swapped_out: list[Request] = field(default_factory=list)   # KV moved to the host pool
    # Host blocks the plan takes net: swapped_out's, less those of scheduled requests whose KV
    # comes back from the host (an exchange: kv_plan.apply_plan lends them to the swap-outs).
    host_blocks: int = 0
    # Planning only, with prefix caching (prefix_cache.py): device blocks that starts in this
    # plan count on sharing with their holders, which an eviction then does not count as freed,
    # and blocks that evictions count as freed, which a start then does not count on sharing.
    kv_shared: set[int] = field(default_factory=set)
    kv_released: set[int] = field(default_factory=set)
    # and blocks that several requests hold -> how many of those holders this plan evicts (the
    # last one's eviction frees the block)
    kv_evicted_holders: dict[int, int] = field(default_factory=dict)

    def count_shared(self, blocks) -> list[int]:
        """Mark `blocks` as ones a start counts on sharing, before it evicts for itself (its
        victim may be their only holder: batch.evict then does not count them as freed); returns
        those newly marked, to take back with kv_shared.difference_update if it does not start."""
        new = [b for b in blocks if b not in self.kv_shared]
        self.kv_shared.update(new)
        return new

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
        # True: a request that must make room moves lower-priority KV to the host pool while
        # it has room (and may do so to start); False: it drops that KV for recomputation.
        self.swap_on_evict = False
        # Host blocks the next step may wait for (swap-ins on demand); None: no bound. The swap
        # policy sets it each iteration from its stall budget (swap_policy.SwapPolicy.configure).
        self.swap_in_blocks: int | None = None
        # True: host KV comes back ahead of need (proactive swapping), so new requests may
        # start on the strength of the host pool and push paused KV there (batch.fill_batch).
        self.start_on_host = False
        # The requests started past a new one the start bound held back (Scheduler.backfills).
        self.backfilled: dict[str, Request] = {}

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

    @abstractmethod
    def __len__(self) -> int:
        """Number of live requests."""

    def backlog_waits(self) -> bool:
        """More than BACKLOG_PER_SLOT live requests per batch slot hold no KV (wait to start)."""
        return len(self) - self.kv.num_kv_requests > BACKLOG_PER_SLOT * self.limits.max_num_seqs

    def starts_on_host(self) -> bool:
        """Whether new requests may start on the host pool's share (batch.fill_batch's
        start_on_host; the swap policy's choice, set before each schedule)."""
        return self.start_on_host

    def heavy_bound(self) -> bool:
        """Whether memory binds the batch and the learned lengths are heavy-tailed (skip-join
        and gittins learn both; the others never say so)."""
        return False

    def host_pools(self) -> int:
        """Device pools' worth of host blocks new requests may start on, with proactive
        swapping (batch.fill_batch's host_pools): HEAVY_TAIL_HOST_POOLS where heavy_bound, else
        1. There the KV of demoted requests, expected to run long, waits on the host, and one
        pool's worth filled up: new requests waited for the long ones to finish, as under
        fcfs (a tenth of OPT-13B's KV, heavy-tailed lengths at 0.9x of capacity: skip-join's
        latency per token 304 ms, 90 ms with two pools, fcfs's 551; gittins' 177 and 90 ms).
        More pools, or light tails and full device KV too, cost elsewhere
        (docs/scheduling_log.md, "Demoted requests wait on the host")."""
        return HEAVY_TAIL_HOST_POOLS if self.heavy_bound() else 1

    def promoted(self) -> Container[str]:
        """Ids of the requests promoted for waiting (starvation), which run first for
        fairness rather than for their rank: the only ones fill_batch's backfill starts past."""
        return ()

    def backfills(self) -> bool:
        """Whether new requests may start past a request promoted for waiting that the start
        bound holds back, leaving it room (batch.fill_batch's backfill): where heavy_bound.
        There the promoted request was often a long one needing most of the pool, every
        request behind it waited, and as a burst drained the batch ran 1.7 requests on
        average against fcfs's 2.6 (a tenth of OPT-13B's KV, heavy-tailed lengths, 0.95x of
        capacity: skip-join/reactive served 0.947x fcfs's throughput; with proactive
        swapping the host share let new requests past, and backfill took 1-15% off skip-join's
        latency per token in the bursts). Not where lengths are alike: the requests started
        past it hold their blocks until they finish, ahead of better-ranked ones arriving
        later (Azure trace, a tenth of the KV, reactive: latency per token 57 -> 148 ms at
        0.9x of capacity when every policy backfilled past any request;
        docs/scheduling_log.md, "Backfill past a promoted request")."""
        return self.heavy_bound()

    @abstractmethod
    def priority_order(self) -> Iterator[Request]:
        """Every live request, the one that would run first first."""

    def next_run_estimates(self, now: float, step_time: float,
                           only: Container[str] | None = None) -> dict[str, float]:
        """Estimated seconds until each live request is next scheduled (FastServe's ENST);
        `only`: the request ids wanted (default all; the swap policy asks for the KV holders).

        This default reads only the ranking: a request of rank k waits about k // max_num_seqs
        iterations of `step_time` seconds. Policies with more structure refine it (mlfq)."""
        b = self.limits.max_num_seqs
        return {rid: (k // b) * step_time for rid, k in self.ranks(only).items()}

    def ranks(self, only: Container[str] | None = None) -> dict[str, int]:
        """Each live request's place in priority_order() (0 runs first); `only`: the ids
        wanted (default all). A policy may find a few places without ordering everything."""
        return {r.request_id: k for k, r in enumerate(self.priority_order()) if only is None or r.request_id in only}

    def queue_lengths(self) -> list[int]:
        """Live requests per priority level, highest first (one level unless the policy has queues)."""
        return [len(self)]

    def use_cost_model(self, cost_model: CostModel, config: SchedulerConfig) -> None:
        """Swap in a new cost model and config (a provisional profile for the full one, see
        cost_profile.refine_profile) while no request is live; what the policy learned from
        finished requests stays. Policies that derive state from either extend this."""
        if len(self):
            raise RuntimeError("replace the cost model only while the scheduler holds no request")
        self.cost_model = cost_model
        self.config = config

    def service(self, plan: Plan) -> float | None:
        """The seconds of service `plan` is charged (on_iteration's duration), taken before it
        runs; None: the caller charges the measured seconds. Only a policy whose decisions read
        the service charges it by its cost model (MLFQ); the others take None and cost nothing."""
        return None

    def _require_cost_model(self) -> CostModel:
        if self.cost_model is None:
            raise ValueError(f"the {self.name} scheduler needs a cost model: pass cost_model=CostModel.load("
                             "'opt-13b-a100') or a JSON table path, or profile the engine with "
                             "fastserve_jax.cost_profile.profile_engine(engine)")
        return self.cost_model


def finished_length(req: Request) -> int:
    """The output length a policy may learn from `req` as it leaves: its tokens if it finished
    on its own, 0 if it was aborted or has not finished (see the module docstring)."""
    return len(req.output_token_ids) if req.finished and req.finish_reason != "abort" else 0


def pool_slots(kv: KVManager, max_num_seqs: int, prompt: float, output: float) -> int:
    """How many requests of `prompt` + `output` tokens the device pool holds, 1 to max_num_seqs:
    the batch slots that stretch a starvation limit where memory binds (skip-join, predictive)."""
    return max(1, min(max_num_seqs, int(kv.num_usable_blocks * kv.block_size // (prompt + output))))


def starvation_limit(threshold: float, live: int, max_num_seqs: int) -> float:
    """Seconds without running after which a request counts as starving (0: never).

    The configured threshold, stretched by the live requests per batch slot: with N jobs
    sharing max_num_seqs slots, even a fair share leaves each one idle about N / slots
    times as long. A fixed threshold under overload promotes every job again and again,
    and MLFQ turns into round robin over all of them (an 8x burst on the heavy-tailed
    trace: latency per token 1.4x better than fcfs with a fixed 10 s, 2.6x without
    promotion)."""
    return threshold * max(1.0, live / max_num_seqs)
