"""Gittins-index scheduling with output lengths learned online (beyond the FastServe paper).

MLFQ bets that output lengths are heavy-tailed (a job that has run long will run longer)
and loses to FCFS when they are not; the Gittins index is the optimal non-anticipating
policy for mean response time in both regimes, given the length distribution. This policy
learns that distribution from finished requests (a sliding window per prompt-length
bucket, see learned.py and SchedulerConfig.gittins_*) and the running ones (censored:
Kaplan-Meier, see gittins_table.py), ranks every live request by its
index at the tokens it has generated (gittins_table.py), and runs the highest first.
Where prompt lengths are seen to rank output lengths (templated traffic;
SchedulerConfig.prompt_neighbors, prompt_lengths.py), each request is ranked instead by the
index of its own distribution, that of the finished and running requests with the nearest
prompt lengths: given what is known at arrival, that is the optimal ranking for mean JCT.
Until `gittins_min_samples` requests have finished it is skip-join MLFQ; then the live
requests move over, keeping their KV.

A request idle past the starvation limit (SchedulerConfig.gittins_starvation_threshold,
twice that while the backlog drops are on, stretched by the live requests per batch slot)
runs before every other request until it finishes, as under predictive. Without that bound
the index let requests it ranked low wait out a burst: with a tenth of OPT-13B's KV, p99 JCT
1.6-4.8x fcfs's at 0.75-1.5x of capacity (heavy-tailed and Azure traces), and mean JCT up to
1.22x skip-join's; with it 1.2-1.8x and at most 1.03x (arrival seed 0; two other draws:
misses of up to 1.27x became at most 1.10x, docs/scheduling_log.md, "Gittins gets a
starvation bound").
"""

from __future__ import annotations

from typing import Iterator

from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan
from fastserve_jax.scheduler.gittins_table import GittinsTable
from fastserve_jax.scheduler.learned import LearnedLengthPolicy
from fastserve_jax.scheduler.skip_join import LIGHT_TAIL_CV


class GittinsScheduler(LearnedLengthPolicy):
    name = "gittins"

    def __init__(self, limits, kv, config=None, cost_model=None) -> None:
        super().__init__(limits, kv, config, cost_model)
        self.tables: list[GittinsTable] = []
        self._heavy = False                 # the pooled learned lengths' CV is over LIGHT_TAIL_CV

    def key(self, req: Request) -> float:
        pred = self.by_prompt.get(req.request_id)
        if pred is not None:                         # prompt lengths rank: its own prediction
            return self.prediction_key(req, pred, False)
        table = self.tables[self.bucket(req)]
        return -table.index(len(req.output_token_ids), self.meter.prefill_slots(req))

    def keys(self, reqs: list[Request]) -> list[float]:
        """key() of each, with the requests that still have prefill ahead (after a relearn, most
        of a burst's: they wait unstarted) grouped by table and age and indexed in one numpy
        pass per group (GittinsTable.index_many); the same numbers as key()."""
        out = [0.0] * len(reqs)
        groups: dict[tuple[int, int], list[int]] = {}
        slots = [0.0] * len(reqs)
        by_prompt = self.by_prompt
        for i, req in enumerate(reqs):
            pred = by_prompt.get(req.request_id)
            if pred is not None:
                out[i] = self.prediction_key(req, pred, False)
                continue
            b, age, p = self.bucket(req), len(req.output_token_ids), self.meter.prefill_slots(req)
            if p > 0.0:
                groups.setdefault((b, age), []).append(i)
                slots[i] = p
            else:
                out[i] = -self.tables[b].index(age)
        for (b, age), idx in groups.items():
            for i, g in zip(idx, self.tables[b].index_many(age, [slots[i] for i in idx])):
                out[i] = -g
        return out

    def learn(self) -> None:
        """Rebuild the index tables from the history and the running requests (censored, see
        gittins_table); a bucket with too few finished requests uses the pool."""
        c = self.config
        running = self.running_ages()
        pooled = GittinsTable(self.pooled, [a for ages in running for a in ages])
        self.tables = [GittinsTable(h, r) if len(h) >= c.gittins_min_samples else pooled
                       for h, r in zip(self.history, running)]
        self._heavy = pooled.cv > LIGHT_TAIL_CV
        live = list(self.live_requests())
        self._slots = self.batch_slots(live)
        self.predict_by_prompt(live)

    def drops_to_start(self) -> bool:
        """Skip-join's drops (SkipJoinMLFQScheduler.drops_to_start), where the learned lengths
        are heavier-tailed than LIGHT_TAIL_CV: where memory binds (the device pool holds fewer
        typical requests than max_num_seqs) and more than BACKLOG_PER_SLOT requests per batch
        slot wait unstarted, a new request starts within the device pool, dropping the host
        KV of paused requests ranked below it. With a tenth of OPT-13B's KV the host share
        otherwise filled with started requests that the index had ranked below new ones, and
        the new ones waited: heavy-tailed 3x burst, mean JCT 1.09x the better of fcfs and
        skip-join became 1.03x, latency per token 1.10-1.14x lower in the heavy-tailed and
        chat-like bursts. Not where lengths are alike: there a paused request is nearly done,
        and dropping it cost code completion's bursts 1-3% of throughput and of mean JCT
        (docs/scheduling_log.md, "Gittins drops host KV to start in a backlog")."""
        return self.heavy_bound() and self.backlog_waits()

    def heavy_bound(self) -> bool:
        """Learned lengths heavier-tailed than LIGHT_TAIL_CV, and memory binds the batch
        (Scheduler.host_pools: heavy-tailed lengths, a tenth of OPT-13B's KV, 0.9x / 0.95x of
        capacity: latency per token 177 / 243 ms became 90 / 142 ms with two pools)."""
        return self._heavy and self._slots < self.limits.max_num_seqs

    def starvation_threshold(self) -> float:
        """Twice gittins_starvation_threshold while its backlog drops are on (drops_to_start:
        memory binds, heavy-tailed lengths, a backlog), else the threshold. A promoted request
        runs first until it finishes, and where the pool holds about three requests each
        promotion of a long one holds a third of the machine: heavy-tailed lengths, a tenth
        of OPT-13B's KV, 1.5x / 3x / 8x bursts, mean JCT 83.2 / 134.9 / 184.3 s became 80.6 /
        114.5 / 162.4 s (skip-join's 97.2 / 124.4 / 180.1), p99 JCT 1.30 / 1.04 / 1.06x
        fcfs's became 1.32 / 1.10 / 0.99x; 1.5x and 3x the threshold gave the same. Not
        everywhere: 40 s took the heavy-tailed 0.95x cell's mean JCT from 17.2 to 20.9 s
        (docs/scheduling_log.md, "Gittins waits longer to promote under its backlog drops")."""
        t = self.config.gittins_starvation_threshold
        return 2 * t if self.drops_to_start() else t

    def schedule_ranked(self, now: float) -> Plan:
        """Index order, after the requests promoted for waiting (learned.starving)."""
        front = self.starving(now)
        return self.fill(self.promoted_first, self._worst_first_but(front))

    def priority_order(self) -> Iterator[Request]:
        if self.warmup is not None:
            return self.warmup.priority_order()
        return self.promoted_first(super().priority_order())
