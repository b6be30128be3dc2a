"""Scheduling on predicted output lengths (issue 18; beyond the FastServe paper).

Each request may carry a predicted distribution of its output length
(`Request.length_prediction`, set when its prefill completes; see base.py for who sets it
and when). The policy ranks every live request by the Gittins index of its own prediction
at the tokens it has generated, with the prefill still ahead counted in decode slots
(length_prediction.py, service.py): a sharp prediction gives shortest-remaining-first, a
flat one the learned-distribution Gittins policy. A request without a prediction (not
prefilled yet, or admitted before the switch) is ranked by the prior: the pooled lengths of
finished requests (learned.py), binned like the predictions so that both rank on one scale.
The index is for `predictive_objective`: mean latency per output token by default (each
request's cost rate is 1 / its length, so a sharp predictor ranks by length x remaining
work), or mean JCT (exactly SRPT when sharp).

Two bounds on top of the ranking:

- Preemption limit (TRAIL's): at most `predictive_max_paused` (M) started-but-unfinished
  requests sit outside the batch. With S requests started and B = max_num_seqs, new
  requests take batch slots only while S + new <= B + M: each one started pauses at most
  one started request. At the limit the started requests run in index order and new ones
  wait. The count assumes every started request gets its slot; one left out for KV (its
  KV on the host beyond the swap-in budget) or for the token budget can leave more than M
  paused in that iteration.
- Starvation: a request idle (not in a batch) longer than the starvation limit is promoted:
  from then on it runs before every other request until it finishes, promoted requests in
  the order they were promoted. The limit is `gittins_starvation_threshold` stretched
  by the live requests per batch slot, as for MLFQ (base.starvation_limit). MLFQ's
  promotion lasts one quantum, which bounds each wait but not the sum of them: a job
  predicted long would get a token per limit and finish last all the same (p99 JCT 2x
  fcfs's in 1.5x bursts). A promoted request that has not started uses up the start
  allowance first and starts even at the limit: the wait bound is the hard guarantee, so
  the paused count may exceed M by the promoted requests started in that iteration.

Predictions from prompt lengths: a request with no prediction of its own is ranked by the
finished requests with the nearest prompt lengths (`prompt_neighbors`, running
requests counted as at least their age; prompt_lengths.py), once such predictions have been
seen to rank the finished and running requests (a concordance of 0.3 as a tau, over the
pairs the predictions separate; prompt_lengths.py), and by the
prior otherwise. They are made when a
request arrives and redone for every live request at each relearn, so a request waiting in
a burst is ranked by what has been learned since it arrived. Templated traffic has this
signal (the Azure trace: the gate's tau 0.69); traffic whose output lengths do not follow its prompts'
never opens the gate.

Until a request carrying a prediction has been seen, or prompt lengths have passed the gate,
and `predictive_min_samples` (10) requests have finished, the policy is skip-join MLFQ
(learned.py); then live requests move over, keeping their KV.
"""

from __future__ import annotations

import heapq
from typing import Container, Iterable, Iterator

from fastserve_jax.length_prediction import LengthPrediction
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan
from fastserve_jax.scheduler.learned import LearnedLengthPolicy


class PredictiveScheduler(LearnedLengthPolicy):
    name = "predictive"

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self.max_paused = self.config.predictive_max_paused
        self.per_token = self.config.predictive_objective == "latency_per_token"
        self.prior: LengthPrediction | None = None
        self.seen_prediction = False
        self._started: set[str] = set()                       # live requests that have run

    def key(self, req: Request) -> float:
        """Minus the index of the request's own prediction, else the one from its prompt length,
        else the prior (learned.prediction_key)."""
        pred = req.length_prediction or self.by_prompt.get(req.request_id) or self.prior
        return self.prediction_key(req, pred, self.per_token)

    def min_samples(self) -> int:
        return self.config.predictive_min_samples

    def ready(self) -> bool:
        if self.warmup is None:                  # switched over: stay (the gate may close later)
            return True
        return (self.seen_prediction or self.prompts_rank()) and super().ready()

    def learn(self) -> None:
        self.prior = LengthPrediction.from_samples(self.pooled)
        live = list(self.live_requests())
        self._slots = self.batch_slots(live)
        self.predict_by_prompt(live)

    # -- membership and bookkeeping (both phases) -------------------------------------------
    def remove(self, req: Request) -> None:
        super().remove(req)
        self._started.discard(req.request_id)

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        for s in plan.scheduled:
            req = s.request
            if req.length_prediction is not None:
                self.seen_prediction = True
            if not req.finished:                              # else already removed
                self._started.add(req.request_id)
        super().on_iteration(plan, duration, now)

    # -- the ranked phase --------------------------------------------------------------------
    def _order(self, front: list[Request], ranked: Iterable[Request]) -> Iterator[Request]:
        """`front` (the promoted), then `ranked` (index order) with new requests only while the
        start allowance lasts, then the started requests `ranked` did not reach, in index order."""
        started, seen = self._started, set()
        allow = self.limits.max_num_seqs + self.max_paused - len(started)
        for req in front:
            seen.add(req.request_id)
            if req.request_id not in started:
                allow -= 1
            yield req
        if allow > 0:
            for req in ranked:
                rid = req.request_id
                if rid in seen:
                    continue
                seen.add(rid)
                yield req
                if rid not in started:
                    allow -= 1
                    if allow <= 0:
                        break
        rest = [self._entry[rid] for rid in started if rid not in seen]
        head = heapq.nsmallest(4 * self.limits.max_num_seqs, rest)     # what a batch walk reaches
        yield from (self._live[e[2]] for e in head)
        if len(head) < len(rest):
            yield from (self._live[e[2]] for e in sorted(rest)[len(head):])

    def schedule_ranked(self, now: float) -> Plan:
        front = self.starving(now)
        return self.fill(lambda ranked: self._order(front, ranked), self._worst_first_but(front))

    def ranks(self, only: Container[str] | None = None) -> dict[str, int]:
        """As priority_order() would place them, without ordering every live request: _order
        over the index heap, as a schedule walks it (the promoted, the index walk while the
        start allowance lasts, then the started requests it did not reach); the swap policy
        asks for the KV holders, which have all started. With 2,000 requests in a burst the full order was most of the
        policy's host time (docs/scheduling_log.md). Any other id asked for: the full order."""
        if self.warmup is not None or only is None:
            return super().ranks(only)
        popped: list = []
        out = {r.request_id: pos for pos, r in enumerate(self._order(list(self._promoted.values()),
                                                                     self._best_first(popped)))
               if r.request_id in only}
        for e in popped:
            heapq.heappush(self._heap, e)
        if any(rid not in out for rid in only if rid in self._live):
            return super().ranks(only)
        return out

    def priority_order(self) -> Iterator[Request]:
        if self.warmup is not None:
            return self.warmup.priority_order()
        ranked = [self._live[e[2]] for e in sorted(self._entry.values())]
        first = list(self._order(list(self._promoted.values()), ranked))
        ids = {r.request_id for r in first}
        return iter(first + [r for r in ranked if r.request_id not in ids])
