"""Filling one iteration in a policy's priority order: the collaborator every preemptive
policy shares. Pure Python.

A preemptive policy only ranks requests; `fill_batch` walks them best first and takes each
one's next prefill chunk or decode token while the batch size, the token budget and the
free KV blocks allow. Paused requests keep their KV on the device, so memory can run out
while low-priority requests sit on it. Then:

- a request that already holds KV (on the device, or on the host and due back) and needs
  more device blocks evicts paused requests of lower priority (lowest first) until it fits;
  `evict` moves their KV to the host pool while it has room (swap_on_evict), else drops it
  for recomputation. Where even that does not make it fit, its evictions stand, but no
  request without KV starts in this iteration;
- a request without KV (new, or dropped earlier) starts only if its whole context fits (a
  start that must later evict for its own prefill lets MLFQ rotate partial prefills forever).
  With proactive swapping (`start_on_host`) it may evict paused requests to the host pool,
  never by dropping KV (dropping work already done to start a new request makes the two
  chase each other, and bounds nothing when more requests start than the pools hold);
  otherwise it starts only into free blocks. Requests start only while all started
  requests' KV stays within a bound (see below). After the first one that does not fit, no
  other request without KV starts in this iteration (it would overtake a better-ranked
  one), and a QueueWalk (MLFQ's) narrows the rest of the walk to the requests holding KV.

Requests in flight (pipeline mode: in a batch dispatched but not collected yet) are neither
scheduled nor evicted.

With `drop_to_start` (skip-join sets it where memory binds and a backlog waits, and gittins
there too where its learned lengths are heavy-tailed; see skip_join.py and gittins.py) the
start bound counts the device pool only, and a new request it holds back drops the host KV
of paused requests ranked below it, lowest first, until it fits: those prefill again later,
as under recompute. With reactive swapping the bound is the device pool
anyway, and host KV counts against it until dropped the same way.

With `backfill` (skip-join and gittins where memory binds and lengths are heavy-tailed:
Scheduler.backfills) a request promoted for waiting that the start bound holds back, and
that needs more than half of the bound, does not stop the others: one ranked below it may
start if it fits the bound and if it, the held-back one and every request started past a
held-back one so far (the dict the policy keeps, emptied when a new request starts in order)
fit the bound together. So the held-back one waits for the KV holders that were there before
it, not for those started past it (but for their growth). In strict order such a request ran
nearly alone as a burst drained; one that is first by its rank, or that a few finishing
holders make room for, keeps the order (docs/scheduling_log.md, "Backfill past a promoted
request").

The best-ranked KV holder can always evict every other paused holder, and admission checks
that one request fits the whole pool, so some request always runs.
"""

from __future__ import annotations

import itertools
from typing import Callable, Container, Iterable, Iterator, Mapping

from fastserve_jax.kv_cache import ON_HOST, KVLocation, KVManager
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Limits, Plan, ScheduledRequest


# After the budget runs out, look this many batches further for decodes (counting requests that could run).
DECODE_LOOKAHEAD = 4
# Started requests' KV stays this fraction of the device pool below its size, room for the
# running ones to grow before they evict paused ones (see fill_batch's start bound).
START_HEADROOM = 1 / 16
# With backfill, look this many requests without KV past the one the start bound holds back.
BACKFILL_LOOKAHEAD = 64


class QueueWalk:
    """A best-first walk over priority levels (each an insertion-ordered dict, request id ->
    request, walked in order) that fill_batch narrows, once no new request may start, to the
    requests holding KV (`holders`, e.g. KVManager.where). MLFQ ranks the requests waiting
    to start above the paused ones in its lower queues, and in a burst a walk that has to
    reach those paused requests went through every waiting one each iteration: skip-join's
    host time grew with the backlog (Azure trace, 8x burst: 89 us per iteration with 400
    requests, 235 us with 2,000; docs/scheduling_log.md)."""

    def __init__(self, levels: Iterable[Mapping[str, Request]], holders: Container[str]) -> None:
        self.levels = levels
        self.holders = holders
        self.narrowed = False

    def __iter__(self) -> Iterator[Request]:
        holders = self.holders
        for level in self.levels:
            if self.narrowed:
                yield from [r for rid, r in level.items() if rid in holders]
                continue
            items = iter(level.items())
            for _, req in items:
                yield req
                if self.narrowed:                     # the rest of this level, then the others
                    yield from [r for rid, r in items if rid in holders]
                    break


def evict(plan: Plan, victim: Request, kv: KVManager, swap: bool) -> int:
    """Take `victim`'s device KV away in `plan`: to the host pool when `swap` and it has room
    next to what the plan already moves there, else drop it. Returns the device blocks freed
    (none for KV already on the host, which stays there; with prefix caching, the blocks it
    alone holds and those whose other holders the plan evicted already, less those a start of
    the plan counts on sharing: Plan.kv_shared)."""
    n = len(kv.block_table(victim))
    if n == 0:
        return 0
    if swap and kv.can_swap_out(victim, plan.host_blocks):
        plan.swapped_out.append(victim)
        plan.host_blocks += n
    else:
        plan.preempted.append(victim)
    if not kv.caching:
        return n
    freed = kv.freeable_blocks(victim, plan.kv_shared, plan.kv_evicted_holders)
    plan.kv_released.update(freed)
    return len(freed)


def fill_batch(best_first: Iterable[Request], worst_first: Iterable[Request], limits: Limits,
               kv: KVManager, swap: bool = False, swap_in_blocks: int | None = None,
               start_on_host: bool = False, drop_to_start: bool = False,
               keep: Callable[[Request], bool] | None = None,
               headroom: int | None = None, host_pools: int = 1,
               backfill: dict[str, Request] | None = None, promoted: Container[str] = ()) -> Plan:
    """The next plan. `worst_first` is consumed lazily, only when a request must evict;
    it must list the same requests as `best_first` in reverse priority order. `swap`: evicted
    KV goes to the host pool while it has room (see `evict`). `swap_in_blocks` bounds the
    host KV the step may wait for (None: no bound; < 0: none): a request whose KV is on the
    host comes back on demand if it fits in the free blocks, or if its blocks fit what is left
    of the bound (it then takes others' device blocks: rotation, where thrashing lives; with
    prefix caching, the blocks it finds on the device are neither copied nor bounded, and those
    that requests hold take no free block: KVManager.swap_in_shares).
    Otherwise it is passed over, a lower-ranked resident one runs instead, and the swap policy
    brings it back ahead of need; it is taken anyway when nothing else can run.
    `start_on_host`: the swap policy brings host KV back ahead of need (proactive), so new
    requests may start past the device pool, up to one more device pool's worth of host
    blocks, moving paused KV to the host to make room. Without it (recompute, reactive:
    there host KV returns only on demand, through the stall budget) started KV stays within
    the device pool and a new request starts only into free blocks. `drop_to_start` (with
    `start_on_host` or `swap`): see the module docstring. `keep`: None, or a predicate on the
    device-resident requests a new request may not evict to start (its evictions stop at the
    first one, walking worst first); requests that hold KV still may evict them. `headroom`:
    None, or blocks of growth the running requests are expected to need, when fewer than
    START_HEADROOM of the start bound (the headroom is then that many blocks). `host_pools`:
    with `start_on_host`, how many device pools' worth of host blocks the start bound adds
    (at most the host pool; skip-join and gittins ask for more where memory binds and
    lengths are heavy-tailed: Scheduler.host_pools). `backfill`: None (strict order: no
    request without KV starts past one that does not fit), or the requests started past a
    request of `promoted` (ids of requests promoted for waiting) that the start bound held
    back, kept by the policy across iterations (Scheduler.backfills; see the module
    docstring)."""
    plan = Plan()
    budget = limits.max_num_batched_tokens
    free = kv.num_free_blocks
    chosen: set[str] = set()
    evicted: set[str] = set()
    victims = None                    # iterator over worst_first, shared by all evictions
    victims_done = False
    held_back = None                  # a victim taken from `victims` but not evicted yet
    # Requests start only while the KV of all started ones fits the device pool, plus at most
    # one device pool's worth of host blocks (`host_pools` of them) when the swap policy brings
    # them back ahead of need, less START_HEADROOM of that for growth. Beyond that the policy
    # rotates through more KV than the pools hold and every switch is a swap or a recomputation
    # (Azure trace near capacity with the whole host pool open: throughput fell to 1/5; with no
    # headroom under recompute, skip-join served 0.88x fcfs's in a 3x Azure burst and recomputed
    # 245k tokens). The headroom is 1/16 rather than 1/8: with a tenth of OPT-13B's KV the pool
    # holds a few requests, and 1/8 of it idle cost 6-8% of throughput against fcfs, which keeps
    # no headroom (code completion, 3x burst: srpt 0.925x with 1/8, 0.967x with 1/16). It
    # applies to the host share too: a full host pool turns the evictions that growth needs into
    # recomputation (mlfq, code completion, 3x: 0.949x -> 0.960x). Host KV counts only for
    # proactive swapping: with reactive swapping, new requests that pushed paused KV to the host
    # left it there, returning only through the stall budget, and the batch ran two-thirds full
    # (code completion, 3x burst: 0.88x fcfs's throughput).
    where_of = kv.where.get
    caching = kv.caching
    started = kv.num_used_blocks + kv.num_host_used_blocks
    start_limit = kv.num_usable_blocks
    drop_to_start = drop_to_start and (start_on_host or swap)    # host KV to drop exists
    if drop_to_start:
        worst_first = list(worst_first)   # walked for drops and for evictions
    elif start_on_host:
        start_limit += min(kv.num_host_blocks, host_pools * kv.num_usable_blocks)
    reserve = int(start_limit * START_HEADROOM)
    start_limit -= reserve if headroom is None else min(reserve, headroom)
    admit_new = True
    blocked = 0                       # with backfill: blocks of the new request the bound held back
    held = 0                          # with backfill: blocks the requests started past it hold
    if backfill is not None:
        for rid in [rid for rid in backfill if where_of(rid, KVLocation.NONE) is KVLocation.NONE]:
            del backfill[rid]         # finished, or dropped: no longer in the way
        held = sum(kv.blocks_for_tokens(r.num_tokens) for r in backfill.values())
        looked = 0
    fallback = None                   # the best host request passed over for swap_in_blocks
    donors: list[int] = []            # plan.scheduled indices of prefill chunks of > 1 token
    past_budget = 0                   # requests walked after the budget ran out
    # Once no new request may start and every KV holder has been walked, the rest of the walk
    # (in a burst, a long queue of waiting requests) can schedule nothing: it ends there.
    holders_left = kv.num_kv_requests  # KV holders not walked yet
    walk = best_first if isinstance(best_first, QueueWalk) else None
    for req in itertools.chain(best_first, (None,)):
        if walk is not None and not admit_new:        # only KV holders can run from here on
            walk.narrowed, walk = True, None
        if req is not None:
            where = where_of(req.request_id, KVLocation.NONE)
            holds = where is not KVLocation.NONE      # kv.has_kv(req)
            holders_left -= holds
            if not holds and not admit_new and holders_left <= 0:
                req = None
        if req is None:               # the walk is over: progress comes before the swap-in bound
            if plan.scheduled or fallback is None:
                break
            req, fallback, swap_in_blocks = fallback, None, None
            where = kv.location(req)
            holds = where is not KVLocation.NONE
        if len(plan.scheduled) >= limits.max_num_seqs:
            break
        if not holds and not admit_new:   # (before the lookahead below: it counts what could run)
            continue
        if budget <= 0:
            # The budget went to prefill chunks; decodes ranked below them still run, each taking
            # one token from the latest chunk. (A 2k-token prompt that took the whole budget
            # stalled every decode behind it: on code-completion traffic skip-join lost to fcfs.)
            if not donors or past_budget >= DECODE_LOOKAHEAD * limits.max_num_seqs:
                break
            past_budget += 1
            if req.num_pending_tokens != 1:
                continue
        rid = req.request_id
        if rid in evicted or req.in_flight or where is KVLocation.SWAPPING_IN:
            continue
        comes_back = uploads = kv.host_blocks(req) if where in ON_HOST else 0
        cached, shares = 0, ()       # a start's tokens in the prefix cache (out of the budget), blocks it shares
        if comes_back and caching:   # a swap-in copies only what the device does not hold (prefix_cache.py)
            found, shares = kv.swap_in_shares(req, plan.kv_released)
            uploads -= found
        if budget > 0:               # min(req.num_pending_tokens, budget + cached), without the calls
            n = len(req.prompt_token_ids) + len(req.output_token_ids) + req.pending_tokens - req.num_computed_tokens
            if caching and not holds:
                cached, shares = kv.cached_prefix(req, plan.kv_released)
            if n > budget + cached:
                n = budget + cached
        else:
            n = 1
        need = kv.blocks_needed(req, n) - len(shares)
        # A request starts only if its whole context fits, not just its first chunk: a start
        # that later has to evict for its own prefill lets MLFQ rotate partial prefills forever.
        fit = need if holds else max(need, kv.blocks_for_tokens(req.num_tokens) - len(shares))
        if comes_back and swap_in_blocks is not None and (swap_in_blocks < 0 or
                                                          (uploads > swap_in_blocks and fit > free)):
            fallback = fallback or req
            continue
        if not holds and started and started + fit > start_limit and drop_to_start and not blocked:
            for v in worst_first:                     # the host KV of paused requests ranked below
                if started + fit <= start_limit or v is req:
                    break
                vid = v.request_id
                if vid in chosen or vid in evicted or v.in_flight or where_of(vid) is not KVLocation.HOST:
                    continue
                evicted.add(vid)
                plan.preempted.append(v)
                started -= kv.host_blocks(v)
        if not holds and blocked:             # a backfill: it must leave room for the held-back one
            if started + fit > start_limit or blocked + held + fit > start_limit:
                looked += 1
                admit_new = looked < BACKFILL_LOOKAHEAD
                continue
        elif not holds and started and started + fit > start_limit:    # alone, anything admitted fits
            if backfill is not None and rid in promoted and 2 * fit > start_limit:
                blocked = fit
                continue
            admit_new = False
            continue
        counted = ()                  # its shares (a start's or a swap-in's), counted before it evicts for itself
        if fit > free and (holds or (swap and start_on_host)) and not victims_done:
            if shares:
                counted = plan.count_shared(shares)
            if victims is None:
                victims = iter(worst_first)
            n_evicted = len(evicted)
            while fit > free:
                v, held_back = (held_back, None) if held_back is not None else (next(victims, None), None)
                if v is None or v is req:     # everything further up ranks above the requester
                    victims_done = True
                    break
                vid = v.request_id
                if vid in chosen or vid in evicted or v.in_flight or kv.location(v) is not KVLocation.DEVICE:
                    continue
                if not holds and (not kv.can_swap_out(v, plan.host_blocks) or (keep is not None and keep(v))):
                    held_back = v             # a new request never drops others' KV; a holder may
                    break
                evicted.add(vid)
                free += evict(plan, v, kv, swap)
            if fit > free and len(evicted) > n_evicted:
                # its evictions stand (the blocks go to it as more free up; KV holders ranked
                # below may use them meanwhile), but no new request starts in them: that one
                # would overtake it and take what it evicted for (vLLM schedules no new
                # request in a step that preempted)
                admit_new = False
        if fit > free:
            plan.kv_shared.difference_update(counted)
            if not holds:
                admit_new = False
            continue
        if budget <= 0:                               # a decode takes a token from the latest chunk
            d = donors[-1]
            s = plan.scheduled[d] = plan.scheduled[d]._replace(num_tokens=plan.scheduled[d].num_tokens - 1)
            if s.num_tokens - s.cached == 1:
                donors.pop()
            budget += 1
        if n - cached > 1:
            donors.append(len(plan.scheduled))
        plan.scheduled.append(ScheduledRequest(req, n, cached))
        if shares:
            plan.kv_shared.update(shares)
        if not holds and backfill is not None:
            if blocked:
                backfill[rid] = req
                held += fit
            elif backfill:                            # started in order: nothing waits on them
                backfill.clear()
                held = 0
        started += fit if not holds else 0
        plan.host_blocks -= comes_back                # coming back: its host blocks take evictions
        if swap_in_blocks is not None:
            swap_in_blocks -= uploads
        chosen.add(rid)
        budget -= n - cached
        free -= fit                                   # a starter's rest of prefill is set aside too
    return plan
