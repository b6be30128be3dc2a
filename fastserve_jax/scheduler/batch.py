"""Filling one iteration in a policy's priority order: the collaborator every preemptive
policy shares. Pure Python.

A preemptive policy only ranks requests; `fill_batch` walks them best first and takes each
one's next prefill chunk or decode token while the batch size, the token budget and the
free KV blocks allow. Paused requests keep their KV on the device, so memory can run out
while low-priority requests sit on it. Then:

- a request that already holds KV and needs more evicts paused requests of lower priority
  (lowest first) until it fits; they lose their KV and are recomputed when they run again;
- a request without KV (new, or evicted earlier) starts only if its chunk fits in the free
  blocks; after the first one that does not, no other request without KV starts in this
  iteration (it would overtake a better-ranked one, and the walk stays short).

The best-ranked KV holder can always evict every other paused holder, and admission checks
that one request fits the whole pool, so some request always runs.
"""

from __future__ import annotations

from typing import Iterable

from fastserve_jax.kv_cache import KVManager
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Limits, Plan, ScheduledRequest


def fill_batch(best_first: Iterable[Request], worst_first: Iterable[Request], limits: Limits,
               kv: KVManager) -> Plan:
    """The next plan. `worst_first` is consumed lazily, only when a KV holder must evict;
    it must list the same requests as `best_first` in reverse priority order."""
    plan = Plan()
    budget = limits.max_num_batched_tokens
    free = kv.num_free_blocks
    chosen: set[str] = set()
    evicted: set[str] = set()
    victims = None                    # iterator over worst_first, shared by all evictions
    victims_done = False
    admit_new = True
    for req in best_first:
        if len(plan.scheduled) >= limits.max_num_seqs or budget <= 0:
            break
        rid = req.request_id
        if rid in evicted:
            continue
        holds = bool(kv.block_table(req))
        if not holds and not admit_new:
            continue
        n = min(req.num_pending_tokens, budget)
        need = kv.blocks_needed(req, n)
        if need > free and holds and not victims_done:
            if victims is None:
                victims = iter(worst_first)
            for v in victims:
                if v is req:          # everything further up ranks above the requester
                    victims_done = True
                    break
                vid = v.request_id
                if vid in chosen or vid in evicted or not kv.block_table(v):
                    continue
                evicted.add(vid)
                plan.preempted.append(v)
                free += len(kv.block_table(v))
                if need <= free:
                    break
            else:
                victims_done = True
        if need > free:
            if not holds:
                admit_new = False
            continue
        plan.scheduled.append(ScheduledRequest(req, n))
        chosen.add(rid)
        budget -= n
        free -= need
    return plan
