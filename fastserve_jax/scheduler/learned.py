"""Index policies over output lengths learned online: the part gittins and predictive share.

Both learn the output-length distribution from finished requests: a sliding window of the
last `gittins_window` lengths per prompt-length bucket and one pooled over all (see
SchedulerConfig.gittins_*), relearned every `gittins_refresh` finishes. Until `ready()`
(at least `min_samples()` finished: `gittins_min_samples`, predictive's own
`predictive_min_samples`; and whatever a subclass adds) the policy is skip-join MLFQ; then
the live requests move over to the index, keeping their KV.

Both also share predictions from prompt lengths (SchedulerConfig.prompt_neighbors,
prompt_lengths.py: each live request's own distribution once prompt lengths are seen to rank
answer lengths) and a starvation bound (SchedulerConfig.gittins_starvation_threshold: a
request idle past the stretched limit runs before all others until it finishes).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import OrderedDict
from abc import abstractmethod
from typing import Container, Iterable, Iterator

from fastserve_jax.length_prediction import LengthPrediction
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, finished_length, pool_slots, starvation_limit
from fastserve_jax.scheduler.index_policy import IndexPolicy
from fastserve_jax.scheduler.length_window import LengthWindow
from fastserve_jax.scheduler.prompt_lengths import PromptLengthModel, running_pairs
from fastserve_jax.scheduler.skip_join import SkipJoinMLFQScheduler
from fastserve_jax.scheduler.service import ServiceMeter


class LearnedLengthPolicy(IndexPolicy):
    needs_cost_model = True

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        c = self.config
        self.meter = ServiceMeter(self._require_cost_model(), limits.max_num_seqs)
        # the warm-up joins on prefill time only: each policy ranks on its own lengths once ready
        self.warmup: SkipJoinMLFQScheduler | None = SkipJoinMLFQScheduler(
            limits, kv, dataclasses.replace(c, prompt_neighbors=0), cost_model)
        self.edges = c.gittins_bucket_edges
        self.history = [LengthWindow(c.gittins_window) for _ in range(len(self.edges) + 1)]
        self.pooled = LengthWindow(c.gittins_window)
        self._new_finishes = 0
        k = c.prompt_neighbors
        self.prompts = PromptLengthModel(c.gittins_window, k) if k else None
        self.by_prompt: dict[str, LengthPrediction] = {}      # id -> prediction from its prompt length
        self._gate_finishes = 0                                # finishes since the gate was judged
        self._pred_keys: dict[str, tuple] = {}                # id -> (prediction, tokens, key) last computed
        self._idle: OrderedDict[str, float] = OrderedDict()   # live id -> idle since, oldest first
        self._promoted: dict[str, Request] = {}               # starved once: first until done, in order
        self._slots = self.limits.max_num_seqs                 # batch_slots(), set by learn()

    def use_cost_model(self, cost_model, config) -> None:
        super().use_cost_model(cost_model, config)
        self.meter = ServiceMeter(cost_model, self.limits.max_num_seqs)
        if self.warmup is not None:
            self.warmup.use_cost_model(cost_model, config)

    def bucket(self, req: Request) -> int:
        return bisect.bisect_right(self.edges, req.num_prompt_tokens)

    # -- learning --------------------------------------------------------------------------
    def observe(self, req: Request) -> None:
        n = finished_length(req)
        if n < 1:
            return
        self.history[self.bucket(req)].observe(n)
        self.pooled.observe(n)
        self._new_finishes += 1
        if self.pooled.settle(self.min_samples()):                           # length_window.py
            for h in self.history:
                h.drop_prior()
            self._new_finishes = max(self._new_finishes, self.config.gittins_refresh)
        if self.prompts is not None:
            self.prompts.observe(req.num_prompt_tokens, n)
            self._gate_finishes += 1
            if self.warmup is not None and self._gate_finishes >= self.config.gittins_refresh:
                self.prompts.refresh(running_pairs(self.live_requests()))   # judge the gate (learn() does it once ranked)
                self._gate_finishes = 0

    def batch_slots(self, live: list[Request]) -> int:
        """The typical requests (median prompt + mean learned output) the device pool holds,
        at most max_num_seqs: what stretches the starvation limit (starving), as skip-join's.
        Stretched by max_num_seqs where the pool holds a few, a request idle past the limit was only
        waiting its turn, and promoting those (first until they finish) made the policy fcfs:
        random templated traffic with 8,000 tokens of device KV, 1.00x and 1.03x fcfs's
        latency per token against skip-join's 2.73x and 4.54x (docs/scheduling_log.md)."""
        finished = self.prompts.finished if self.prompts is not None else ()
        prompts = sorted(p for p, _ in finished) or sorted(r.num_prompt_tokens for r in live)
        if not prompts or not self.pooled:
            return self.limits.max_num_seqs
        return pool_slots(self.kv, self.limits.max_num_seqs, prompts[len(prompts) // 2],
                          sum(self.pooled) / len(self.pooled))

    # -- starvation (SchedulerConfig.gittins_starvation_threshold) -----------------------------
    def starvation_threshold(self) -> float:
        """Seconds idle before a request is promoted, before the stretch (starvation_limit)."""
        return self.config.gittins_starvation_threshold

    def starving(self, now: float) -> list[Request]:
        """Requests promoted for waiting: every live request idle past the starvation limit
        joins the back of this list and stays in it until it finishes."""
        limit = starvation_limit(self.starvation_threshold(), len(self), self._slots)
        if limit > 0:
            idle, promoted = self._idle, self._promoted
            while idle:
                rid, since = next(iter(idle.items()))
                if now - since <= limit:
                    break
                del idle[rid]
                promoted[rid] = self._live[rid]
        return list(self._promoted.values())

    def _worst_first_but(self, front: list[Request]) -> Iterator[Request]:
        ids = {r.request_id for r in front}
        for req in self._worst_first():
            if req.request_id not in ids:
                yield req
        yield from reversed(front)

    def promoted(self) -> Container[str]:
        return self._promoted

    def promoted_first(self, ranked: Iterable[Request]) -> Iterator[Request]:
        """The promoted requests in the order they were promoted, then `ranked` without them."""
        yield from self._promoted.values()
        for req in ranked:
            if req.request_id not in self._promoted:
                yield req

    # -- predictions from prompt lengths (SchedulerConfig.prompt_neighbors) -------------------
    def prompts_rank(self) -> bool:
        return self.prompts is not None and self.prompts.ranks()

    def predict_by_prompt(self, live: list[Request]) -> None:
        """At a relearn: refresh the prompt-length predictions (running requests as censored
        lengths) and, where they rank, predict every live request from them afresh, so that a
        request waiting in a burst is ranked by what has been learned since it arrived."""
        self.by_prompt = {}
        if self.prompts is None:
            return
        self.prompts.refresh(running_pairs(live))
        self._gate_finishes = 0
        if self.prompts.ranks() and live:
            preds = self.prompts.predict_many([r.num_prompt_tokens for r in live],
                                              [len(r.output_token_ids) for r in live])
            self.by_prompt = {r.request_id: p for r, p in zip(live, preds)}

    def prediction_key(self, req: Request, pred: LengthPrediction, per_token: bool) -> float:
        """Minus the Gittins index of `pred` at the tokens req has generated, its prefill still
        ahead counted in decode slots. A running request's is recomputed once its tokens have
        grown by an eighth since the last time (or its prediction changed), not every token:
        each computation costs about 50 us of host time, and the engine's decode steps on a
        CPU take a few ms. A sharp prediction still re-ranks within an eighth of its progress."""
        g, rid = len(req.output_token_ids), req.request_id
        hit = self._pred_keys.get(rid)
        if hit is not None and hit[0] is pred and hit[1] <= g < hit[1] + 1 + hit[1] // 8 and not req.is_prefilling:
            return hit[2]
        k = -pred.gittins_index(g, self.meter.prefill_slots(req), per_token)
        self._pred_keys[rid] = (pred, g, k)
        return k

    def running_ages(self) -> list[list[int]]:
        """Per prompt-length bucket, the tokens generated by each live request that has started
        decoding: censored lengths (each request needs more than that), which keep the learned
        distribution from being biased short while long requests are still running."""
        out: list[list[int]] = [[] for _ in self.history]
        for req in self.live_requests():
            if req.output_token_ids:
                out[self.bucket(req)].append(len(req.output_token_ids))
        return out

    def live_requests(self) -> Iterable[Request]:
        """Every live request, in either phase (skip-join MLFQ's warm-up or ranked)."""
        return self.warmup.best_first() if self.warmup is not None else self._live.values()

    def learned_lengths(self) -> dict:
        """What a restart keeps (the engine saves it beside its caches): the finished lengths
        in the windows, per prompt-length bucket and pooled, and the bucket edges they go with;
        with prompt-length predictions on, the (prompt, length) pairs."""
        state = {"edges": list(self.edges), "history": [list(h) for h in self.history], "pooled": list(self.pooled)}
        if self.prompts is not None:
            state["prompts"] = self.prompts.pairs()
        return state

    def restore_lengths(self, state: dict) -> None:
        """Start from the lengths a previous run learned (ValueError if they do not fit: other
        bucket edges, or not lengths), until min_samples() of this run's own have finished
        (length_window.py)."""
        history, pooled = state.get("history"), state.get("pooled")
        if list(state.get("edges", ())) != list(self.edges) or not isinstance(history, list) \
                or len(history) != len(self.history) or not isinstance(pooled, list):
            raise ValueError("learned lengths for other prompt-length buckets")
        for xs in (*history, pooled):
            if not isinstance(xs, list) or not all(isinstance(x, int) and x >= 1 for x in xs):
                raise ValueError("learned lengths must be integers >= 1")
        for h, xs in zip(self.history, history):
            h.restore(xs)
        self.pooled.restore(pooled)
        if self.prompts is not None and "prompts" in state:   # a prior, as the lengths are (prompt_lengths.py)
            self.prompts.restore(state["prompts"])
            self.prompts.refresh()                            # the gate, judged on the prior

    def min_samples(self) -> int:
        return self.config.gittins_min_samples

    def ready(self) -> bool:
        """Enough learned to leave skip-join MLFQ."""
        return len(self.pooled) >= self.min_samples()

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
            if self.prompts_rank():
                self.by_prompt[req.request_id] = self.prompts.predict_many([req.num_prompt_tokens], [0])[0]
            super().add(req)
        self._idle[req.request_id] = req.arrival_time

    def remove(self, req: Request) -> None:
        if req.finished:
            self.observe(req)
        if self.warmup is not None:
            self.warmup.remove(req)
        else:
            super().remove(req)
        self.by_prompt.pop(req.request_id, None)
        self._pred_keys.pop(req.request_id, None)
        self._idle.pop(req.request_id, None)
        self._promoted.pop(req.request_id, None)

    def schedule(self, now: float) -> Plan:
        if self.ready() and (self.warmup is not None or self._new_finishes >= self.config.gittins_refresh):
            self.relearn()
        if self.warmup is not None:
            self.warmup.swap_on_evict, self.warmup.swap_in_blocks, self.warmup.start_on_host = (
                self.swap_on_evict, self.swap_in_blocks, self.start_on_host)
            return self.warmup.schedule(now)
        return self.schedule_ranked(now)

    def schedule_ranked(self, now: float) -> Plan:
        """The plan once learned: the batch filled in index order."""
        return super().schedule(now)

    def priority_order(self) -> Iterator[Request]:
        return self.warmup.priority_order() if self.warmup is not None else super().priority_order()

    def next_run_estimates(self, now: float, step_time: float,
                           only: Container[str] | None = None) -> dict[str, float]:
        if self.warmup is not None:
            return self.warmup.next_run_estimates(now, step_time, only)
        return super().next_run_estimates(now, step_time, only)

    def service(self, plan: Plan) -> float | None:
        return self.warmup.service(plan) if self.warmup is not None else super().service(plan)

    def on_iteration(self, plan: Plan, duration: float, now: float) -> None:
        idle = self._idle
        for s in plan.scheduled:
            rid = s.request.request_id
            if rid in idle:                                   # not promoted, not finished
                idle.move_to_end(rid)
                idle[rid] = now
        if self.warmup is not None:
            self.warmup.on_iteration(plan, duration, now)
        else:
            super().on_iteration(plan, duration, now)
