"""Where paused requests keep their KV: FastServe's proactive swapping and two baselines.
Pure Python; the engine and the simulator call it after each iteration's step is issued.

    recompute   evicted KV is dropped and prefilled again later (vLLM's default); no host pool
    reactive    evicted KV moves to the host pool while it has room, and comes back only when
                the scheduler picks its request (the step waits for that copy)
    proactive   reactive, plus moves ahead of need, ranked by each paused request's estimated
                next scheduled time (ENST, Scheduler.next_run_estimates):
                - when free device blocks fall below a reserve sized for expected arrivals,
                  offload the paused requests with the largest ENST first;
                - upload the host-resident requests with the smallest ENST while the device
                  stays above the reserve, so they are back before the scheduler wants them;
                  make room for one by offloading paused requests whose ENST is more than
                  twice its own plus the lookahead (the device keeps the requests due soonest;
                  ENST overestimates, since jobs ahead often finish before their quantum, so
                  only the order is trusted);
                - when the host pool is full, offload nothing: the reserve is a target, and
                  dropping KV ahead of need would only trade a later recomputation for it.
                  Evictions that a scheduled request needs still fall back to recomputing
                  the lowest-priority requests (scheduler/batch.py).

The stall budget (all swapping policies): steps wait for on-demand swap-ins at most
MAX_STALL_FRACTION of busy time; `configure` turns the credit left into the scheduler's
`swap_in_blocks` before each schedule(), and uploads issued after one step fit what the link
carries in one step when the copy speed is known (docs/swapping.md, the no-thrash invariant).

Avoiding ping-pong: uploads never take the device below the reserve that triggers offloads,
so one iteration's upload cannot cause the next one's offload; a request moved either way is
not moved back by this policy for COOLDOWN_ITERATIONS (only the scheduler's own eviction,
which a running request needs, can); a swap-out still in flight is never uploaded. The
scheduler's own on-demand moves do not start that count: the policy may upload a request the
scheduler evicted an iteration before, where its next run is the soonest on the host. Starting
the count at those moves too cost latency per token in the simulator's grid (2026-12-07,
docs/scheduling_log.md, "Two probe findings measured").

The reserve (unless fixed by `reserve_blocks`): the blocks that the arrivals expected over
the next LOOKAHEAD_ITERATIONS steps need for their first chunk (the rate: the last
ARRIVAL_WINDOW arrivals over the time since the oldest of them, so it decays when arrivals
stop; the chunk: their mean first chunk), plus the blocks that the running requests grow by
over those steps; at most a quarter of the device pool.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from typing import Mapping

from fastserve_jax.kv_cache import KVLocation, KVManager
from fastserve_jax.kv_plan import SwapAhead
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, Scheduler

SWAP_POLICIES = ("proactive", "reactive", "recompute")
LOOKAHEAD_ITERATIONS = 4
ARRIVAL_WINDOW = 32
COOLDOWN_ITERATIONS = 8
MAX_RESERVE_FRACTION = 0.25
MAX_STALL_FRACTION = 0.05      # of busy time, at most, spent waiting for on-demand swap-ins
# The stall budget accrues a little slower than the bound allows: a copy queued behind
# swap-outs on the link, and the waits for progress when nothing else can run, come on top.
STALL_CREDIT_RATE = 0.8 * MAX_STALL_FRACTION
STALL_CREDIT_WINDOW = 2.0      # seconds of busy time whose stall budget may be saved up
_ARRIVAL = operator.attrgetter("arrival_time")


class SwapPolicy:
    def __init__(self, name: str, kv: KVManager, max_num_batched_tokens: int, reserve_blocks: int = 0,
                 seconds_per_block: float = 0.0) -> None:
        if name not in SWAP_POLICIES:
            raise ValueError(f"unknown swap_policy {name!r}; choose one of {list(SWAP_POLICIES)}")
        self.name = name
        self.kv = kv
        self.max_chunk = max_num_batched_tokens
        self.fixed_reserve = reserve_blocks
        # One block's host-to-device copy time (0: unknown). Uploads issued per iteration are
        # bounded by what the link carries during one step, so they land behind the compute.
        self.seconds_per_block = seconds_per_block
        # Seconds of on-demand swap-in the steps may still wait for: STALL_CREDIT_RATE of
        # every iteration's time accrues, each on-demand swap-in spends the time it stalled.
        self.stall_credit = 0.0
        self.step_time = 0.0                                   # EWMA of iteration seconds
        self._arrivals: deque[tuple[float, int]] = deque(maxlen=ARRIVAL_WINDOW)   # (time, first-chunk blocks)
        self._arrival_blocks = 0                   # the window's first-chunk blocks, summed
        self._iteration = 0
        self._moved: dict[str, int] = {}                       # request id -> iteration of its last move

    @property
    def swaps(self) -> bool:
        """Evicted KV goes to the host pool (the scheduler's swap_on_evict)."""
        return self.name != "recompute" and self.kv.num_host_blocks > 0

    def configure(self, scheduler: Scheduler) -> None:
        """Before each schedule(): where evicted KV goes, and how many host blocks the step may
        wait for (the stall budget, see `stall_credit`)."""
        scheduler.swap_on_evict = self.swaps
        scheduler.start_on_host = self.swaps and self.name == "proactive"
        budget = None                       # no bound (no swapping, or copy speed unknown)
        if self.swaps and self.stall_credit <= 0:
            budget = -1                     # the stall budget is spent: nothing on demand
        elif self.swaps and self.name == "proactive":
            budget = 0                      # only into free blocks; uploads ahead do the rotation
        elif self.swaps and self.seconds_per_block > 0:
            budget = int(self.stall_credit / self.seconds_per_block)
        scheduler.swap_in_blocks = budget

    def charge(self, stall_seconds: float) -> None:
        """The step waited this long for on-demand swap-ins."""
        self.stall_credit -= stall_seconds

    # -- observations ----------------------------------------------------------------------
    def on_arrival(self, req: Request, now: float) -> None:
        if len(self._arrivals) == self._arrivals.maxlen:
            self._arrival_blocks -= self._arrivals[0][1]
        b = self.kv.blocks_for_tokens(min(req.num_prompt_tokens, self.max_chunk))
        self._arrivals.append((now, b))
        self._arrival_blocks += b

    def on_iteration(self, seconds: float) -> None:
        self.step_time = seconds if self.step_time == 0 else 0.8 * self.step_time + 0.2 * seconds
        self._iteration += 1
        self.stall_credit = min(self.stall_credit + STALL_CREDIT_RATE * seconds,
                                STALL_CREDIT_RATE * STALL_CREDIT_WINDOW)

    def forget(self, req: Request) -> None:
        self._moved.pop(req.request_id, None)

    def reserve(self, num_running: int, now: float) -> int:
        """Free device blocks to keep for arrivals and growth over the lookahead."""
        if self.fixed_reserve:
            return self.fixed_reserve
        horizon = LOOKAHEAD_ITERATIONS * self.step_time
        arrivals = 0.0
        if self._arrivals:           # the window's arrivals over the time since its oldest: decays when idle
            span = now - self._arrivals[0][0]
            if span > 0:
                arrivals = len(self._arrivals) / span * horizon
        chunk = self._arrival_blocks / len(self._arrivals) if self._arrivals else 0.0
        growth = num_running * LOOKAHEAD_ITERATIONS / self.kv.block_size
        want = math.ceil(arrivals * chunk + growth)
        return min(want, int(self.kv.num_usable_blocks * MAX_RESERVE_FRACTION))

    def _upload_need(self, req: Request) -> int:
        """Free device blocks an upload of `req` takes: its host blocks, less those of its prefix
        that requests hold on the device (prefix caching: it shares them)."""
        return self.kv.host_blocks(req) - len(self.kv.swap_in_shares(req)[1])

    # -- the proactive moves ---------------------------------------------------------------
    def plan_ahead(self, plan: Plan, live: Mapping[str, Request], scheduler: Scheduler, now: float) -> SwapAhead:
        """Moves to issue after this iteration's step (empty unless proactive); `live`: request
        id -> request, of which only those holding KV are looked at."""
        ahead = SwapAhead()
        kv = self.kv
        if self.name != "proactive" or kv.num_host_blocks == 0:
            return ahead
        free = kv.num_free_blocks
        reserve = self.reserve(len(plan.scheduled), now)
        if free >= reserve and kv.num_host_requests == 0:
            return ahead
        # One walk over the KV holders (in a burst most live requests hold none), in arrival order.
        running = {s.request.request_id for s in plan.scheduled}
        host_resident: list[Request] = []
        paused: list[Request] = []
        holders = sorted(filter(None, map(live.get, kv.where)), key=_ARRIVAL)
        where_of = kv.where.__getitem__
        # settled: not moved in the last COOLDOWN_ITERATIONS iterations (no ping-pong)
        moved, settled = self._moved.get, self._iteration - COOLDOWN_ITERATIONS
        for r in holders:
            rid = r.request_id
            where = where_of(rid)
            if where is KVLocation.HOST:
                if moved(rid, -COOLDOWN_ITERATIONS) <= settled:
                    host_resident.append(r)
            elif where is KVLocation.DEVICE:
                if rid not in running and not r.in_flight and moved(rid, -COOLDOWN_ITERATIONS) <= settled:
                    paused.append(r)
        link = math.inf                                                    # upload blocks this step carries
        if self.seconds_per_block > 0:
            link = self.step_time / self.seconds_per_block - kv.num_swapping_in_blocks
        if not host_resident and (free >= reserve or not paused):
            return ahead
        need_of = self._upload_need if kv.caching else kv.host_blocks      # (most iterations: keep it cheap)
        if not paused and (link < 0 or free - min(map(need_of, host_resident)) < reserve):
            # Nothing to offload, so the upload ranked first must fit the free blocks above the
            # reserve: none does (or the link is full), and no estimate is needed to say so.
            # Where memory binds, nearly every device holder runs, and this is most iterations.
            return ahead
        enst = scheduler.next_run_estimates(now, self.step_time,
                                            {r.request_id for r in paused} | {r.request_id for r in host_resident})
        paused.sort(key=lambda r: enst[r.request_id], reverse=True)        # furthest next run first
        host_resident.sort(key=lambda r: enst[r.request_id])               # soonest next run first
        host_free = kv.num_host_free_blocks
        soon = LOOKAHEAD_ITERATIONS * self.step_time
        k = 0                                                              # next offload candidate
        # prefix caching: blocks the uploads count on sharing (no offload counts them as freed),
        # and blocks the offloads free (no upload counts on sharing them), as Plan.kv_shared / kv_released
        shared: set[int] = set()
        released: set[int] = set()

        def offload_until(fits, than: float) -> bool:
            """Offload paused requests (furthest first, next run later than `than`) until fits()."""
            nonlocal k, free, host_free
            while not fits() and k < len(paused) and enst[paused[k].request_id] > than:
                req = paused[k]
                k += 1
                n = len(kv.block_table(req))
                if n <= host_free:
                    ahead.offload.append(req)
                    host_free -= n
                    gone = kv.freeable_blocks(req, shared)
                    released.update(gone)
                    free += len(gone)
            return fits()

        offload_until(lambda: free >= reserve, -1.0)
        for req in host_resident:
            t, n = enst[req.request_id], kv.host_blocks(req)
            found, shares = kv.swap_in_shares(req, released)     # on the device already: not copied
            need, up = n - len(shares), n - found
            # make room by offloading requests due much later (the factor and margin are hysteresis)
            if up > link and (ahead.upload or link < 0):
                break
            shared.update(shares)
            if not offload_until(lambda: free - need >= reserve, 2 * t + soon):
                break
            ahead.upload.append(req)
            free -= need
            link -= up
        for req in ahead.offload + ahead.upload:
            self._moved[req.request_id] = self._iteration
        return ahead
