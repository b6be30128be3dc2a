"""Unit tests of the preemptive policies on literal scenarios. No model, no jax."""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve_jax.config import SamplingParams, SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.kv_plan import apply_plan
from fastserve_jax.request import Request
from fastserve_jax.scheduler import POLICIES, Limits, make_scheduler
from fastserve_jax.scheduler import gittins_table
from fastserve_jax.scheduler.gittins_table import GittinsTable
from fastserve_jax.sim import advance

# prefill: 10 ms per 100 tokens (at least 10 ms); decode: 10 ms per iteration at any batch
COST = CostModel("literal", prefill_tokens=(1, 100, 10_000), prefill_seconds=(0.01, 0.01, 1.0),
                 decode_batch=(1,), decode_seconds=(0.01,))
# the paper's mechanics (protected decodes have their own tests below)
CFG = SchedulerConfig(base_quantum=0.01, quantum_ratio=2.0, num_queues=5, starvation_threshold=0, protect_decodes=False)


def req(rid: str, prompt_len: int, t: float = 0.0, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens), t)


def make(policy="skip-join-mlfq", seqs=4, budget=1000, num_blocks=1000, block_size=4, cfg=CFG):
    kv = KVManager(num_blocks, block_size)
    return make_scheduler(policy, Limits(seqs, budget), kv, cfg, COST), kv


def run(sched, kv, now=0.0, duration=0.01):
    """schedule + apply like the engine; returns [(id, n)] scheduled."""
    plan = sched.schedule(now)
    apply_plan(plan, kv, now)
    for r in advance(plan, now + duration):
        kv.free(r)
        sched.remove(r)
    sched.on_iteration(plan, duration, now + duration)
    kv.check_integrity()
    return [(s.request.request_id, s.num_tokens) for s in plan.scheduled], plan


def levels(sched):
    return [[r.request_id for r in q.values()] for q in sched.queues]


# -- skip-join MLFQ -------------------------------------------------------------------------------
def test_skip_join_places_by_prefill_time():
    sched, _ = make()          # quanta 10, 20, 40, 80, 160 ms
    for rid, n in [("a", 50), ("b", 150), ("c", 300), ("d", 700), ("e", 9000)]:
        sched.add(req(rid, n))
    # prefill 10 ms -> q0, 15 ms -> q1 (20 ms), 30 ms -> q2 (40), 70 ms -> q3 (80), 900 ms -> last queue
    assert levels(sched) == [["a"], ["b"], ["c"], ["d"], ["e"]]
    plain, _ = make("mlfq")
    for rid, n in [("a", 50), ("e", 9000)]:
        plain.add(req(rid, n))
    assert levels(plain) == [["a", "e"], [], [], [], []]


def test_a_request_whose_move_was_cut_short_is_removed():
    """An exception between taking a request out of its queue and putting it into the next
    (a caller's signal handler in skip-join's _restore) left it in none: its abort raised
    KeyError, so LLM.generate aborted none of the requests after it, live for good; one in a
    queue but not in the live set (an add cut short) stayed there, and the next schedule took
    it (a probe, 2026-12-07). remove finds it wherever it is, or nowhere, as often as asked."""
    for policy in ("skip-join-mlfq", "mlfq"):
        sched, _ = make(policy)
        a, b = req("a", 50), req("b", 9000)
        sched.add(a)
        sched.add(b)
        sched._take(a, 2)                   # out of q0, bound for q2, never put there
        sched.remove(a)
        sched.remove(b)
        assert levels(sched) == [[]] * 5 and not list(sched.best_first())
        # an add cut short after the queue took it (the live set did not), then its undo
        c = req("c", 50)
        sched.queues[0]["c"] = c
        sched.remove(c)
        sched.remove(c)                     # again: a remove that raised runs again
        assert levels(sched) == [[]] * 5 and len(sched) == 0


def test_skip_join_needs_a_cost_model():
    with pytest.raises(ValueError, match="cost model"):
        make_scheduler("skip-join-mlfq", Limits(4, 100), KVManager(10, 4), CFG)


def test_fifo_within_a_queue_and_runner_keeps_its_place():
    sched, kv = make(seqs=1)
    a, b = req("a", 10, 0.0), req("b", 10, 0.1)
    sched.add(a)
    sched.add(b)
    assert run(sched, kv, duration=0.004)[0] == [("a", 10)]   # 4 ms < q0: a stays in front of b
    assert levels(sched)[0] == ["a", "b"]
    assert run(sched, kv, duration=0.004)[0] == [("a", 1)]
    assert run(sched, kv, duration=0.004)[0] == [("a", 1)]    # 12 ms > 10 ms: demoted after this one
    assert levels(sched)[:2] == [["b"], ["a"]]
    assert run(sched, kv)[0] == [("b", 10)]


def test_demotion_goes_to_the_back_of_the_next_queue_and_resets_service():
    sched, kv = make(seqs=2, cfg=SchedulerConfig(protect_decodes=False, base_quantum=0.01, num_queues=3, starvation_threshold=0))
    a, b, c = req("a", 150, 0.0, 50), req("b", 150, 0.0, 50), req("c", 50, 0.0, 50)
    for r in (a, b, c):
        sched.add(r)                  # a, b -> q1 (20 ms), c -> q0
    assert levels(sched) == [["c"], ["a", "b"], []]
    run(sched, kv, duration=0.015)    # c and a run; c exceeds q0 -> back of q1, behind b
    assert levels(sched) == [[], ["a", "b", "c"], []]
    assert c.attained_service == 0.0 and a.attained_service == pytest.approx(0.015)
    run(sched, kv, duration=0.015)    # a (30 ms > 20) is demoted to q2; b (15 ms) stays
    assert levels(sched) == [[], ["b", "c"], ["a"]]
    for _ in range(5):
        run(sched, kv, duration=0.05)  # nothing falls below the last queue
    assert a.queue_level == 2 and len(sched.queues) == 3


def test_starvation_promotes_to_the_top_queue():
    cfg = SchedulerConfig(protect_decodes=False, base_quantum=0.01, num_queues=3, starvation_threshold=1.0)
    sched, kv = make(seqs=1, cfg=cfg)
    old, new = req("old", 10, 0.0, 100), req("new", 10, 0.0, 100)
    sched.add(old)
    run(sched, kv, now=0.0, duration=0.02)           # old: 20 ms > q0 -> q1
    sched.add(new)
    assert run(sched, kv, now=0.02, duration=0.002)[0] == [("new", 10)]
    assert levels(sched) == [["new"], ["old"], []]
    assert run(sched, kv, now=0.5, duration=0.002)[0] == [("new", 1)]   # old idle 0.48 s: waits
    # 2 live requests share 1 slot: the 1 s threshold stretches to 2 s (MLFQScheduler.starvation_limit)
    assert run(sched, kv, now=1.1, duration=0.002)[0] == [("new", 1)]   # old idle 1.08 s < 2 s: waits
    assert levels(sched) == [["new"], ["old"], []]
    ids, _ = run(sched, kv, now=2.1, duration=0.002)                     # old idle 2.08 s > 2 s
    assert ids == [("new", 1)] and levels(sched) == [["new", "old"], [], []]
    assert old.attained_service == 0.0


def test_starving_job_that_never_ran_counts_from_arrival():
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=3, starvation_threshold=1.0)
    sched, kv = make(seqs=1, cfg=cfg)
    big = req("big", 300, 0.0, 10)                    # skip-joins q2
    sched.add(big)
    sched.add(req("small", 10, 0.0, 100))
    sched.schedule(1.2)                               # 2 live, 1 slot: the limit is 2 s
    assert levels(sched)[2] == ["big"]
    sched.schedule(2.2)
    assert levels(sched)[0] == ["small", "big"]


# -- preemption, budget, KV ----------------------------------------------------------------------
def test_preempted_job_keeps_kv_and_resumes_without_recompute():
    sched, kv = make(seqs=1)
    a = req("a", 10, 0.0, 50)
    sched.add(a)
    run(sched, kv, duration=0.02)                 # prefill; a is demoted to q1
    blocks = list(kv.block_table(a))
    b = req("b", 10, 0.1, 3)
    sched.add(b)
    for expect in ([("b", 10)], [("b", 1)], [("b", 1)]):    # b preempts a between iterations
        ids, plan = run(sched, kv, duration=0.001)
        assert ids == expect and not plan.preempted
        assert a.num_computed_tokens == 10 and kv.block_table(a) == blocks
    assert b.finished
    assert run(sched, kv)[0] == [("a", 1)]        # resumes with its next decode token
    assert kv.block_table(a)[:len(blocks)] == blocks


def test_token_budget_chunks_prefill_and_bounds_the_batch():
    sched, kv = make(seqs=8, budget=16, cfg=SchedulerConfig(base_quantum=10.0, starvation_threshold=0))
    for i, n in enumerate([20, 5, 30]):
        sched.add(req(f"r{i}", n, 0.0))
    ids, plan = run(sched, kv)
    assert ids == [("r0", 16)] and plan.num_tokens == 16
    ids, plan = run(sched, kv)
    assert ids == [("r0", 4), ("r1", 5), ("r2", 7)] and plan.num_tokens == 16
    ids, _ = run(sched, kv)
    assert ids == [("r0", 1), ("r1", 1), ("r2", 14)]


def test_decodes_ranked_below_a_prefill_that_takes_the_budget_still_run():
    sched, kv = make(seqs=4, budget=16, cfg=SchedulerConfig(protect_decodes=False, base_quantum=0.01, num_queues=3, starvation_threshold=0))
    old = req("old", 4, 0.0, 100)
    sched.add(old)
    run(sched, kv, duration=0.05)                     # prefilled, demoted below the top queue
    run(sched, kv, duration=0.05)
    sched.add(req("new", 40, 0.1))                    # ranks first and wants the whole budget
    ids, plan = run(sched, kv, now=0.1)
    assert ids == [("new", 15), ("old", 1)] and plan.num_tokens == 16


def test_max_num_seqs_bounds_the_batch():
    sched, kv = make(seqs=2)
    for i in range(5):
        sched.add(req(f"r{i}", 3, 0.0))
    assert [rid for rid, _ in run(sched, kv)[0]] == ["r0", "r1"]


def test_memory_pressure_evicts_lowest_paused_and_does_not_start_what_does_not_fit():
    # 6 usable blocks of 4 tokens
    sched, kv = make(seqs=1, num_blocks=7, block_size=4, cfg=SchedulerConfig(protect_decodes=False, base_quantum=0.01, num_queues=3,
                                                                            starvation_threshold=0))
    a, b = req("a", 8, 0.0, 50), req("b", 8, 0.0, 50)
    sched.add(a)
    sched.add(b)
    run(sched, kv, duration=0.05)      # a prefilled (2 blocks), demoted to q1
    run(sched, kv, duration=0.05)      # b prefilled (2 blocks), demoted to q1 behind a
    c = req("c", 12, 0.1, 50)          # needs 3 blocks, 2 free: does not start
    sched.add(c)
    ids, plan = run(sched, kv, duration=1e-4)
    assert ids == [("a", 1)] and not plan.preempted and c.num_computed_tokens == 0
    for _ in range(20):                # a grows into the free blocks; c never fits
        ids, plan = run(sched, kv, duration=1e-4)
        if plan.preempted:
            break
        assert ids == [("a", 1)] and c.num_computed_tokens == 0
    # the pool is full and a needs another block: b (paused, ranked below a) loses its KV
    assert plan.preempted == [b] and ids == [("a", 1)]
    assert b.num_computed_tokens == 0 and not kv.block_table(b) and len(kv.block_table(a)) == 5


def test_the_walk_ends_once_nothing_new_may_start_and_every_kv_holder_was_walked():
    from fastserve_jax.scheduler.batch import fill_batch
    kv = KVManager(num_blocks=9, block_size=4)        # 8 usable blocks
    old = req("old", 8, 0.0, 50)
    kv.allocate(old, 8)
    old.num_computed_tokens = 8
    old.output_token_ids.append(5)                    # decoding: one token pending, one block more
    ahead = [req(f"w{i}", 40) for i in range(50)]     # 10 blocks each: none can start
    behind = [req(f"v{i}", 40) for i in range(50)]
    walked = []

    def best_first():
        for r in ahead + [old] + behind:              # the holder ranks below a long waiting queue
            walked.append(r.request_id)
            yield r

    plan = fill_batch(best_first(), iter([old, *reversed(ahead + behind)]), Limits(4, 64), kv)
    assert [(s.request.request_id, s.num_tokens) for s in plan.scheduled] == [("old", 1)]
    assert walked == [r.request_id for r in ahead] + ["old", "v0"]    # stopped at the first one behind


def test_a_queue_walk_narrows_to_kv_holders_once_nothing_new_may_start():
    """MLFQ's walk (batch.QueueWalk): once the first waiting request cannot start, fill_batch
    narrows the rest of the walk to the requests holding KV, within the current level and
    the ones below, so the waiting requests above paused ones are not walked one by one."""
    from fastserve_jax.scheduler.batch import QueueWalk, fill_batch
    kv = KVManager(num_blocks=9, block_size=4)        # 8 usable blocks
    holders = [req("old", 8, 0.0, 50), req("low", 4, 0.0, 50)]
    for r in holders:
        kv.allocate(r, r.num_prompt_tokens)
        r.num_computed_tokens = r.num_prompt_tokens
        r.output_token_ids.append(5)                  # decoding
    waiting = [req(f"w{i}", 40) for i in range(60)]   # 10 blocks each: none can start
    levels = [{r.request_id: r for r in waiting[:20]},
              {r.request_id: r for r in waiting[20:40] + [holders[0]] + waiting[40:50]},
              {r.request_id: r for r in waiting[50:] + [holders[1]]}]
    walked = []

    class Counted(QueueWalk):
        def __iter__(self):
            for r in super().__iter__():
                walked.append(r.request_id)
                yield r

    worst = [r for level in reversed(levels) for r in reversed(level.values())]
    plan = fill_batch(Counted(levels, kv.where), iter(worst), Limits(4, 64), kv)
    assert [s.request.request_id for s in plan.scheduled] == ["old", "low"]
    assert walked == ["w0", "w1", "old", "low"]       # w1 was taken before the walk narrowed
    # the same plan from a plain walk over every request
    plain = fill_batch(iter([r for level in levels for r in level.values()]), iter(worst), Limits(4, 64), kv)
    assert [(s.request.request_id, s.num_tokens) for s in plain.scheduled] == \
        [(s.request.request_id, s.num_tokens) for s in plan.scheduled]


def test_the_decode_lookahead_counts_only_requests_that_could_run():
    """After a prefill chunk takes the whole token budget, fill_batch looks DECODE_LOOKAHEAD
    batches further for decodes. Once no new request may start, the waiting requests in that
    stretch are not counted: a decode ranked below 70 of them still runs, taking a token
    from the chunk (it did not when they counted)."""
    from fastserve_jax.scheduler.batch import DECODE_LOOKAHEAD, fill_batch
    kv = KVManager(num_blocks=200, block_size=4)
    big = req("big", 1000)                            # 250 blocks: cannot start
    chunked = req("chunked", 400, 0.0, 50)            # prefilling, 100 tokens done
    kv.allocate(chunked, 100)
    chunked.num_computed_tokens = 100
    dec = req("dec", 8, 0.0, 50)
    kv.allocate(dec, 8)
    dec.num_computed_tokens = 8
    dec.output_token_ids.append(5)
    waiting = [req(f"w{i}", 40) for i in range(DECODE_LOOKAHEAD * 4 + 6)]
    order = [big, chunked, *waiting, dec]
    plan = fill_batch(iter(order), iter(order[::-1]), Limits(4, 64), kv)
    assert [(s.request.request_id, s.num_tokens) for s in plan.scheduled] == [("chunked", 63), ("dec", 1)]


def test_evicts_from_the_bottom_only_below_the_requester():
    # 8 usable blocks; new requests start while started KV stays within 7 of them
    sched, kv = make(seqs=3, num_blocks=9, block_size=4, cfg=SchedulerConfig(base_quantum=100, num_queues=2,
                                                                            starvation_threshold=0))
    rs = [req(f"r{i}", 7, 0.0, 50) for i in range(3)]
    for r in rs:
        sched.add(r)
    run(sched, kv)                              # prefill: 3 x 2 blocks
    run(sched, kv)                              # 8th token: still 2 blocks each
    ids, plan = run(sched, kv)                  # 9th: r0 and r1 take the last 2 blocks; r2, the lowest, waits
    assert ids == [("r0", 1), ("r1", 1)] and not plan.preempted and kv.num_free_blocks == 0
    for _ in range(3):                          # tokens 10-12 fit in their 3rd blocks
        run(sched, kv)
    ids, plan = run(sched, kv)                  # 13th: r0 evicts the lowest paused request, r2
    assert plan.preempted == [rs[2]] and ids == [("r0", 1), ("r1", 1)]


def test_no_new_request_starts_where_a_kv_holder_evicted_in_vain():
    """x decodes; a, mid-prefill, needs 4 more blocks; 1 is free and b, paused below, holds 2.
    a evicts b and still does not fit. c, new and behind a, then started in b's blocks: a
    newer request took what a evicted for (found by a probe, 2026-12-07). b's eviction stands
    (a takes the blocks as more free up), but nothing new starts in this iteration."""
    sched, kv = make(policy="mlfq", seqs=8, budget=16, num_blocks=10, block_size=4,
                     cfg=SchedulerConfig(base_quantum=100, num_queues=3, starvation_threshold=0))

    def holding(rid, prompt_len, computed, outputs=0):
        r = req(rid, prompt_len, 0.0, 50)
        sched.add(r)
        kv.allocate(r, computed)
        r.num_computed_tokens, r.output_token_ids = computed, list(range(outputs))
        return r

    x, a = holding("x", 14, 14, outputs=1), holding("a", 24, 8)
    c = req("c", 3, 0.5, 50)
    sched.add(c)
    b = holding("b", 8, 8, outputs=1)
    sched._move(b, 1)
    assert kv.num_free_blocks == 1 and levels(sched) == [["x", "a", "c"], ["b"], []]
    plan = sched.schedule(1.0)
    assert [s.request for s in plan.scheduled] == [x] and plan.preempted == [b]
    assert c.num_computed_tokens == 0 and len(kv.block_table(a)) == 2


# -- Gittins ---------------------------------------------------------------------------------------
def test_gittins_index_of_literal_distributions():
    det = GittinsTable([100] * 10)                     # known length: index = 1 / remaining
    assert det.index(0) == pytest.approx(1 / 100) and det.index(60) == pytest.approx(1 / 40)
    two = GittinsTable([1, 100])                       # heavy tail: young jobs first
    assert two.index(0) == pytest.approx(0.5)          # finish with p=1/2 after 1 token
    assert two.index(1) == pytest.approx(1 / 99)       # survived: certainly 99 more
    assert two.index(0, prefill_slots=10) == pytest.approx(max(0.5 / 11, 1 / (10 + 50.5)))
    assert det.index(100) < det.index(99)              # beyond all history: ranked last


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=60))
def test_gittins_table_sweep_equals_the_definition(lengths):
    """The O(m) hull sweep against G(a) = max_{b > a} (F(b) - F(a)) / (S(b) - S(a)) written out."""
    m = max(lengths)
    n = len(lengths)
    F = [sum(x <= b for x in lengths) / n for b in range(m + 1)]
    S = [sum(min(x, b) for x in lengths) / n for b in range(m + 1)]
    table = GittinsTable(lengths)
    for a in range(m):
        want = max((F[b] - F[a]) / (S[b] - S[a]) for b in range(a + 1, m + 1))
        assert table.index(a) == pytest.approx(want, rel=1e-9)
        p = 3.5
        want_p = max((F[b] - F[a]) / (p * (1 - F[a]) + S[b] - S[a]) for b in range(a + 1, m + 1))
        assert table.index(a, p) == pytest.approx(want_p, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=60), st.lists(st.integers(0, 90), max_size=20),
       st.lists(st.floats(1e-3, 500.0), min_size=1, max_size=40), st.integers(0, 95))
def test_gittins_index_many_is_index_of_each(lengths, censored, slots, age):
    """The batched index (what a relearn re-keys a burst's waiting requests with) gives exactly
    the numbers index() gives, past the longest length too."""
    table = GittinsTable(lengths, censored)
    assert table.index_many(age, slots, chunk=7) == [table.index(age, p) for p in slots]


def test_gittins_rekeys_every_request_as_its_key_says():
    cfg = SchedulerConfig(starvation_threshold=0, gittins_min_samples=1, gittins_bucket_edges=(20,))
    sched, kv = make("gittins", seqs=2, cfg=cfg)
    for i, n in enumerate((3, 9, 30, 4, 50)):                  # history in both prompt buckets
        sched.add(req(f"h{i}", 5 + 20 * (i % 2), 0.0, n))
    while len(sched):
        run(sched, kv)
    reqs = [req(f"r{i}", 3 + 11 * i, 0.0, 200) for i in range(8)]
    for r in reqs:
        sched.add(r)
    for _ in range(6):                                          # some start decoding, some wait
        run(sched, kv)
    reqs[-1].output_token_ids.extend([1] * 120)                 # an age past every length seen
    sched.learn()
    assert sched.keys(reqs) == [sched.key(r) for r in reqs]
    assert len({sched.meter.prefill_slots(r) > 0 for r in reqs}) == 2      # both kinds were keyed


def test_gittins_table_counts_running_requests_as_censored_lengths():
    """Kaplan-Meier: 200 jobs of lengths 1..100 all started together, seen when the survivors
    have 40 tokens. The finished ones alone say every job ends by 40; with the 120 running ones
    counted as needing more than 40, P(X <= t) is exact up to 40, and the 0.6 left is a
    geometric tail from 41 on."""
    lengths = [1 + i % 100 for i in range(200)]
    done = [x for x in lengths if x <= 40]
    running = [40] * (len(lengths) - len(done))
    naive, km = GittinsTable(done), GittinsTable(done, running)
    assert naive.F[40] == pytest.approx(1.0) and naive.max_len == 40
    for t in (1, 17, 40):
        assert km.F[t] == pytest.approx(sum(x <= t for x in lengths) / len(lengths))
    # the measured hazard over ages 20..40 is 42 / 2982 per token, under the floor 1 / 42
    # (a tail no longer, on average, than the oldest job's age again)
    h = 1 / 42
    assert km.F[41] - km.F[40] == pytest.approx(0.6 * h)
    assert km.F[42] - km.F[41] == pytest.approx(0.6 * h * (1 - h))
    assert km.F[-1] == pytest.approx(1.0) and km.max_len <= 40 + 3 * 42
    assert km.index(40) > naive.index(40)              # a 40-token job is not taken for one past all history
    assert GittinsTable(done, [0] * 5).F == pytest.approx(naive.F)      # not started: no information


@pytest.mark.parametrize("finished, running", [
    (list(range(21, 41)) * 5, [40] * 20),        # many finish late: measured, 0.064 per token
    ([30, 31, 32, 33, 34] * 10, [34] * 5),       # the same, 0.056
    ([2] * 60 + [30] * 3, [35] * 40),            # few finish late: the floor 1 / (m + 1) holds it
    ([3, 5, 8, 13, 21, 34] * 4, [34] * 30),      # the same
])
def test_gittins_tail_hazard_is_the_later_half_events_over_tokens_at_risk(finished, running):
    """Past the oldest running request (age c, so m = c + 1), P(X = m + k) = rest h (1 - h)^k,
    h = (events at ages >= m / 2) / (tokens at risk there), clipped to [1 / (m + 1), 1 / 2]."""
    table = GittinsTable(finished, running)
    m = max(running) + 1
    lo = int(gittins_table.TAIL_WINDOW * m)
    events = sum(lo <= x for x in finished)
    exposure = sum(sum(x >= t for x in finished) + sum(c >= t for c in running) for t in range(lo, m + 1))
    h = min(max(events / exposure, 1 / (m + 1)), 0.5)
    rest = 1.0 - table.F[m - 1]
    assert rest == pytest.approx(len(running) / (len(finished) + len(running)))   # all run together
    pmf = np.diff(table.F)
    for k in range(3):
        assert pmf[m - 1 + k] == pytest.approx(rest * h * (1 - h) ** k)
    assert table.F[-1] == pytest.approx(1.0)


def test_gittins_behaves_like_skip_join_until_it_has_history_then_learns():
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, gittins_min_samples=3,
                          gittins_refresh=2)
    sched, kv = make("gittins", seqs=1, cfg=cfg)
    assert sched.warmup is not None
    for i in range(3):
        sched.add(req(f"done{i}", 5, 0.0, 2))
    while len(sched):
        run(sched, kv)
    live = req("live", 5, 1.0, 50)
    sched.add(live)
    run(sched, kv)                                     # 3 finished: switches to learned indices
    assert sched.warmup is None and sched.tables[0].max_len == 2 and len(sched) == 1


def test_gittins_runs_old_jobs_first_when_lengths_are_deterministic():
    """With no tail, the job closest to done has the highest index: FCFS-like, unlike MLFQ."""
    cfg = SchedulerConfig(starvation_threshold=0, gittins_min_samples=1)
    sched, kv = make("gittins", seqs=1, cfg=cfg)
    sched.pooled.extend([20] * 5)
    sched.history[0].extend([20] * 5)
    old, young = req("old", 4, 0.0, 20), req("young", 4, 0.0, 20)
    sched.add(old)
    for _ in range(5):
        run(sched, kv)
    sched.add(young)
    assert run(sched, kv)[0] == [("old", 1)]


def _learned_skip_join(protect: bool, seqs: int = 1, num_blocks: int = 1000):
    """skip-join that has seen two requests of 5 tokens finish (prompts of 50: 10 ms of
    prefill, one decode iteration)."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_decodes=protect,
                          protect_min_samples=2)
    sched, kv = make(seqs=seqs, cfg=cfg, num_blocks=num_blocks)
    for i in range(2):
        sched.add(req(f"done{i}", 50, 0.0, 5))
    while len(sched):
        run(sched, kv)
    return sched, kv


def test_skip_join_protects_a_decode_worth_more_per_token_than_a_fresh_request():
    """Lengths alike (all 5): a started request is nearly done, so a newer one does not
    demote it out of the batch; without protection (the paper's policy) it is demoted after
    its first quantum and the newcomer runs."""
    order = {}
    for protect in (True, False):
        sched, kv = _learned_skip_join(protect)
        sched.add(req("a", 50, 1.0, 5))
        sched.add(req("b", 50, 1.1, 5))
        order[protect] = [run(sched, kv)[0][0][0] for _ in range(6)]
        assert (sched._table is not None) == protect
    assert order[True] == ["a"] * 5 + ["b"]
    assert order[False][:3] == ["a", "a", "b"]


def test_skip_join_protects_every_decode_until_it_has_learned():
    """Cold start (nothing finished yet): a started request keeps its place ahead of newer
    arrivals in its queue, so the first requests of a burst finish as under fcfs; the paper's
    policy demotes it after its first quantum. Not where a batch of prompts twice the median
    length does not fit the device pool."""
    order = {}
    for protect in (True, False):
        cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_decodes=protect)
        sched, kv = make(seqs=1, cfg=cfg)
        sched.add(req("a", 50, 1.0, 5))
        sched.add(req("b", 50, 1.1, 5))
        order[protect] = [run(sched, kv)[0][0][0] for _ in range(6)]
        assert not sched._learned and sched._cold == protect
    assert order[True] == ["a"] * 5 + ["b"]
    assert order[False][:3] == ["a", "a", "b"]
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0)
    tight, kv = make(seqs=4, cfg=cfg, num_blocks=100)              # 99 usable blocks of 4: 396 < 4 x 100 tokens
    tight.add(req("a", 50, 1.0, 5))
    run(tight, kv)
    assert not tight._cold and not tight.protected(tight._live["a"])
    roomy, kv = make(seqs=4, cfg=cfg, num_blocks=101)
    roomy.add(req("a", 50, 1.0, 5))
    run(roomy, kv)
    assert roomy._cold and roomy.protected(roomy._live["a"])


def test_skip_join_protects_where_memory_binds_only_if_nearly_every_request_ends_protected():
    """4 slots x (50 + mean output) tokens do not fit 50 blocks of 4: memory, not the batch,
    bounds what runs. Lengths alike (all 5): every request ends while still protected, so
    decodes stay protected. Half 1 token and half 200: the index falls below a fresh
    request's after the first token, only half would end protected, and nothing is. With
    room for the batch, the same lengths are protected as usual."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_min_samples=2)
    for lengths, blocks, protect in (([5] * 20, 50, True), ([1] * 10 + [200] * 10, 50, False),
                                     ([5] * 20, 1000, True)):
        sched, kv = make(seqs=4, num_blocks=blocks, cfg=cfg)
        sched.restore_lengths({"pooled": lengths})
        sched.add(req("a", 50, 1.0, 5))
        run(sched, kv)
        run(sched, kv)
        assert sched._learned and (sched._table is not None) == protect, lengths
        assert sched.protected(sched._live["a"]) == protect


def test_skip_join_stretches_starvation_by_the_requests_memory_lets_run():
    """196 tokens of KV hold one request of 50 + 100.5 (mean output) tokens: with two live
    requests each waits about twice as long as a fair share, so the limit is 2 x the
    threshold, not 1 x (2 live / 4 slots); with room for the batch it stays max_num_seqs."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=1.0, protect_min_samples=2)
    for blocks, slots, limit in ((50, 1, 2.0), (1000, 4, 1.0)):
        sched, kv = make(seqs=4, num_blocks=blocks, cfg=cfg)
        assert sched.batch_slots() == 4
        sched.restore_lengths({"pooled": [1] * 10 + [200] * 10})
        sched.add(req("a", 50, 1.0, 5))
        sched.add(req("b", 50, 1.0, 5))
        run(sched, kv)
        assert sched.batch_slots() == slots and sched.starvation_limit() == limit


def test_skip_join_moves_a_protected_decode_above_fresh_requests_of_lower_index():
    """One slot. `a` (prompt 300: queue 2) decodes, protected; `b` (prompt 150: queue 1)
    arrives. Every fresh request's index is below that of a decode nearly done, so `a`
    moves up to the top queue and keeps its slot to the end; the paper's policy lets `b`'s
    shorter prefill overtake it. A request charged as a decode once is not moved again."""
    order = {}
    for protect in (True, False):
        sched, kv = _learned_skip_join(protect)
        sched.add(req("a", 300, 1.0, 5))
        run(sched, kv)                                  # a's prefill: back to queue 2
        run(sched, kv)                                  # a's first decode
        assert levels(sched)[0 if protect else 2] == ["a"]
        sched.add(req("b", 150, 1.1, 5))
        order[protect] = [run(sched, kv)[0][0][0] for _ in range(4)]
    assert order[True] == ["a", "a", "a", "b"]
    assert order[False][0] == "b"
    sched, kv = _learned_skip_join(True)
    sched.add(req("a", 300, 1.0, 5))
    run(sched, kv)
    sched._lapsed.add("a")
    run(sched, kv)
    assert levels(sched)[2] == ["a"]
    while len(sched):
        run(sched, kv)
    assert not sched._lapsed


def test_skip_join_relearns_after_a_new_cost_model():
    """A fresh request's index and each queue's depend on the cost model and the quanta:
    replacing them (a provisional profile for the full one) relearns at the next schedule()."""
    sched, kv = _learned_skip_join(True)
    sched.schedule(0.0)
    before = list(sched._level_index)
    sched.use_cost_model(COST, dataclasses.replace(sched.config, base_quantum=0.02))
    assert not sched._learned
    sched.schedule(0.0)
    assert sched._learned and sched._level_index[1] < before[1]


def test_skip_join_puts_a_prefilled_request_back_ahead_of_newer_ones():
    """A prefill iteration longer than the quantum demotes its request; once protection is on,
    the request goes back to the queue it joined, ahead of the requests that came after it."""
    sched, kv = _learned_skip_join(True)
    a, b = req("a", 50, 1.0, 5), req("b", 50, 1.1, 5)
    sched.add(a)
    sched.add(b)
    run(sched, kv, duration=0.05)                      # a's prefill: 50 ms > q0
    assert levels(sched)[0] == ["a", "b"]
    plain, kv2 = _learned_skip_join(False)
    plain.add(req("a", 50, 1.0, 5))
    plain.add(req("b", 50, 1.1, 5))
    run(plain, kv2, duration=0.05)
    assert levels(plain)[:2] == [["b"], ["a"]]


def test_skip_join_does_not_charge_a_prefill_chunk_that_leaves_the_prefill_unfinished():
    """A 300-token prompt (30 ms of prefill) joins q2 (40 ms). Chunked 100 tokens at a time in
    iterations of 50 ms (the batch's other work), it used to be demoted after its first
    chunk, and a later prompt of the same queue overtook it mid-prefill. Not while decodes
    are protected (here: the cold start); the paper's policy charges every iteration."""
    for protect in (True, False):
        cfg = SchedulerConfig(base_quantum=0.01, quantum_ratio=2.0, num_queues=5, starvation_threshold=0,
                              protect_decodes=protect)
        sched, kv = make(budget=100, cfg=cfg)
        a, b = req("a", 300, 0.0), req("b", 300, 0.1)
        sched.add(a)
        assert run(sched, kv, duration=0.05)[0] == [("a", 100)]
        sched.add(b)
        if not protect:
            assert levels(sched)[2:4] == [["b"], ["a"]]
            assert run(sched, kv, duration=0.05)[0] == [("b", 100)]
            continue
        assert sched._cold and levels(sched)[2] == ["a", "b"]
        assert run(sched, kv, duration=0.05)[0] == [("a", 100)]
        assert levels(sched)[2] == ["a", "b"]
        assert run(sched, kv, duration=0.05)[0] == [("a", 100)] and not a.is_prefilling


def test_drop_to_start_drops_only_host_kv_ranked_below_the_new_request():
    """Device pool of 9 usable blocks, paused KV on the host: q (2 blocks, ranked first) and p
    (6 blocks, ranked last). The new request a needs 4: started KV 8 + 4 is past the
    device-only start bound (9), so a drops p's host KV and starts; q, ranked above it, keeps
    its KV. So with reactive swapping too (no host share: host KV counts against the device
    pool there). Without drop_to_start (and without the host share) a waits."""
    from fastserve_jax.kv_plan import drop_kv
    from fastserve_jax.scheduler.batch import fill_batch
    for drop, on_host in ((True, True), (True, False), (False, False)):
        kv = KVManager(10, 4, 20)
        q, a, p = req("q", 8, 0.0), req("a", 16, 0.2), req("p", 24, 0.1)
        for r in (q, p):
            kv.allocate(r, r.num_prompt_tokens)
            r.num_computed_tokens = r.num_prompt_tokens
            kv.swap_out(r)
            kv.finish_swap_out(r)
        plan = fill_batch([q, a, p], [p, a, q], Limits(4, 100), kv, swap=True, swap_in_blocks=-1,
                          start_on_host=on_host, drop_to_start=drop)
        if drop:
            assert [s.request.request_id for s in plan.scheduled] == ["a"] and plan.preempted == [p]
            drop_kv(p, kv)
            assert kv.location(q).value == "host" and kv.location(p).value == "none"
        else:
            assert "a" not in [s.request.request_id for s in plan.scheduled] and not plan.preempted


def test_kept_requests_are_not_evicted_for_a_start_but_are_for_a_holder():
    """fill_batch's `keep` (skip-join: protected decodes where memory binds): a new request
    ranked above a kept paused request does not swap it out to start; without `keep` it
    does; a request that holds KV and needs a block still evicts it."""
    from fastserve_jax.scheduler.batch import fill_batch
    for keep in (None, lambda r: r.request_id == "p"):
        kv = KVManager(9, 4, 20)                          # 8 usable device blocks
        p, n = req("p", 24, 0.0), req("n", 12, 0.1)      # p holds 6 blocks, n needs 3
        kv.allocate(p, 24)
        p.num_computed_tokens = 24
        plan = fill_batch([n], [p, n], Limits(1, 100), kv, swap=True, start_on_host=True, keep=keep)
        started = [s.request.request_id for s in plan.scheduled] == ["n"]
        assert (started, plan.swapped_out) == ((True, [p]) if keep is None else (False, []))
    kv = KVManager(9, 4, 20)
    h, p = req("h", 8, 0.0), req("p", 24, 0.1)
    for r, n in ((h, 8), (p, 24)):
        kv.allocate(r, n)
        r.num_computed_tokens = n
    h.output_token_ids.append(5)                      # decoding at 8 tokens: needs a third block, none free
    plan = fill_batch([h], [p, h], Limits(1, 100), kv, swap=True, start_on_host=True, keep=lambda r: True)
    assert [s.request.request_id for s in plan.scheduled] == ["h"] and plan.swapped_out == [p]


def test_start_headroom_shrinks_to_the_growth_a_policy_expects():
    """32 usable blocks, 24 started: a 7-block start overshoots the default headroom (1/16 of
    the bound: 2 blocks) but fits a policy's expected growth of 1 block; never more than
    the default."""
    from fastserve_jax.scheduler.batch import fill_batch
    for headroom, starts in ((None, False), (1, True), (5, False)):
        kv = KVManager(33, 4)
        held = req("held", 96, 0.0)
        kv.allocate(held, 96)
        held.num_computed_tokens = 96
        new = req("new", 28, 0.1)
        plan = fill_batch([new], [new], Limits(4, 100), kv, headroom=headroom)
        assert ([s.request.request_id for s in plan.scheduled] == ["new"]) == starts, headroom


def test_start_bound_takes_the_host_pools_a_policy_asks_for():
    """8 usable device blocks, 14 blocks of paused KV on the host, a new request of 4 blocks:
    with proactive swapping's host share of one device pool the bound is 16 blocks less the
    headroom (1), and 14 + 4 is past it; with two pools' worth (24 - 1) it starts, moving
    nothing (the device pool is free)."""
    from fastserve_jax.scheduler.batch import fill_batch
    for pools, starts in ((1, False), (2, True)):
        kv = KVManager(9, 4, 40)
        paused = [req("p1", 28, 0.0), req("p2", 28, 0.0)]       # 7 blocks each
        for p in paused:
            kv.allocate(p, 28)
            p.num_computed_tokens = 28
            kv.swap_out(p)
            kv.finish_swap_out(p)
        new = req("new", 16, 0.1)
        plan = fill_batch([new] + paused, paused[::-1] + [new], Limits(4, 100), kv, swap=True, swap_in_blocks=-1,
                          start_on_host=True, host_pools=pools)
        assert ([s.request.request_id for s in plan.scheduled] == ["new"]) == starts, pools


def test_backfill_starts_past_a_promoted_request_held_back_and_leaves_it_room():
    """32 usable blocks, start bound 30. h holds 14; big (20 blocks, more than half the bound)
    is past the bound, so it waits. Strictly in order, or if big was not promoted for
    waiting, nothing else starts; with backfill past the promoted big, small (8) starts,
    since big + small fit the bound, but small2 (4) does not: big + small + small2 would not.
    Once h finishes big starts beside small, and the requests started past it are forgotten.
    A held-back request of half the bound or less keeps the order."""
    from fastserve_jax.scheduler.batch import fill_batch
    for backfill, promoted in ((None, ("big",)), ({}, ()), ({}, ("big",))):
        kv = KVManager(33, 4)
        h, big, small, small2 = req("h", 56, 0.0), req("big", 80, 0.1), req("small", 32, 0.2), req("small2", 16, 0.3)
        kv.allocate(h, 56)
        h.num_computed_tokens = 56
        order = [h, big, small, small2]
        plan = fill_batch(order, order[::-1], Limits(4, 1000), kv, backfill=backfill, promoted=promoted)
        ran = [s.request.request_id for s in plan.scheduled]
        if backfill is None or not promoted:
            assert ran == ["h"] and not backfill
            continue
        assert ran == ["h", "small"] and list(backfill) == ["small"]
        kv.allocate(small, 32)
        small.num_computed_tokens = 32
        kv.free(h)
        plan = fill_batch(order[1:], order[:0:-1], Limits(4, 1000), kv, backfill=backfill, promoted=promoted)
        assert [s.request.request_id for s in plan.scheduled] == ["big", "small"] and backfill == {}
    kv = KVManager(33, 4)
    h, mid, small = req("h", 80, 0.0), req("mid", 60, 0.1), req("small", 16, 0.2)    # 20, 15 and 4 blocks
    kv.allocate(h, 80)
    h.num_computed_tokens = 80
    plan = fill_batch([h, mid, small], [small, mid, h], Limits(4, 1000), kv, backfill={}, promoted=("mid",))
    assert [s.request.request_id for s in plan.scheduled] == ["h"]


def test_mlfq_names_the_requests_it_promoted_for_waiting():
    """promoted(): a request moved to the top queue by starvation promotion, until it leaves
    the policy or moves again; not one that entered the top queue on its own."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=1.0, protect_decodes=False)
    sched, _ = make(cfg=cfg)
    top, low = req("top", 50, 0.0), req("low", 9000, 0.0)         # queues 0 and 4
    sched.add(top)
    sched.add(low)
    assert not sched.promoted()
    sched.promote_starving(100.0)
    assert set(sched.promoted()) == {"low"} and low.queue_level == 0
    sched._move(low, 2)
    assert not sched.promoted()
    sched.promote_starving(300.0)
    sched.remove(low)
    assert not sched.promoted()


def test_skip_join_and_gittins_take_two_host_pools_or_backfill_where_memory_binds_and_lengths_are_heavy_tailed():
    """heavy_bound: once learned lengths heavier-tailed than LIGHT_TAIL_CV say a device pool
    holds fewer typical requests than max_num_seqs. There host_pools is 2 (else 1, as before
    anything is learned) and backfills() holds, with or without proactive swapping's host
    share. Not with lengths alike or room for a full batch, and never for the policies that
    learn nothing."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, gittins_starvation_threshold=0,
                          gittins_min_samples=4, gittins_refresh=1, protect_min_samples=4)
    heavy, alike = (1, 1, 2, 1, 3, 1, 60, 2), (20, 22, 19, 21, 20, 23, 18, 21)
    for policy in ("skip-join-mlfq", "gittins", "fcfs", "mlfq", "srpt"):
        learns = policy in ("skip-join-mlfq", "gittins")
        for blocks, lengths, want in ((40, heavy, learns), (40, alike, False), (1000, heavy, False)):
            sched, kv = make(policy, seqs=4, cfg=cfg, num_blocks=blocks)
            assert sched.host_pools() == 1 and not sched.backfills()       # nothing learned yet
            for i, n in enumerate(lengths):
                sched.add(req(f"h{i}", 50, 0.0, n))
            while len(sched):
                run(sched, kv)
            sched.add(req("next", 50, 0.0, 5))
            run(sched, kv)
            assert (sched.host_pools(), sched.backfills()) == ((2, True) if want else (1, False)), (policy, blocks, lengths)
            sched.start_on_host = True
            assert sched.backfills() == want, (policy, blocks, lengths)


def test_skip_join_drops_to_start_only_where_memory_binds_and_a_backlog_waits():
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_min_samples=2)
    for blocks, backlog, want in ((1000, 100, False), (60, 100, True), (60, 17, False)):
        sched, kv = make(seqs=4, cfg=cfg, num_blocks=blocks)
        for i in range(backlog):
            sched.add(req(f"r{i}", 50, 0.0, 5))
        apply_plan(sched.schedule(0.0), kv, 0.0)      # a cold start decides whether memory binds
        waiting = len(sched) - kv.num_kv_requests
        assert sched.drops_to_start() is want, (blocks, backlog, waiting)   # 4 slots x 4 per slot
        assert want == (blocks == 60 and waiting > 16)


def test_gittins_drops_to_start_where_memory_binds_a_backlog_waits_and_lengths_are_heavy_tailed():
    """As skip-join's (above), and only once the learned lengths' CV is over LIGHT_TAIL_CV; while
    it drops, it waits twice gittins_starvation_threshold to promote (starvation_threshold)."""
    cfg = SchedulerConfig(starvation_threshold=0, gittins_starvation_threshold=20, gittins_min_samples=4,
                          gittins_refresh=1, protect_min_samples=2)
    heavy, alike = (1, 1, 2, 1, 3, 1, 60, 2), (20, 22, 19, 21, 20, 23, 18, 21)
    for blocks, backlog, lengths, want in ((40, 100, heavy, True), (40, 100, alike, False),
                                           (1000, 100, heavy, False), (40, 17, heavy, False)):
        sched, kv = make("gittins", seqs=4, cfg=cfg, num_blocks=blocks)
        for i, n in enumerate(lengths):                     # learned lengths
            sched.add(req(f"h{i}", 50, 0.0, n))
        while len(sched):
            run(sched, kv)
        for i in range(backlog):
            sched.add(req(f"r{i}", 50, 0.0, 5))
        run(sched, kv)
        waiting = len(sched) - kv.num_kv_requests
        assert sched.warmup is None and sched.drops_to_start() is want, (blocks, backlog, lengths, waiting)
        assert sched.starvation_threshold() == (40.0 if want else 20.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 80), min_size=1, max_size=60))
def test_per_token_gittins_table_equals_the_definition(lengths):
    """Latency per token: each job's cost rate is 1 / its length, so the numerator is
    E[1{a < X <= b} / X]."""
    m, n = max(lengths), len(lengths)
    F = [sum(x <= b for x in lengths) / n for b in range(m + 1)]
    W = [sum(1 / x for x in lengths if x <= b) / n for b in range(m + 1)]
    S = [sum(min(x, b) for x in lengths) / n for b in range(m + 1)]
    table = GittinsTable(lengths, per_token=True)
    for a in range(m):
        want = max((W[b] - W[a]) / (S[b] - S[a]) for b in range(a + 1, m + 1))
        assert table.index(a) == pytest.approx(want, rel=1e-9)
        want_p = max((W[b] - W[a]) / (2.5 * (1 - F[a]) + S[b] - S[a]) for b in range(a + 1, m + 1))
        assert table.index(a, 2.5) == pytest.approx(want_p, rel=1e-9)


def test_srpt_runs_the_shortest_remaining_first():
    sched, kv = make("srpt", seqs=1)
    long, short = req("long", 4, 0.0, 30), req("short", 4, 0.1, 3)
    sched.add(long)
    run(sched, kv)
    sched.add(short)
    assert run(sched, kv)[0] == [("short", 4)]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_remove_of_live_and_unknown_requests(policy):
    sched, kv = make(policy)
    a, b = req("a", 4), req("b", 4)
    sched.add(a)
    sched.add(b)
    assert len(sched) == 2
    sched.remove(a)
    sched.remove(req("nobody", 4))
    assert len(sched) == 1 and [rid for rid, _ in run(sched, kv)[0]] == ["b"]


def test_scheduler_code_never_imports_jax():
    root = pathlib.Path(__file__).resolve().parents[1] / "fastserve_jax"
    files = list((root / "scheduler").glob("*.py")) + [root / "cost_model.py", root / "sim.py", root / "workload.py"]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "jax" or n.startswith("jax.") for n in names), f"{f.name} imports jax"


def test_learned_lengths_restore_only_into_the_same_buckets():
    cfg = SchedulerConfig(gittins_min_samples=2, gittins_bucket_edges=(20,))
    sched, _ = make("gittins", seqs=2, cfg=cfg)
    state = {"edges": [20], "history": [[3, 4], [50]], "pooled": [3, 4, 50]}
    sched.restore_lengths(state)
    assert sched.learned_lengths() == dict(state, prompts=[]) and sched.ready()   # no prompt pairs were restored
    other, _ = make("gittins", seqs=2, cfg=SchedulerConfig(gittins_bucket_edges=(30,)))
    for bad in (state, dict(state, pooled=[0]), dict(state, history=[[3], "x"]), {"edges": []}):
        with pytest.raises(ValueError):
            (other if bad is state else sched).restore_lengths(bad)


def test_skip_join_keeps_its_lengths_in_the_format_gittins_reads():
    sched, _ = make(cfg=SchedulerConfig(protect_min_samples=2))
    sched.restore_lengths({"edges": [], "history": [[3, 4]], "pooled": [3, 4]})
    state = sched.learned_lengths()
    assert state == {"edges": [], "history": [[3, 4]], "pooled": [3, 4], "prompts": []}
    g, _ = make("gittins")
    g.restore_lengths(state)
    assert list(g.pooled) == [3, 4]
    for bad in ({"pooled": [0]}, {"pooled": "x"}, {}, {"pooled": [True]}):
        with pytest.raises(ValueError):
            sched.restore_lengths(bad)
    assert sched.schedule(0.0).scheduled == [] and sched._table is None    # nothing to rank yet: no table


def test_length_window_keeps_a_restored_prior_until_it_is_dropped_or_slides_out():
    from fastserve_jax.scheduler.length_window import LengthWindow
    w = LengthWindow(4)
    w.restore([7, 8, 9])
    w.observe(1)
    assert list(w) == [7, 8, 9, 1] and (w.prior, w.fresh) == (3, 1)
    w.observe(2)                                    # the oldest restored length slides out
    assert list(w) == [8, 9, 1, 2] and w.prior == 2
    assert w.drop_prior() and list(w) == [1, 2] and not w.drop_prior()
    with pytest.raises(ValueError):
        w.restore([5])                              # a prior comes before this run's own
    w = LengthWindow(2)
    w.restore([7, 8, 9])
    assert list(w) == [8, 9] and w.prior == 2
    for n in (1, 2, 3):
        w.observe(n)
    assert list(w) == [2, 3] and w.prior == 0


def _finish_all(sched, kv, lengths):
    for i, n in enumerate(lengths):
        sched.add(req(f"r{i}", 8, 0.0, n))
    for i in range(1000):
        if not len(sched):
            break
        run(sched, kv, now=0.01 * i)
    assert not len(sched)


def test_restored_lengths_are_a_prior_until_the_run_has_as_many_of_its_own_as_a_cold_start():
    """A previous run's lengths (all 6: light-tailed) stand in until protect_min_samples (4)
    of this run's own have finished; then skip-join learns from its own only (1s and 40s:
    heavy-tailed), so the light-tail rule the prior set is undone. gittins likewise at
    gittins_min_samples. Kept whole, 2,000 restored lengths of other traffic outlived a
    400-request burst on the engine (length_window.py)."""
    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_min_samples=4,
                          gittins_min_samples=4, gittins_refresh=2)
    sched, kv = make(cfg=cfg)
    sched.restore_lengths({"pooled": [6] * 100})
    sched.add(req("x", 8, 0.0, 6))
    run(sched, kv)
    assert sched._light and sched.starts_on_host() is False
    _finish_all(sched, kv, (1, 40, 1, 40))
    assert sorted(sched.learned_lengths()["pooled"]) == [1, 1, 6, 40, 40]     # x finished too: 5 of its own
    sched.add(req("y", 8, 1.0, 6))
    sched.schedule(1.0)
    assert not sched._light
    g, gkv = make("gittins", cfg=cfg)
    g.restore_lengths({"edges": [], "history": [[6] * 100], "pooled": [6] * 100})
    _finish_all(g, gkv, (1, 40, 1))
    assert len(g.pooled) == 103                                 # 3 of its own: the prior stands
    _finish_all(g, gkv, (40,))
    state = g.learned_lengths()
    assert sorted(state["pooled"]) == sorted(state["history"][0]) == [1, 1, 40, 40]


def test_near_done_marks_the_ages_whose_expected_remaining_length_is_at_most_the_mean():
    from fastserve_jax.scheduler.length_window import near_done
    # half 1 token, half 20 (mean 10.5): at age 0 the rest is the mean; from age 1 only the
    # 20s are left, 20 - age <= 10.5 from age 10; past every length nothing is expected
    assert near_done([1] * 10 + [20] * 10) == [True] + [False] * 9 + [True] * 11
    assert near_done([7] * 3) == [True] * 8
    assert near_done([]) == []


def test_near_done_is_the_definition_age_by_age():
    """near_done is one numpy pass; against E[X - age | X > age] <= E[X] taken age by age over
    the lengths themselves, on random sets of alike, spread and heavy-tailed lengths."""
    from fastserve_jax.scheduler.length_window import near_done

    def by_definition(xs):
        mean = sum(xs) / len(xs)
        out = []
        for age in range(max(xs) + 1):
            rest = [x for x in xs if x > age]
            out.append(not rest or sum(rest) / len(rest) - age <= mean)
        return out

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        xs = [rng.choice([1, 2, rng.randint(1, 600), int(rng.paretovariate(0.8))]) + 1 for _ in range(n)]
        assert near_done(xs) == by_definition(xs), xs


def test_skip_join_tail_guard_runs_a_request_behind_its_pace_from_the_top_uncharged():
    """Lengths half 1, half 20 (near_done above). `a` has 11 tokens; at 10 x 10 ms per token
    its pace allows 1.2 s, the starvation limit 1 s. At 1.15 s it is on pace; at 3 s it is
    behind and near done, so it moves to the top queue and is not charged, so not demoted,
    while it runs. `b`, behind by as much with 5 tokens, is expected to need more than a
    fresh request (a 20) and is left to MLFQ: promoted for idling, then charged as usual.
    With tail_slowdown=0 there is no guard."""
    for slowdown in (10.0, 0.0):
        cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=1.0, protect_decodes=True,
                              protect_min_samples=2, tail_slowdown=slowdown)
        sched, kv = make(seqs=2, cfg=cfg)
        sched.restore_lengths({"pooled": [1] * 10 + [20] * 10})
        sched.add(req("a", 50, 0.0, 20))
        for i in range(11):
            run(sched, kv, now=0.01 * i)
        assert len(sched._live["a"].output_token_ids) == 11
        sched.add(req("b", 50, 0.0, 20))
        for i in range(5):
            run(sched, kv, now=0.2 + 0.01 * i)
        sched._move(sched._live["a"], 3)                # as if demoted meanwhile
        sched._move(sched._live["b"], 3)
        sched.schedule(1.15)
        assert not sched._guarded
        sched.schedule(3.0)
        assert sched._guarded == ({"a"} if slowdown else set())
        for i in range(3):
            run(sched, kv, now=3.0 + 0.01 * i)
        a, b = sched._live["a"], sched._live["b"]
        assert b.attained_service > 0 or b.queue_level > 0
        assert (a.queue_level == 0 and a.attained_service == 0.0) == bool(slowdown)


def test_engine_policy_defaults_wait_as_many_full_batch_iterations_as_the_reference_setup():
    """The engine's starvation limits are the defaults' seconds scaled by its full-batch decode
    time over the reference setup's, which the shipped OPT-13B table still gives."""
    from fastserve_jax.scheduler.engine_defaults import REFERENCE_ITERATION_SECONDS, engine_policy_config

    opt = CostModel.load("opt-13b-a100")
    assert opt.decode_time(16) == pytest.approx(REFERENCE_ITERATION_SECONDS, rel=1e-3)
    d = SchedulerConfig()
    same = engine_policy_config(opt, 16)
    assert same.starvation_threshold == pytest.approx(d.starvation_threshold, rel=1e-3)
    assert same.base_quantum == opt.decode_time(1)
    fast = dataclasses.replace(opt, decode_seconds=tuple(t / 5 for t in opt.decode_seconds))
    cfg = engine_policy_config(fast, 16, tail_slowdown=0.0)
    assert cfg.starvation_threshold == pytest.approx(d.starvation_threshold * fast.decode_time(16) / opt.decode_time(16))
    assert cfg.starvation_threshold < 0.3 * d.starvation_threshold and cfg.tail_slowdown == 0.0
    assert cfg.gittins_starvation_threshold / cfg.starvation_threshold == pytest.approx(
        d.gittins_starvation_threshold / d.starvation_threshold)
    assert engine_policy_config(fast, 16, 3.0).starvation_threshold == 3.0          # a given limit is kept
    assert engine_policy_config(None, 16) == d
    falling = dataclasses.replace(opt, decode_batch=(1, 2), decode_seconds=(0.01, 0.002))  # stretched past batch 2
    assert engine_policy_config(falling, 16).starvation_threshold == pytest.approx(
        d.starvation_threshold * 0.01 / REFERENCE_ITERATION_SECONDS)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "5", True])
def test_scheduler_config_rejects_a_bad_tail_slowdown(bad):
    with pytest.raises(ValueError, match="tail_slowdown must be a finite number >= 0 \\(0 disables it\\)"):
        SchedulerConfig(tail_slowdown=bad)


@pytest.mark.parametrize("budget", [1000, 40])          # the recomputation in one chunk, or in several
def test_a_recomputation_keeps_the_skip_join_queue_it_had(budget):
    """A request demoted by its decode service, its KV then dropped: its recomputation looked
    like a first prefill completing, and put it back in its entry queue, ahead of a fresh
    request, uncharged (a probe, 2026-12-07)."""
    from fastserve_jax.kv_plan import drop_kv

    cfg = SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0, protect_min_samples=2)
    sched, kv = make(seqs=2, cfg=cfg, budget=budget)
    sched.restore_lengths({"pooled": [1] * 10 + [200] * 10})       # heavy-tailed: protection lapses early
    a = req("a", 30, 1.0, 100)
    sched.add(a)
    for _ in range(12):
        run(sched, kv)
    assert a.queue_level == 3
    drop_kv(a, kv)
    sched.add(req("b", 30, 2.0, 100))
    for _ in range(3):
        run(sched, kv)
    assert a.queue_level == 3 and levels(sched)[3] == ["a"]


def test_a_recomputation_keeps_a_promotion_for_waiting():
    """During the cold start (every decode protected) a request promoted to the top queue for
    waiting went back to its entry queue when its dropped KV was recomputed."""
    from fastserve_jax.kv_plan import drop_kv

    sched, kv = make(seqs=1, cfg=SchedulerConfig(base_quantum=0.01, num_queues=5, starvation_threshold=0.05))
    a = req("a", 300, 0.0, 50)                     # 30 ms of prefill: joins queue 2
    sched.add(a)
    run(sched, kv, now=0.0)
    run(sched, kv, now=0.01)
    b = req("b", 50, 0.02, 200)                    # queue 0, protected once started: takes the only slot
    sched.add(b)
    t = 0.02
    for _ in range(12):
        run(sched, kv, now=t)
        t += 0.01
    assert a.queue_level == 0 and "a" in sched._promoted
    drop_kv(a, kv)
    drop_kv(b, kv)
    sched.remove(b)
    for _ in range(3):
        run(sched, kv, now=t)
        t += 0.01
    assert a.queue_level == 0


def test_quanta_past_a_float_are_infinite_not_a_traceback():
    """quantum_ratio 1e30 passed the config's check, then every policy's start raised
    OverflowError (a probe, 2026-12-07); a base of 1e308 already ran as infinite quanta."""
    cfg = SchedulerConfig(quantum_ratio=1e30, num_queues=12)
    assert cfg.quantum(1) == 1e30 * cfg.base_quantum and cfg.quantum(11) == float("inf")
    sched, kv = make("mlfq", cfg=cfg)
    sched.add(r := req("a", 30))
    while not r.finished:
        run(sched, kv)
