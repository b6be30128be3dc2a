"""Policies that rank every live request by a number: srpt and gittins. Pure Python.

A key only changes when its request runs, is evicted, or the policy relearns, so the
ranking lives in a heap with lazy invalidation: updating a request pushes a new entry and
leaves the old one behind, to be dropped when it surfaces (entries are compared by
identity with the request's current one). A schedule() pops the heap only as far as the
batch fills and pushes those entries back, O(batch log n) instead of a sort of everything.

    _heap:  [(key, arrival_seq, id), ...]    smaller key runs first; ties in arrival order
    _entry: id -> its current heap entry
"""

from __future__ import annotations

import heapq
import itertools
from abc import abstractmethod
from typing import Callable, Iterator

from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, Scheduler
from fastserve_jax.scheduler.batch import fill_batch


class IndexPolicy(Scheduler):
    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self._heap: list[tuple[float, int, str]] = []
        self._entry: dict[str, tuple[float, int, str]] = {}
        self._live: dict[str, Request] = {}
        self._seq: dict[str, int] = {}
        self._arrivals = itertools.count()

    @abstractmethod
    def key(self, req: Request) -> float:
        """Smaller runs first."""

    def keys(self, reqs: list[Request]) -> list[float]:
        """key() of each request (a policy may compute many at once faster)."""
        return [self.key(r) for r in reqs]

    def __len__(self) -> int:
        return len(self._live)

    def add(self, req: Request) -> None:
        rid = req.request_id
        self._live[rid] = req
        self._seq[rid] = next(self._arrivals)
        self._push(req)

    def remove(self, req: Request) -> None:
        rid = req.request_id
        if self._live.pop(rid, None) is not None:
            del self._entry[rid]
            del self._seq[rid]

    def _push(self, req: Request) -> None:
        rid = req.request_id
        k = self.key(req)
        old = self._entry.get(rid)
        if old is not None and old[0] == k:       # its entry stands (most decode steps under gittins)
            return
        e = (k, self._seq[rid], rid)
        self._entry[rid] = e
        heapq.heappush(self._heap, e)
        if len(self._heap) > 2 * len(self._entry) + 64:        # too many stale entries: compact
            self._heap = list(self._entry.values())
            heapq.heapify(self._heap)

    def rekey_all(self) -> None:
        """Recompute every key (after the policy relearned)."""
        keys = self.keys(list(self._live.values()))
        self._entry = {rid: (k, self._seq[rid], rid) for k, rid in zip(keys, self._live)}
        self._heap = list(self._entry.values())
        heapq.heapify(self._heap)

    def _best_first(self, popped: list) -> Iterator[Request]:
        heap, entry, live = self._heap, self._entry, self._live
        while heap:
            e = heapq.heappop(heap)
            if entry.get(e[2]) is e:
                popped.append(e)
                yield live[e[2]]

    def _worst_first(self) -> Iterator[Request]:
        for e in sorted(self._entry.values(), reverse=True):
            yield self._live[e[2]]

    def priority_order(self) -> Iterator[Request]:
        for e in sorted(self._entry.values()):
            yield self._live[e[2]]

    def schedule(self, now: float) -> Plan:
        return self.fill(lambda ranked: ranked, self._worst_first())

    def fill(self, order: Callable[[Iterator[Request]], Iterator[Request]], worst_first: Iterator[Request]) -> Plan:
        """fill_batch over order(requests in key order, popped off the heap lazily)."""
        popped: list = []
        plan = fill_batch(order(self._best_first(popped)), worst_first, self.limits, self.kv, self.swap_on_evict,
                          self.swap_in_blocks, self.starts_on_host(), self.drops_to_start(), host_pools=self.host_pools(),
                          backfill=self.backfilled if self.backfills() else None, promoted=self.promoted())
        for e in popped:
            heapq.heappush(self._heap, e)
        return plan

    def drops_to_start(self) -> bool:
        """Whether new requests may drop lower-ranked host KV to start (batch.fill_batch)."""
        return False

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        super().on_iteration(plan, duration, now)
        live = self._live
        for s in plan.scheduled:
            if s.request.request_id in live:
                self._push(s.request)
        for req in plan.preempted:                 # recomputation ahead changes their keys
            if req.request_id in live:
                self._push(req)
