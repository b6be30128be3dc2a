"""FastServe's skip-join MLFQ: a request joins the highest queue whose quantum covers its
prefill time (the queues and their mechanics are mlfq.py's), plus protected decodes, which
the paper does not have (the class docstring). Pure Python."""

from __future__ import annotations

from collections import deque
from typing import Callable

from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, finished_length, pool_slots
from fastserve_jax.scheduler.gittins_table import GittinsTable
from fastserve_jax.scheduler.length_window import LengthWindow, near_done
from fastserve_jax.scheduler.mlfq import MLFQScheduler
from fastserve_jax.scheduler.predicted_joins import PredictedJoins


# Where memory binds the batch, skip-join still protects decodes if at least this share of
# the learned lengths would finish while protected (SkipJoinMLFQScheduler's docstring).
MEMORY_BOUND_COVERAGE = 0.9
# Learned lengths with at most this coefficient of variation (censoring-aware) are light-tailed:
# there new requests start within the device pool only (SkipJoinMLFQScheduler.starts_on_host).
LIGHT_TAIL_CV = 0.75


class SkipJoinMLFQScheduler(MLFQScheduler):
    """FastServe: a request joins the highest queue whose quantum covers its prefill time (with
    prefix caching, that of the tokens past its cached prefix).

    Beyond the paper (SchedulerConfig.protect_decodes): once `protect_min_samples` requests
    have finished, a decoding request is not charged service, so not demoted below newer
    arrivals, while the per-token Gittins index of its age (the output lengths learned as
    gittins learns them: finished ones and running ones as censored) is at least that of
    a fresh request with the median recent prompt. Where lengths are alike (code
    completion) a started request is then nearly done, and demoting it below new arrivals
    made skip-join lose to fcfs; where they vary a lot the index falls soon and MLFQ
    demotes as before. A request whose prefill completes goes back to the queue it joined,
    since that iteration's charge was its prefill, which placed it there. A protected decode
    also moves up past the queues whose fresh requests all have a lower index than its own
    (the first of a queue's fresh requests by index is the one whose prefill just exceeds
    the quantum above), in arrival order: otherwise new requests with shorter prompts, in
    higher queues, take its batch slot (code completion, 8x burst: 0.93-0.95x fcfs's
    latency per token became 0.98-1.00x, throughput 0.976-0.992x became 0.992-0.997x). Once
    a request has been charged as a decode (its index fell below a fresh request's), it is
    not moved up again: the index of an empirical distribution rises and falls with age, and
    lifting on every rise cost the Azure trace at 0.95x of capacity 1.05-1.19x to
    0.99-1.10x.

    Until those finishes (a cold start) every decode is protected: a request, once started,
    keeps its place in the queue its prompt picked, so new arrivals do not push the first
    requests of a burst out of the batch and the first finishes come as soon as under fcfs.
    Under the paper's policy they came late, and with them the lengths to learn from (code
    completion, 1.5x burst: the 16th finish at 17.8 s against fcfs's 9.1 s; 9.7 s with it).

    Where the device pool cannot hold a full batch of typical requests (max_num_seqs x
    (median prompt + mean output); before any output length is known, mean output = median
    prompt), memory, not the batch, bounds what runs, and a protected request that outlives
    its protection has held memory that others could have used: protecting there cost
    throughput (a tenth of OPT-13B's KV, heavy-tailed 3x burst, recompute: 0.935x fcfs's,
    with 50% more recomputed tokens) and latency (light-tailed Azure trace at 0.75x
    capacity: 1.19x better than fcfs became 0.97x). So there it protects only once learned,
    and only if at least MEMORY_BOUND_COVERAGE of the learned lengths end before the index
    first falls below a fresh request's (code completion: 99%; Azure, chat-like and
    heavy-tailed lengths: 27-56%): code completion with a tenth of the KV went from
    0.85-0.95x fcfs's latency per token below capacity to 0.99-1.01x."""

    name = "skip-join-mlfq"
    needs_cost_model = True

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self._require_cost_model()
        c = self.config
        self._lengths = LengthWindow(c.gittins_window)                 # finished output lengths
        self._prompts: deque[int] = deque(maxlen=c.gittins_window)     # prompt lengths of arrivals
        self._new_finishes = 0
        self._table: GittinsTable | None = None   # None: no index (not learned, or memory binds)
        self._learned = False
        self._cold = False                 # not learned yet, and a batch fits: every decode protected
        self._cold_prompts = 0             # len(self._prompts) when _cold was last decided
        self._fresh_index = 0.0            # the per-token index of a fresh request, median prompt
        self._level_index: list[float] = []
        self._slots = 0
        self._lapsed: set[str] = set()     # charged as a decode since learning: never lifted again
        self._memory_bound = False         # the device pool holds no full batch of typical requests
        self._near_done: list[bool] = []   # [age]: expected remaining length <= the mean (tail guard)
        self._tail_pace = 0.0              # seconds per token below which the tail guard steps in
        self._guarded: set[str] = set()    # behind the tail guard's pace: top queue, uncharged
        self._entry_levels: dict[int, int] = {}   # prompt tokens to prefill -> entry_level
        self._cached: dict[str, int] = {}         # prefix caching: tokens a request found cached when added
        self._light = False                # learned lengths light-tailed and a batch fits (starts_on_host)
        self._mean_len = 0.0               # the learned mean output length (tokens)
        self._cv = 0.0                     # the learned lengths' coefficient of variation
        k = c.prompt_neighbors if c.protect_decodes else 0
        self.joins = PredictedJoins(c.gittins_window, k) if k else None     # predicted_joins.py

    def use_cost_model(self, cost_model, config) -> None:
        super().use_cost_model(cost_model, config)
        self._entry_levels.clear()
        self._learned = False      # a fresh request's index and the queues' depend on both: relearn

    def entry_level(self, req: Request) -> int:
        level = self.joins.levels.get(req.request_id) if self.joins is not None else None
        if level is not None:                          # joined on its predicted service
            return level
        # the prefill it needs: with prefix caching, the tokens past its cached prefix (as found
        # when it was added, or as its start found them)
        n = req.num_prompt_tokens - max(self._cached.get(req.request_id, 0), req.num_cached_tokens)
        level = self._entry_levels.get(n)
        if level is None:                  # asked per protected decode per iteration: kept per prompt length
            t = self.cost_model.prefill_time(n)
            level = next((i for i, q in enumerate(self.quanta) if q >= t), len(self.quanta) - 1)
            self._entry_levels[n] = level
        return level

    def add(self, req: Request) -> None:
        if self.kv.caching:
            self._cached[req.request_id] = self.kv.cached_prefix(req)[0]
        if self.joins is not None and self.joins.ranks():
            self.joins.place([req], self.quanta, self.cost_model, self.limits.max_num_seqs)
        super().add(req)
        self._prompts.append(req.num_prompt_tokens)

    def remove(self, req: Request) -> None:
        super().remove(req)
        self._cached.pop(req.request_id, None)
        self._lapsed.discard(req.request_id)
        self._guarded.discard(req.request_id)
        n = finished_length(req)
        if self.joins is not None:
            self.joins.levels.pop(req.request_id, None)
            if n:
                self.joins.finished(req, n)
        if n:
            self._lengths.observe(n)
            self._new_finishes += 1
            if self._lengths.settle(self.config.protect_min_samples):
                self._new_finishes = self.config.gittins_refresh       # relearn from this run's own

    def schedule(self, now: float) -> Plan:
        c = self.config
        if not c.protect_decodes:
            self._cold = False
        elif self._prompts:
            if len(self._lengths) >= c.protect_min_samples and (
                    self._new_finishes >= c.gittins_refresh or not self._learned):
                self.learn()
            elif not self._learned and len(self._prompts) != self._cold_prompts:
                self._cold_prompts = len(self._prompts)
                prompt = self._median_prompt()
                self._cold = self._batch_fits(prompt, prompt)
                self._memory_bound = not self._cold
        if self.joins is not None and self.joins.finishes >= c.gittins_refresh:
            self._restore(self.joins.refresh(self._live.values(), self.entry_level, self.quanta, self.cost_model,
                                             self.limits.max_num_seqs))
        return super().schedule(now)

    def drops_to_start(self) -> bool:
        """Where memory binds and decodes are not protected (see the class docstring), and more
        than BACKLOG_PER_SLOT requests per batch slot wait unstarted: new requests start within
        the device pool, dropping the host KV of paused requests ranked below them
        (batch.fill_batch). Proactive swapping otherwise starts requests on the strength of the
        host pool too, and with a tenth of OPT-13B's KV that share filled up with paused,
        lower-ranked requests while new ones waited: in the chat-like 1.5x burst the first
        tokens came after 78 s on average against 39 s under recompute, which dropped those
        requests instead (latency per token 1.18x fcfs's against 1.90x; heavy-tailed 3x 1.56x
        against 2.04x). Below capacity that recomputation costs more than the host copies
        (heavy-tailed at 0.75x: 1.20x against 3.53x when dropping at any backlog, 0.95x:
        1.72x against 1.93x with a backlog of one per slot), hence the backlog. With full
        device KV the host share is what lets proactive swapping start enough requests
        (heavy-tailed 8x burst: 2.60x, 1.52x when dropping), hence the memory bound. Where
        decodes are protected (code completion) the paused requests hold long prompts and
        are nearly done, and dropping them cost 1-3% (bursts 1.02-1.07x fcfs's became
        1.00-1.04x, throughput 0.975-0.989x). Reactive swapping's start bound is the device
        pool already, host KV counted in it, and the drops apply there too (three seeds,
        bursts: heavy-tailed 1.21-1.41x fcfs's latency per token became 1.45-2.28x,
        chat-like 1.03-1.05x became 1.45-1.74x, Azure 1.63-1.80x became 1.63-1.73x)."""
        return self._memory_bound and self._table is None and self.backlog_waits()

    def kept_from_starts(self) -> Callable[[Request], bool] | None:
        """Where memory binds and decodes are protected (code completion), a new request does not
        evict a protected decode to start: that decode is expected to finish within its
        protection, and evicting it moves its whole context to the host and back (or drops it)
        for a start that could wait a few iterations, a cost the index comparison does not
        see. Code completion with a tenth of OPT-13B's KV: 0.990x / 0.986x fcfs's latency per
        token at 0.75x / 0.95x of capacity became 1.016x / 1.023x (seeds 1 and 2, below
        capacity: 0.976-1.079x became 0.992-1.084x), throughput unchanged; the p99 JCT at 0.95x
        rose from 1.29x to 1.59x fcfs's (seed 0). Requests that hold KV may still evict them,
        so the best-ranked holder can always run."""
        return self.protected if self._memory_bound and self._table is not None else None

    def start_headroom(self) -> int | None:
        """Where memory binds, once learned: the blocks the requests that fit at once grow by,
        batch_slots() x the mean learned length, where that is less than batch.START_HEADROOM
        of the start bound. Code completion with a tenth of OPT-13B's KV under recompute:
        0.982 / 0.969 / 0.950 / 0.939x fcfs's latency per token at 0.5-0.95x of capacity
        became 1.001 / 1.011 / 1.026 / 1.015x, bursts 0.985-1.048x became 1.056-1.067x,
        throughput 0.985-0.990x became 1.002-1.006x (the fixed 1/16 of a 371-block pool is a
        fifth of a request there); proactive moved by at most 1.6% (1.5x burst). Not where
        memory does not bind: with full device KV the smaller headroom moved the chat-like
        3x burst from 1.64x to 1.57x."""
        if not (self._learned and self._memory_bound):
            return None
        return -(-int(self.batch_slots() * self._mean_len) // self.kv.block_size)

    def starts_on_host(self) -> bool:
        """Not once the learned lengths are light-tailed (coefficient of variation at most
        LIGHT_TAIL_CV, from the censoring-aware table) while the device pool holds a full
        batch. There a started request never expects to need more than a fresh one, so
        starting new requests past the device pool only pauses work nearly done for work just
        begun, to the host and back (docs/scheduling.md). Azure trace, bursts of 1.5x / 3x /
        8x, three seeds: latency per token 1.26-1.47x better than fcfs's became 1.35-1.57x
        and mean JCT 0.98-1.23x fcfs's became 0.89-1.02x. Heavier tails keep the host share:
        it is what lets short new requests through (chat-like 3x burst: 1.51-1.62x with it,
        1.16-1.18x without)."""
        return self.start_on_host and not self._light

    def heavy_bound(self) -> bool:
        """Once learned: memory binds and the learned lengths' CV is over LIGHT_TAIL_CV."""
        return self._learned and self._memory_bound and self._cv > LIGHT_TAIL_CV

    def batch_slots(self) -> int:
        """Once learned: the typical requests (median prompt + mean output) the device pool
        holds, at most max_num_seqs. Where memory binds, that many run at once, and
        stretching the starvation limit by max_num_seqs instead promoted paused requests so
        often that the few that fit were the long ones, promoted again and again, and every
        new request waited as under fcfs (heavy-tailed lengths, a tenth of OPT-13B's KV, 1.5x
        burst: TTFT 160 s against fcfs's 159 s, gittins 85 s)."""
        return self._slots or self.limits.max_num_seqs

    def _median_prompt(self) -> int:
        return sorted(self._prompts)[len(self._prompts) // 2]

    def _pool_tokens(self) -> int:
        return self.kv.num_usable_blocks * self.kv.block_size

    def _batch_fits(self, prompt: float, output: float) -> bool:
        """Whether the device pool holds max_num_seqs requests of these lengths (tokens)."""
        return self._pool_tokens() >= self.limits.max_num_seqs * (prompt + output)

    def learned_lengths(self) -> dict:
        """What a restart keeps (policy_state.py): the finished lengths, in the format gittins
        writes with a single prompt-length bucket, so either policy can read the other's; with
        joins on predicted service, the (prompt, length) pairs, as gittins and predictive keep them."""
        state = {"edges": [], "history": [list(self._lengths)], "pooled": list(self._lengths)}
        if self.joins is not None:
            state["prompts"] = self.joins.model.pairs()
        return state

    def restore_lengths(self, state: dict) -> None:
        """Start from the lengths a previous run learned (ValueError if they are not lengths),
        until protect_min_samples of this run's own have finished (length_window.py). A prior
        alone does not end the cold start's protection where it says memory binds and decodes
        cannot be protected (learn): on the demo model with 23 blocks for 16 sequences, a prior
        of longer traffic made skip-join rotate and drop requests for 188 of ~510 iterations
        of a burst, recomputing 7,400-8,000 tokens, 0.60-0.88x fcfs's throughput."""
        pooled = state.get("pooled")
        if not isinstance(pooled, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                   for x in pooled):
            raise ValueError("learned lengths must be a list of integers >= 1")
        if self.joins is not None and "prompts" in state:     # a prior too (prompt_lengths.py)
            self.joins.model.restore(state["prompts"])
            self.joins.model.refresh()
        self._lengths.restore(pooled)

    def learn(self) -> None:
        """The per-token Gittins table of the learned lengths, and a fresh request's index."""
        running = [len(r.output_token_ids) for r in self._live.values() if r.output_token_ids]
        table = GittinsTable(self._lengths, running, per_token=True)
        prompt = self._median_prompt()
        self._slots = pool_slots(self.kv, self.limits.max_num_seqs, prompt, table.mean)
        self._new_finishes = 0
        self._learned, self._cold = True, False
        self._near_done = near_done(self._lengths)
        self._mean_len = table.mean
        seqs = self.limits.max_num_seqs
        self._tail_pace = self.config.tail_slowdown * self.cost_model.decode_time(seqs)
        slot = self.cost_model.decode_time(seqs) / seqs
        fresh = table.index(0, self.cost_model.prefill_time(prompt) / slot)
        self._memory_bound = not self._batch_fits(prompt, table.mean)
        self._light = not self._memory_bound and table.cv <= LIGHT_TAIL_CV
        self._cv = table.cv
        if self._memory_bound:
            until = next((a for a in range(table.max_len) if table.index(a) < fresh), table.max_len)
            if 1.0 - table.surv[until] < MEMORY_BOUND_COVERAGE:      # P(X <= until): finished while protected
                self._table = None             # memory binds the batch: see the class docstring
                if self._lengths.prior and self._batch_fits(prompt, prompt):
                    # a restored prior alone does not end the cold start's protection (restore_lengths)
                    self._cold, self._memory_bound = True, False
                return
        self._table = table
        self._fresh_index = fresh
        # _level_index[L]: the highest index of a fresh request that joins queue L, the one
        # whose prefill just exceeds the quantum of the queue above
        self._level_index = [table.index(0, (self.quanta[i - 1] if i else 0.0) / slot)
                             for i in range(len(self.quanta))]
        moves = []                                     # demoted before they were known to be protected
        for req in self._live.values():
            if req.output_token_ids and self.protected(req):
                level = self._lift_level(req) if req.request_id not in self._lapsed else self.entry_level(req)
                if req.queue_level > level:
                    moves.append((req, level))
        self._restore(moves)

    def _lift_level(self, req: Request) -> int:
        """Where a protected decode moves: the highest queue whose fresh requests all have an
        index at most its own, never below the queue its prompt picked."""
        g = self._table.index(len(req.output_token_ids))
        level = next((i for i, x in enumerate(self._level_index) if x <= g), len(self.quanta) - 1)
        return min(level, self.entry_level(req))

    def _restore(self, moves: list[tuple[Request, int]]) -> None:
        """Put each request back into its level where its arrival places it among the requests
        there (ahead of the newer ones), not at the back as a demotion does. One pass per level."""
        into: dict[int, list[Request]] = {}
        for req, level in moves:
            self._take(req, level)
            into.setdefault(level, []).append(req)
        for level, reqs in into.items():
            reqs.sort(key=lambda r: r.arrival_time)
            new: dict[str, Request] = {}
            i = 0
            for k, r in self.queues[level].items():
                while i < len(reqs) and reqs[i].arrival_time < r.arrival_time:
                    new[reqs[i].request_id] = reqs[i]
                    i += 1
                new[k] = r
            for req in reqs[i:]:
                new[req.request_id] = req
            self.queues[level] = new

    def protected(self, req: Request) -> bool:
        """A decoding request whose index is still at least a fresh request's (any decoding
        request during a cold start)."""
        if self._cold:
            return bool(req.output_token_ids)
        age = len(req.output_token_ids)
        table = self._table
        return table is not None and age < table.max_len and table.index(age) >= self._fresh_index

    def promote_starving(self, now: float) -> None:
        super().promote_starving(now)
        # a limit of 0 is "never starving" (no promotion): every request counted as past it,
        # so the guard took them all to the top queue, uncharged (fcfs's figures; until 2026-12-07)
        if self._near_done and self._tail_pace > 0 and self.starvation_limit() > 0:
            self._guard_tail(now)

    def _guard_tail(self, now: float) -> None:
        """The tail guard (SchedulerConfig.tail_slowdown; docs/scheduling_log.md, "The tail
        guard"): a request older than the starvation limit that has produced fewer tokens
        than its age allows at `tail_slowdown` times a full batch's decode time per token,
        and that the learned lengths expect to need no more than a fresh request, runs from
        the top queue, uncharged, until it has caught up. Walks the live requests in the
        order they were added (their arrival order) and stops at the first one younger than
        the limit."""
        limit = self.starvation_limit()
        for rid in [r for r in self._guarded if now - self._live[r].arrival_time <= limit]:
            self._guarded.discard(rid)          # the limit grew past its age: guarded no more
        pace, near, guarded = self._tail_pace, self._near_done, self._guarded
        for rid, req in self._live.items():
            age = now - req.arrival_time
            if age <= limit:
                break
            n = len(req.output_token_ids)
            if age > pace * (n + 1) and (n >= len(near) or near[n]):
                if rid not in guarded:
                    guarded.add(rid)
                    if req.queue_level != 0:
                        self._move(req, 0)
            else:
                guarded.discard(rid)

    def charge(self, req: Request, num_tokens: int, duration: float) -> bool:
        if req.request_id in self._guarded:
            return False
        if self._table is None and not self._cold:
            return super().charge(req, num_tokens, duration)
        if num_tokens > 1 and req.is_prefilling:
            # A chunk after which the prefill goes on: not charged while decodes are protected
            # (the queue was picked for the whole prefill; the chunk's iteration also ran other
            # work; docs/scheduling_log.md, "Unfinished prefill chunks go uncharged").
            return False
        if num_tokens > 1:                                  # its prefill completed
            level = self.entry_level(req)
            # a recomputation (its KV dropped) keeps the level it had: it was lifted back to its
            # entry queue, ahead of a fresh request, or a promotion for waiting undone (2026-12-07)
            if req.queue_level != level and not req.num_preemptions:
                self._restore([(req, level)])
            return False
        if num_tokens == 1 and self.protected(req):
            if self._table is not None and req.request_id not in self._lapsed:
                level = self._lift_level(req)
                if req.queue_level > level:
                    self._restore([(req, level)])
            return False
        if self._table is not None and num_tokens == 1:
            self._lapsed.add(req.request_id)
        return super().charge(req, num_tokens, duration)
