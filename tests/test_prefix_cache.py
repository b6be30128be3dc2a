"""Automatic prefix caching (fastserve_jax/prefix_cache.py): the shared-block ledger, and the
engine's tokens with shared prefixes under memory pressure, preemption and swapping."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.kv_plan import apply_plan
from fastserve_jax.prefix_cache import PrefixCachingKVManager
from fastserve_jax.request import Request
from fastserve_jax.scheduler.base import Plan, ScheduledRequest
from engine_grids import SMALL_GRID
from test_swap import randomized_run

ENGINE_KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8, **SMALL_GRID)


def req(rid: str, tokens: list[int], max_tokens: int = 8, **sp) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sp), 0.0)


def run_plan(kv, *items) -> Plan:
    plan = Plan(scheduled=[ScheduledRequest(r, n) for r, n in items])
    apply_plan(plan, kv, 0.0)
    for s in plan.scheduled:
        s.request.num_computed_tokens += s.num_tokens
    return plan


# -- the ledger -------------------------------------------------------------------------------
def test_a_prompt_logprobs_request_looks_nothing_up_and_counts_no_query():
    """vLLM's: such a request skips the prefix cache, so its tokens are neither queries nor
    hits (they were queries until 2026-12-07, lowering the hit rate /metrics reports)."""
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    run_plan(kv, (req("a", range(1, 12)), 11))
    plan = run_plan(kv, (req("c", range(1, 12), prompt_logprobs=1), 11))
    assert plan.scheduled[0].num_tokens == 11 and (kv.queries, kv.hits) == (11, 0)


def test_lookups_count_as_in_vllm_a_1_token_prompt_too_a_recomputation_apart():
    """vLLM counts every new request's lookup, a 1-token prompt's too (it counted none here),
    and a preempted request's lookup apart (preempted_queries/hits, not exported): a request
    dropped and prefilled again found its own blocks and raised vllm:prefix_cache_hits (a probe,
    2026-12-07). queries/hits still count every lookup (fastserve_prefix_cache_*)."""
    from fastserve_jax.kv_plan import drop_kv

    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    run_plan(kv, (req("one", [7]), 1))
    assert (kv.queries, kv.hits, kv.requeries, kv.rehits) == (1, 0, 0, 0)
    a = req("a", range(1, 12))
    run_plan(kv, (a, 11))
    drop_kv(a, kv)
    run_plan(kv, (a, 11))                                        # finds its own 2 full blocks again
    assert (kv.queries, kv.hits, kv.requeries, kv.rehits) == (23, 8, 11, 8)
    kv.check_integrity()


def test_a_prefix_computed_again_stays_found_where_the_pool_takes_back_the_old_copy():
    """A prompt_logprobs request (it reads no cache) computes a cached prompt's blocks again in a
    pool that holds one copy: its chunks take the cached copy's blocks as free space. Its own
    blocks kept no key (the cached ones had them), so the prefix was lost though its content
    stayed on the device: the next plain request found 8 of 48 tokens (a probe, 2026-12-07)."""
    kv = PrefixCachingKVManager(num_blocks=8, block_size=4)      # 7 usable
    prompt = list(range(1, 28))                                  # 27 tokens: 6 full blocks
    a = req("a", prompt, max_tokens=1)
    run_plan(kv, (a, 27))
    kv.free(a)
    b = req("b", prompt, max_tokens=1, prompt_logprobs=1)
    for chunk in (8, 8, 11):                                     # chunked: it takes the cached blocks
        run_plan(kv, (b, chunk))
    kv.free(b)
    kv.check_integrity()
    c = req("c", prompt, max_tokens=1)
    assert run_plan(kv, (c, 27)).scheduled[0].num_tokens == 3 and c.num_cached_tokens == 24
    kv.check_integrity()


def test_a_second_request_shares_the_first_ones_full_blocks_and_computes_the_rest():
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    a, b = req("a", range(1, 12)), req("b", [*range(1, 10), 50, 51])      # 11 tokens; the first 9 shared
    run_plan(kv, (a, 11))
    assert kv.num_used_blocks == 3 and kv.num_cached_blocks == 2          # the third block is not full
    plan = run_plan(kv, (b, 11))
    assert plan.scheduled[0].num_tokens == 3 and b.num_cached_tokens == 8 and (kv.queries, kv.hits) == (22, 8)
    assert kv.block_table(b)[:2] == kv.block_table(a)[:2] and kv.block_table(b)[2] != kv.block_table(a)[2]
    assert kv.num_used_blocks == 4 and len(kv.freeable_blocks(a)) == 1 and len(kv.freeable_blocks(b)) == 1
    kv.check_integrity()
    kv.free(a)
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 16
    kv.free(b)          # its blocks stay cached: free, and matchable
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 19 and kv.num_cached_blocks == 2
    c = req("c", range(1, 12))
    assert run_plan(kv, (c, 11)).scheduled[0].num_tokens == 3
    kv.check_integrity()


def test_a_request_shares_the_blocks_an_earlier_request_of_its_plan_writes():
    """The runner puts the prefill chunks in plan order and a launch writes its K/V before its rows
    read, so b (after a) reads a's two full blocks after a's launch wrote them (a request never
    matches one after it: that one has no blocks yet when it matches). But a 1-token chunk runs
    in the decode launch, before the prefills: a2, a's prompt again, would read a's blocks before
    they are written (its answer was wrong), so it takes one block fewer and computes 5 tokens,
    in a prefill launch after a's; y, whose 8 tokens the policy counted as cached, stays a
    1-token chunk and takes none of them. The next plan's c finds them all. The cut chunk of d
    (6 of its tokens) gives a key only to the block it completes."""
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    a, a2, b = req("a", range(1, 10)), req("a2", range(1, 10)), req("b", [*range(1, 10), 50])
    plan = run_plan(kv, (a, 9), (a2, 9), (b, 10))
    assert [s.num_tokens for s in plan.scheduled] == [9, 5, 2] and kv.hits == 12 and b.num_cached_tokens == 8
    assert kv.block_table(b)[:2] == kv.block_table(a)[:2] and kv.block_table(a2)[:2] == [kv.block_table(a)[0],
                                                                                          kv.block_table(a2)[1]]
    assert kv.block_table(a2)[1] != kv.block_table(a)[1]
    x, y = req("x", range(100, 109)), req("y", range(100, 109))
    plan = Plan(scheduled=[ScheduledRequest(x, 9), ScheduledRequest(y, 9, 8)])
    apply_plan(plan, kv, 0.0)    # y counted as cached what x writes: it computes 1 token, from its start
    assert [s.num_tokens for s in plan.scheduled] == [9, 1] and y.num_computed_tokens == 0
    d, e = req("d", range(30, 42)), req("e", range(30, 42))
    plan = run_plan(kv, (d, 6), (e, 12))
    assert [s.num_tokens for s in plan.scheduled] == [6, 8] and kv.block_table(e)[0] == kv.block_table(d)[0]
    assert run_plan(kv, (req("c", range(1, 10)), 9)).scheduled[0].num_tokens == 1
    kv.check_integrity()


def test_requests_share_blocks_only_with_requests_of_the_same_cache_salt():
    kv = PrefixCachingKVManager(num_blocks=40, block_size=4)
    toks = range(1, 14)
    run_plan(kv, (req("plain", toks), 13))
    a1, a2, b, plain2 = (req("a1", toks, cache_salt="a"), req("a2", toks, cache_salt="a"),
                         req("b", toks, cache_salt="b"), req("plain2", toks))
    assert run_plan(kv, (a1, 13)).scheduled[0].num_tokens == 13         # not the unsalted blocks
    assert run_plan(kv, (a2, 13)).scheduled[0].num_tokens == 1          # the same salt's
    assert run_plan(kv, (b, 13)).scheduled[0].num_tokens == 13
    assert run_plan(kv, (plain2, 13)).scheduled[0].num_tokens == 1
    assert "cache_salt" not in repr(a1.sampling)
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        SamplingParams(cache_salt="")


def test_the_last_token_is_always_computed_and_a_chunk_matches_at_most_its_own_tokens():
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    run_plan(kv, (req("a", range(1, 9)), 8))                     # two full blocks
    b = req("b", range(1, 9))                                    # the same 8 tokens: 4 are recomputed
    assert run_plan(kv, (b, 8)).scheduled[0].num_tokens == 4 and b.num_computed_tokens == 8
    c = req("c", range(1, 13))
    assert run_plan(kv, (c, 5)).scheduled[0].num_tokens == 1     # a 5-token chunk: one block, then 1 token
    d = req("d", range(1, 9), prompt_logprobs=1)                 # prompt logprobs need every prompt token
    assert run_plan(kv, (d, 8)).scheduled[0].num_tokens == 8 and d.num_cached_tokens == 0
    kv.check_integrity()


def test_a_prefill_cut_into_chunks_finds_the_rest_of_its_prefix_chunk_by_chunk():
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4)
    a = req("a", range(1, 21))
    run_plan(kv, (a, 20))
    b = req("b", range(1, 21))
    assert run_plan(kv, (b, 6)).scheduled[0].num_tokens == 2        # block 0, then tokens 4-5 in its own
    assert run_plan(kv, (b, 10)).scheduled[0].num_tokens == 4       # its partial block 1 for a's, and 2
    assert kv.block_table(b)[:3] == kv.block_table(a)[:3] and kv.block_table(b)[3] not in kv.block_table(a)
    assert b.num_computed_tokens == 16 and kv.hits == 4 + 8 - 2 and b.num_cached_tokens == 10
    assert run_plan(kv, (b, 4)).scheduled[0].num_tokens == 4        # the prompt's last block: computed
    kv.check_integrity()


@pytest.mark.parametrize("policy", ["fcfs", "skip-join-mlfq"])
def test_a_starts_cached_prefix_is_left_out_of_the_token_budget(policy):
    """With a 32-token budget, three requests behind a cached 40-token prefix all start in one
    iteration, each computing its last few tokens; without the cache one would start. (The
    policy still counts each start's whole context in blocks, shared or not: the pool is ample.)"""
    from fastserve_jax.scheduler import Limits, make_scheduler
    from test_swap import CFG, COST

    kv = PrefixCachingKVManager(num_blocks=80, block_size=4)
    stem = list(range(1, 41))
    run_plan(kv, (req("warm", stem + [99]), 41))
    sched = make_scheduler(policy, Limits(8, 32), kv, CFG, COST)
    reqs = [req(f"r{i}", stem + [50 + i, 60 + i, 70 + i]) for i in range(3)]
    for r in reqs:
        sched.add(r)
    plan = sched.schedule(0.0)
    assert [(s.request.request_id, s.num_tokens, s.cached) for s in plan.scheduled] == \
        [(r.request_id, 43, 40) for r in reqs]
    apply_plan(plan, kv, 0.0)
    assert [s.num_tokens for s in plan.scheduled] == [3, 3, 3] and kv.hits == 120
    kv.check_integrity()
    kv.free(reqs[0])
    kv.reset()                                   # nothing cached: the budget holds one start (and a chunk)
    late = [req(f"l{i}", stem + [80 + i]) for i in range(2)]
    plan = Plan(scheduled=[ScheduledRequest(late[0], 41, 40)])
    apply_plan(plan, kv, 0.0)                     # expected 40 cached, found none: computes 1 of them
    assert plan.scheduled[0].num_tokens == 1 and late[0].num_computed_tokens == 0
    kv.check_integrity()


@pytest.mark.parametrize("order", ["eviction first", "start first"])
def test_a_start_never_counts_on_sharing_blocks_that_an_eviction_of_the_same_plan_frees(order):
    """V (paused, ranked last) alone holds the two keyed blocks that S's prefix matches, and H
    needs more blocks than are free, which only V's eviction frees. If H's eviction comes first in the
    walk, S must count those blocks as ones to take, not to share; if S comes first, V's
    eviction must not count them as freed. Either double count over-commits the pool, and the
    plan does not fit when applied."""
    from fastserve_jax.scheduler import Limits
    from fastserve_jax.scheduler.batch import fill_batch

    stem = list(range(1, 9))
    kv = PrefixCachingKVManager(num_blocks=8, block_size=4)                     # V 3 blocks, H 2, 2 free
    v, h = req("v", stem + [90]), req("h", [50 + i for i in range(8)])
    run_plan(kv, (v, 9))
    run_plan(kv, (h, 8))
    h.output_token_ids += [7] * 9                                               # its next chunk: 3 more blocks
    s_ = req("s", stem + [91, 92])
    best = [h, s_] if order == "eviction first" else [s_, h]
    plan = fill_batch(best + [v], [v, *reversed(best)], Limits(2, 64), kv)
    apply_plan(plan, kv, 0.0)
    kv.check_integrity()
    assert plan.preempted == [v] and [r.request_id for r, *_ in plan.scheduled] == [best[0].request_id]


def test_skip_join_joins_a_request_by_the_prefill_past_its_cached_prefix():
    from fastserve_jax.scheduler import Limits, make_scheduler
    from test_swap import CFG, COST

    kv = PrefixCachingKVManager(num_blocks=1200, block_size=16)
    stem = [3 + i % 200 for i in range(4000)]
    sched = make_scheduler("skip-join-mlfq", Limits(8, 8192), kv, CFG, COST)
    run_plan(kv, (req("warm", stem + [1]), 4001))
    cached, fresh = req("cached", stem + [2, 3]), req("fresh", [5 + i % 190 for i in range(4002)])
    sched.add(cached)
    sched.add(fresh)
    assert sched.entry_level(cached) == 0 < sched.entry_level(fresh) == fresh.queue_level
    assert cached.queue_level == 0


@pytest.mark.parametrize("policy", ["skip-join-mlfq", "fcfs"])
def test_a_start_that_evicts_the_only_holder_of_its_prefix_counts_those_blocks_once(policy):
    """V holds the two keyed blocks of S's prefix and nothing else is free: S may start by
    moving V out (skip-join with proactive swapping; FCFS takes a waiting request's KV), and
    V's eviction then frees no block that S counts on sharing (found by review: the plan
    counted them twice and did not fit)."""
    from fastserve_jax.scheduler import Limits, make_scheduler
    from fastserve_jax.scheduler.batch import fill_batch
    from test_swap import CFG, COST

    kv = PrefixCachingKVManager(num_blocks=4, block_size=4, num_host_blocks=20)      # 3 usable
    v = req("v", list(range(1, 9)) + [90])
    run_plan(kv, (v, 9))
    s_, t = req("s", list(range(1, 9)) + [91, 92]), req("t", [200, 201, 202, 203, 204])
    if policy == "fcfs":
        sched = make_scheduler("fcfs", Limits(8, 64), kv, CFG, COST)
        for r in (s_, t, v):
            sched.add(r)                          # v waits with device KV (uploaded ahead of need)
        plan = sched.schedule(0.0)
    else:
        plan = fill_batch([s_, t, v], [v, t, s_], Limits(8, 64), kv, swap=True, start_on_host=True, host_pools=4)
    apply_plan(plan, kv, 0.0)
    kv.check_integrity()
    assert [x.request for x in plan.scheduled] == [s_] and v in plan.preempted + plan.swapped_out


def test_blocks_shared_only_among_victims_are_freed_by_the_last_ones_eviction():
    """A and B (paused) share four prefix blocks; C must come back from the host into 9 blocks
    with 6 free. Evicting both frees 6 + 6, though each alone frees only its own tail: counted
    per victim, the plan evicted both and still scheduled nothing (found by fuzzing)."""
    from fastserve_jax.scheduler import Limits
    from fastserve_jax.scheduler.batch import fill_batch

    kv = PrefixCachingKVManager(num_blocks=13, block_size=4, num_host_blocks=30)        # 12 usable
    c = req("c", range(100, 132), max_tokens=40)
    run_plan(kv, (c, 32))
    c.output_token_ids.append(0)
    kv.swap_out(c)
    kv.finish_swap_out(c)
    stem = list(range(1, 17))
    a, b = req("a", stem + [50, 51, 52], max_tokens=40), req("b", stem + [60, 61, 62], max_tokens=40)
    for r in (a, b):
        run_plan(kv, (r, 19))
        r.output_token_ids.append(0)
    assert kv.num_free_blocks == 6
    plan = fill_batch([c, a, b], [b, a, c], Limits(2, 32), kv, swap=True)
    assert [x.request for x in plan.scheduled] == [c] and plan.swapped_out == [b, a]
    apply_plan(plan, kv, 0.0)
    kv.check_integrity()


@pytest.mark.parametrize("policy", ["skip-join-mlfq", "fcfs"])
def test_a_swap_in_counts_the_blocks_it_shares_and_evicts_nobody_for_them(policy):
    """B's host copy is 5 blocks, 4 of them A's prefix, which A (running) still holds; 2 blocks
    are free. B comes back into one new block and copies only it; counted whole, it would evict A."""
    from fastserve_jax.scheduler import Limits, make_scheduler
    from fastserve_jax.scheduler.batch import fill_batch
    from test_swap import CFG, COST

    kv = PrefixCachingKVManager(num_blocks=9, block_size=4, num_host_blocks=30)         # 8 usable
    stem = list(range(1, 17))
    a, b = req("a", stem + [50, 51], max_tokens=40), req("b", stem + [60, 61], max_tokens=40)
    for r in (a, b):
        run_plan(kv, (r, 18))
        r.output_token_ids.append(0)
    kv.swap_out(b)
    kv.finish_swap_out(b)
    run_plan(kv, (req("c", range(100, 104)), 4))                   # a block: 2 left free
    assert kv.num_free_blocks == 2 and kv.host_blocks(b) == 5 and kv.swap_in_shares(b) == (4, kv.block_table(a)[:4])
    if policy == "fcfs":
        sched = make_scheduler(policy, Limits(8, 32), kv, CFG, COST)
        sched.running.append(a)
        sched.waiting.append(b)
        plan = sched.schedule(0.0)
    else:
        plan = fill_batch([a, b], [b, a], Limits(8, 32), kv, swap=True)
    assert {x.request.request_id for x in plan.scheduled} == {"a", "b"} and not plan.swapped_out + plan.preempted
    copies = apply_plan(plan, kv, 0.0)
    assert [c.num_blocks for c in copies.swap_in] == [1] and kv.block_table(b)[:4] == kv.block_table(a)[:4]
    kv.check_integrity()


def test_a_request_dropped_during_its_prefill_reports_its_first_attempts_cached_tokens():
    from fastserve_jax.kv_plan import drop_kv

    kv = PrefixCachingKVManager(num_blocks=40, block_size=4)
    run_plan(kv, (req("a", range(1, 41)), 40))
    b = req("b", list(range(1, 25)) + [99] * 16)                   # 24 tokens in common: 6 blocks
    run_plan(kv, (b, 30))
    assert b.num_cached_tokens == 24
    drop_kv(b, kv)
    run_plan(kv, (b, 40))                                          # finds its own blocks and a's again
    assert b.num_cached_tokens == 24 and kv.hits > 48
    kv.check_integrity()


def test_cached_blocks_are_handed_out_last_and_least_recently_freed_first():
    kv = PrefixCachingKVManager(num_blocks=9, block_size=4)     # 8 usable
    a, b = req("a", range(1, 9)), req("b", range(101, 109))
    run_plan(kv, (a, 8), (b, 8))
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 4
    c = req("c", range(201, 217))                                # 4 blocks: the 4 never used
    run_plan(kv, (c, 16))
    assert kv.num_cached_blocks == 8 and kv.evictions == 0
    kv.free(c)
    d = req("d", range(301, 309))                                # 2 blocks: a's (freed first) go
    run_plan(kv, (d, 8))
    assert kv.evictions == 2
    assert run_plan(kv, (req("f", range(101, 109)), 8)).scheduled[0].num_tokens == 4  # b's prefix is kept
    assert run_plan(kv, (req("e", range(1, 9)), 8)).scheduled[0].num_tokens == 8      # a's is gone
    kv.check_integrity()


def test_a_swapped_out_request_comes_back_sharing_the_blocks_the_device_still_holds():
    """Going out it leaves a's three blocks on the device (a pin) and copies its own last one;
    coming back it takes them and copies only that block; with a gone and the prefix evicted
    meanwhile (b alone held it when it went out again: its copy was whole) it copies everything."""
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4, num_host_blocks=10)
    a, b = req("a", range(1, 14)), req("b", range(1, 14))
    run_plan(kv, (a, 13))
    run_plan(kv, (b, 13))
    assert len(kv.freeable_blocks(b)) == 1 and kv.num_used_blocks == 5
    copy = kv.swap_out(b)
    assert copy.device_blocks[:3] == (0, 0, 0) and copy.num_blocks == 1 and kv.swap_out_pinned == 3
    assert kv.host_blocks(b) == 4 and kv.num_used_blocks == 4
    kv.finish_swap_out(b)
    copy = kv.swap_in(b)
    table = kv.block_table(b)
    assert copy.device_blocks == (0, 0, 0, table[3]) and copy.num_blocks == 1 and kv.num_swapping_in_blocks == 1
    assert table[:3] == kv.block_table(a)[:3] and table[3] != kv.block_table(a)[3] and kv.num_used_blocks == 5
    kv.finish_swap_in(b)
    assert kv.swap_in_shared == 3 and kv.num_swapping_in_blocks == 0
    kv.check_integrity()
    b.output_token_ids += [7, 7, 7]                               # decode fills its fourth block
    run_plan(kv, (b, 1), (b, 0))
    kv.free(a)
    kv.swap_out(b)                                                # b alone held the prefix: now cached
    xs = [req(f"x{i}", range(100 * i + 50, 100 * i + 50 + n)) for i, n in enumerate([16, 16, 16, 16, 12])]
    for x in xs:                                                  # they take every block, cached ones last
        run_plan(kv, (x, x.num_prompt_tokens))
    assert kv.num_free_blocks == 0 and kv.evictions == 3           # b's three full blocks
    for x in xs:
        kv.free(x)
    copy = kv.swap_in(b)
    assert copy.num_blocks == 4 == len(set(copy.device_blocks)) and 0 not in copy.device_blocks
    kv.finish_swap_in(b)
    assert kv.swap_in_shared == 3
    kv.check_integrity()
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.num_host_used_blocks == 0


def _pinned_pair(num_blocks: int = 20):
    """a (5 blocks) and b (6: runs of 4 and 2) share a 4-block stem; b is swapped out."""
    kv = PrefixCachingKVManager(num_blocks=num_blocks, block_size=4, num_host_blocks=20)
    stem = list(range(1, 17))
    a, b = req("a", stem + [50, 51, 52, 53], max_tokens=40), req("b", stem + list(range(60, 68)), max_tokens=40)
    run_plan(kv, (a, 20))
    run_plan(kv, (b, 24))
    pins = kv.block_table(a)[:4]
    assert kv.block_table(b)[:4] == pins
    return kv, a, b, pins


def test_a_swap_out_leaves_a_prefix_others_hold_on_the_device_and_takes_it_back():
    """b's first run of 4 blocks is a's too: the swap-out copies only its last 2 (NULL_BLOCK in
    the others' places: the runner skips that run), b holds the 4 as a pin, and its swap-in
    takes them back as they are (and its own 2, still cached); a's eviction would free all 5 of its blocks (the pin goes with
    its last holder on the device)."""
    kv, a, b, pins = _pinned_pair()
    copy = kv.swap_out(b)
    assert copy.device_blocks[:4] == (0, 0, 0, 0) and copy.num_blocks == 2 and kv.swap_out_pinned == 4
    assert kv.host_blocks(b) == 6 and kv.num_used_blocks == 5 and len(kv.freeable_blocks(a)) == 5
    kv.check_integrity()
    kv.finish_swap_out(b)
    assert kv.swap_in_shares(b) == (6, pins)              # its own last 2 are still cached too
    back = kv.swap_in(b)
    assert back.device_blocks == (0,) * 6 and back.num_blocks == 0 and kv.block_table(b)[:4] == pins
    kv.finish_swap_in(b)
    kv.check_integrity()
    assert not kv.take_fills() and kv.num_used_blocks == 7
    kv.free(a)
    kv.free(b)
    assert kv.num_used_blocks == 0 and not kv.take_fills()
    kv.check_integrity()


def test_a_pinned_prefix_is_copied_out_once_no_request_on_the_device_holds_it():
    """When a, the last holder on the device, finishes, b's pinned blocks are owed to its host copy
    (a fill: the 4 blocks, then NULL_BLOCK) and let go, cached; evicted later, b's swap-in copies
    all 6 from the host. A pinned request that is dropped owes nothing."""
    kv, a, b, pins = _pinned_pair()
    kv.swap_out(b)
    kv.free(a)
    [fill] = kv.take_fills()
    assert fill.request is b and fill.device_blocks == (*pins, 0, 0) and fill.num_blocks == 4
    assert kv.num_used_blocks == 0 and set(pins) <= set(kv._cached)
    kv.check_integrity()
    xs = [req(f"x{i}", range(100 * i + 50, 100 * i + 66)) for i in range(5)]     # 20 blocks: the cache goes
    for x in xs[:4]:
        run_plan(kv, (x, 16))
    run_plan(kv, (xs[4], 12))
    for x in xs:
        kv.free(x)
    back = kv.swap_in(b)
    assert back.num_blocks == 6 and 0 not in back.device_blocks
    kv.finish_swap_in(b)
    kv.check_integrity()
    kv, a, b, pins = _pinned_pair()
    kv.swap_out(b)
    from fastserve_jax.kv_plan import drop_kv
    drop_kv(b, kv)                                         # its host copy goes: no fill, the pin let go
    assert not kv.take_fills() and kv.num_used_blocks == 5 and kv.host_blocks(b) == 0
    kv.free(a)
    assert not kv.take_fills()
    kv.check_integrity()


def test_a_plan_that_swaps_out_every_holder_of_a_pinned_prefix_frees_it_and_owes_the_copies():
    """a and c hold the stem on the device and b pins it. A plan swaps out a, then c: a pins it
    too (c still holds it), and c's release leaves it to pins alone, so both pins are copied out
    (after the plan's own swap-outs, before its step) and the stem is free, as the plan counted
    (freeable_blocks: c held it last on the device)."""
    kv, a, b, pins = _pinned_pair(num_blocks=24)
    c = req("c", list(range(1, 17)) + [70, 71, 72, 73], max_tokens=40)
    run_plan(kv, (c, 20))
    assert kv.block_table(c)[:4] == pins
    kv.swap_out(b)
    free0 = kv.num_free_blocks
    evicted: dict[int, int] = {}
    freed = kv.freeable_blocks(a, (), evicted) + kv.freeable_blocks(c, (), evicted)
    assert len(freed) == 6                                  # the stem (with c, its last holder) and both tails
    copies = apply_plan(Plan(swapped_out=[a, c]), kv, 0.0)
    assert [x.request.request_id for x in copies.swap_out] == ["a", "c", "b", "a"]     # the fills last
    assert [x.num_blocks for x in copies.swap_out[:2]] == [1, 5]     # a pinned its stem, c copied it
    assert all(x.device_blocks[:4] == tuple(pins) and x.num_blocks == 4 for x in copies.swap_out[2:])
    assert kv.num_free_blocks == free0 + 6 and kv.num_used_blocks == 0
    kv.check_integrity()


def test_a_swap_in_on_demand_does_not_share_blocks_its_own_step_writes():
    """b's prefix was evicted while it was on the host; in the plan that brings it back, s (ranked
    before it) computes the same prefix. b's upload lands before the step and b decodes in the
    decode launch, which runs before s's prefill writes those blocks: it must copy them, not share
    them."""
    kv = PrefixCachingKVManager(num_blocks=20, block_size=4, num_host_blocks=10)
    b = req("b", range(1, 14))
    run_plan(kv, (b, 13))
    kv.swap_out(b)
    kv.finish_swap_out(b)
    kv.reset()                                                    # its cached prefix handed out meanwhile
    b.output_token_ids.append(7)
    s_ = req("s", range(1, 14))
    plan = Plan(scheduled=[ScheduledRequest(s_, 13), ScheduledRequest(b, 1)])
    copies = apply_plan(plan, kv, 0.0)
    assert copies.swap_in[0].num_blocks == 4 and not set(kv.block_table(b)) & set(kv.block_table(s_))
    kv.check_integrity()


@pytest.mark.parametrize("policy", ["proactive", "reactive", "recompute"])
@pytest.mark.parametrize("seed, scheduler", [(0, "skip-join-mlfq"), (1, "skip-join-mlfq"), (2, "fcfs")])
def test_randomized_ledger_with_shared_prefixes(policy, seed, scheduler):
    """Arrivals behind four shared prefixes, preemption, swaps both ways, aborts and finishes:
    the shared ledger stays consistent after every iteration, the plans always fit (starts
    count on sharing the blocks their prefixes' holders keep, evictions count what they free),
    and everything is free (some of it cached) at the end."""
    rng = random.Random(seed)
    kv = PrefixCachingKVManager(num_blocks=40, block_size=4, num_host_blocks=0 if policy == "recompute" else 30)
    stems = [[rng.randint(3, 200) for _ in range(rng.randint(4, 24))] for _ in range(4)]

    def new_request(i: int) -> Request:
        tail = [rng.randint(3, 200) for _ in range(rng.randint(1, 16))]
        return req(f"r{i}", rng.choice(stems) + tail, max_tokens=rng.randint(1, 40))

    randomized_run(kv, policy, rng, new_request, scheduler)
    assert kv.hits > 0


# -- the engine: tokens as without caching -------------------------------------------------------
def _prompts(n, seed, shared):
    rng = np.random.default_rng(seed)
    stem = [int(x) for x in rng.integers(3, 250, shared)]
    return [stem + [int(x) for x in rng.integers(3, 250, int(k))] for k in rng.integers(5, 30, n)]


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    prompts = _prompts(10, 5, 50)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, warmup=False, num_device_blocks=160, scheduler="fcfs",
                                     **ENGINE_KW).generate(prompts, sp)]
    return path, prompts, sp, want


def test_identical_prompts_of_one_step_answer_right():
    """The demo model's 7-token prompts in 2-token blocks: the second of two identical prompts (or
    of a request's n choices) found every full block of the first's chunk in the same step and was
    left 1 token, which the decode launch ran before the prefill that writes those blocks: it
    counted from 512 (found by fuzzing the engine, 2026-12-06)."""
    from fastserve_jax.models import demo_task

    llm = LLM(None, warmup=False, enable_prefix_caching=True, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=32, block_size=2, decode_batch_buckets=(4,), prefill_token_buckets=(32,))
    p, q = demo_task.make_prompt(3, 12), demo_task.make_prompt(40, 52)
    assert (len(llm.tokenizer.encode(p)) - 1) % 2 == 0
    outs = llm.generate([p, p, q], SamplingParams(max_tokens=16, temperature=0))
    outs += llm.generate([demo_task.make_prompt(7, 19)], SamplingParams(max_tokens=16, temperature=0, n=2))
    texts = [c.text for o in outs for c in o.outputs]
    assert texts == [demo_task.expected_answer(a, b) for a, b in ((3, 12), (3, 12), (40, 52), (7, 19), (7, 19))]
    llm.engine.kv.check_integrity()


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_a_step_that_raises_after_its_plan_leaves_no_unwritten_prefix(reference, fault):
    """A step that raised after its plan gave keys to the blocks it was to write (a caller's
    SIGALRM handler, a failed compile of a new launch shape): LLM.generate aborted the requests
    but kept the keys, so the next generate of the same prompts matched blocks no step wrote
    and answered wrong (found by a probe, 2026-12-07). A Ctrl-C taken between steps keeps them."""
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, enable_prefix_caching=True, **ENGINE_KW)
    e = llm.engine
    real, calls = e.copies.on_demand, []

    def on_demand(copies):          # the step's first call after apply_plan
        calls.append(1)
        if len(calls) == 1:
            raise fault("in the middle of a step")
        return real(copies)

    e.copies.on_demand = on_demand
    with pytest.raises(fault):
        llm.generate(prompts[:3], sp)
    assert not e.has_unfinished() and e.kv.num_cached_blocks == 0
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    e.kv.check_integrity()


@pytest.mark.parametrize("caching", [True, False])
def test_a_release_cut_short_leaks_no_block_for_good(reference, caching):
    """An exception in the middle of a finished request's release (a caller's signal handler
    that raised there) left the rest of its blocks owned by nobody, for good: a probe's
    line-level faults leaked 3 of a tight pool's blocks in 2 of 150 trials (2026-12-07). An
    engine left with no live request starts its ledger over."""
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, enable_prefix_caching=caching, **ENGINE_KW)
    e = llm.engine
    real, calls = e.kv._release, []

    def release(table):
        if not calls and len(table) > 1:
            calls.append(1)
            real(table[:1])
            raise RuntimeError("in the middle of a release")
        return real(table)

    e.kv._release = release
    with pytest.raises(RuntimeError, match="middle of a release"):
        llm.generate(prompts[:3], sp)
    assert not e.has_unfinished() and e.kv.num_used_blocks == 0
    e.kv.check_integrity()
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    e.kv.check_integrity()


def test_swap_outs_count_requests_not_the_fills_owed_for_shared_blocks():
    """A swapped-out request leaves the blocks others share on the device; once they let go,
    those are copied to its host KV (a fill, KVManager.take_fills). That copy is no preemption:
    vllm:num_preemptions_total counted each fill as one more (2026-12-07)."""
    import random

    llm = LLM(None, warmup=False, num_device_blocks=40, num_host_blocks=100, swap_policy="proactive",
              scheduler="skip-join-mlfq", enable_prefix_caching=True, **ENGINE_KW)
    e, rng = llm.engine, random.Random(0)
    fills, swapped_out = [], []
    take, schedule = e.kv.take_fills, e.scheduler.schedule

    def taken():
        got = take()
        fills.extend(got)
        return got

    def counted(now):
        plan = schedule(now)
        swapped_out.extend(plan.swapped_out)
        return plan

    e.kv.take_fills, e.scheduler.schedule = taken, counted
    stems = [e.tokenizer.encode("".join(f" {n}" for n in range(s, s + n))) for s, n in ((100, 37), (500, 70))]
    for _ in range(10):
        tail = e.tokenizer.encode("".join(f" {n}" for n in range(rng.randrange(0, 900), 999)))
        e.add_request(rng.choice(stems) + tail[:rng.choice([1, 5, 9, 17])],
                      SamplingParams(max_tokens=rng.choice([4, 20, 60, 120]), ignore_eos=True, temperature=0))
    while e.has_unfinished():
        e.step()
    assert fills and swapped_out
    assert e.stats.swap_outs_on_demand == len(swapped_out)
    snap = e.snapshot()
    assert snap["swap_outs_total"] == len(swapped_out) + e.stats.swap_outs_ahead


@pytest.mark.parametrize("policy, scheduler", [("proactive", "skip-join-mlfq"), ("reactive", "fcfs"),
                                               ("recompute", "skip-join-mlfq")])
def test_tokens_identical_with_shared_prefixes_under_memory_pressure(reference, policy, scheduler):
    """Ten requests behind a 50-token shared prompt in a 29-block pool: they share its blocks,
    go out and come back (or are recomputed), and greedy tokens match a run without caching."""
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy=policy, scheduler=scheduler,
              enable_prefix_caching=True, **ENGINE_KW)
    e = llm.engine
    reqs = [e.add_request(p, sp) for p in prompts]
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
    assert [r.output_token_ids for r in reqs] == want
    assert e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0
    # the first two start in the same step (nothing cached yet); under pressure some of the shared
    # blocks are handed out before the last requests start
    assert sum(r.num_cached_tokens > 0 for r in reqs) >= 7
    snap = e.snapshot()
    assert snap["prefix_cache_hits_total"] == e.kv.hits > 0 and snap["prefix_cache_queries_total"] == e.kv.queries
    if policy == "recompute":       # a dropped request finds its own blocks again
        assert e.stats.recomputations > 0 and e.kv.hits > sum(r.num_cached_tokens for r in reqs)
    else:       # and swapped requests come back sharing what the device still holds of their prefix
        assert e.stats.swap_out_blocks > 0 and snap["swap_in_shared_blocks_total"] == e.kv.swap_in_shared > 0


def test_tokens_identical_with_pipeline_batches_in_flight(reference):
    """Two pipeline stages, two batches in flight, proactive swapping: a batch planned while the
    one before it is on the device may match the blocks that batch writes (each stage runs its
    batches in issue order)."""
    path, prompts, sp, want = reference
    e = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, pipeline_parallel_size=2,
            enable_prefix_caching=True, **ENGINE_KW).engine
    assert e.cfg.batches_in_flight == 2
    reqs = [e.add_request(p, sp) for p in prompts]
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
    assert [r.output_token_ids for r in reqs] == want and e.kv.hits > 0 and e.stats.swap_out_blocks > 0


@pytest.mark.parametrize("seed, policy, scheduler", [(1, "proactive", "skip-join-mlfq"),
                                                    (0, "recompute", "skip-join-mlfq"), (4, "proactive", "fcfs")])
def test_second_turns_stop_tokens_and_aborts_in_a_tight_pool_match_caching_off(tiny_checkpoints, seed, policy,
                                                                                scheduler):
    """Three shared stems; a second turn whose prompts extend the first turn's prompts and
    answers (so answers' blocks are matched too), then the first turn again; a stop token that
    ends many answers early (async scheduling's extra rows); aborts mid-flight; a 29-block pool. Greedy tokens equal
    a run without caching. (A review's version of this run, on other random weights, crashed
    with "plan does not fit" before a start that evicts its prefix's only holder counted those
    blocks once; the ledger test above pins that case.)"""
    path = tiny_checkpoints("llama")
    rng = random.Random(seed)
    stems = [[rng.randint(3, 250) for _ in range(rng.randint(9, 40))] for _ in range(3)]
    prompts = [rng.choice(stems) + [rng.randint(3, 250) for _ in range(rng.randint(1, 12))] for _ in range(14)]
    lens = [rng.randint(2, 40) for _ in prompts]
    ref = LLM(path, warmup=False, num_device_blocks=200, scheduler="fcfs", **ENGINE_KW)

    def params(ns, stop=None):
        return [SamplingParams(max_tokens=n, temperature=0, stop_token_ids=stop) for n in ns]

    first = [o.token_ids for o in ref.generate(prompts, params(lens))]
    stop = [Counter(t for o in first for t in o).most_common(1)[0][0]]
    want1 = [o.token_ids for o in ref.generate(prompts, params(lens, stop))]
    turn2 = [p + o + [rng.randint(3, 250) for _ in range(rng.randint(1, 10))] for p, o in zip(prompts, want1)]
    lens2 = [rng.randint(2, 30) for _ in turn2]
    want2 = [o.token_ids for o in ref.generate(turn2, params(lens2, stop))]
    e = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy=policy, scheduler=scheduler,
            enable_prefix_caching=True, **ENGINE_KW).engine
    for turn, (ps, ns, want) in enumerate([(prompts, lens, want1), (turn2, lens2, want2), (prompts, lens, want1)]):
        reqs = [e.add_request(p, sp) for p, sp in zip(ps, params(ns, stop))]
        aborted = set()
        while e.has_unfinished():
            e.step()
            e.kv.check_integrity()
            if turn == 1 and rng.random() < 0.08 and (live := [r for r in reqs if not r.finished]):
                r = rng.choice(live)
                aborted.add(r.request_id)
                e.abort(r.request_id)
        assert [r.output_token_ids for r in reqs if r.request_id not in aborted] == \
            [w for r, w in zip(reqs, want) if r.request_id not in aborted]
    assert e.kv.hits > 0 and e.kv.num_used_blocks == 0


def test_reset_prefix_cache_makes_the_next_request_compute_its_prefix(reference):
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, num_device_blocks=160, scheduler="fcfs", enable_prefix_caching=True, **ENGINE_KW)
    assert llm.generate(prompts[:1], sp)[0].num_cached_tokens == 0
    assert llm.reset_prefix_cache() and llm.engine.kv.num_cached_blocks == 0
    out = llm.generate(prompts[1:2], sp)
    assert llm.engine.kv.hits == 0 and out[0].token_ids == want[1] and out[0].num_cached_tokens == 0
    out = llm.generate(prompts[2:3], sp)        # RequestOutput.num_cached_tokens: vLLM's field
    assert out[0].token_ids == want[2] and out[0].num_cached_tokens == llm.engine.kv.hits == 48
    plain = LLM(path, warmup=False, num_device_blocks=160, scheduler="fcfs", **ENGINE_KW)
    assert not plain.reset_prefix_cache() and plain.generate(prompts[2:4], sp)[1].num_cached_tokens == 0


def test_prompt_logprobs_are_computed_not_taken_from_the_cache(reference):
    path, prompts, sp, _ = reference
    llm = LLM(path, warmup=False, num_device_blocks=160, scheduler="fcfs", enable_prefix_caching=True, **ENGINE_KW)
    plain = LLM(path, warmup=False, num_device_blocks=160, scheduler="fcfs", **ENGINE_KW)
    lp = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2)
    llm.generate(prompts[:1], sp)
    got, = llm.generate(prompts[1:2], lp)
    ref, = plain.generate(prompts[1:2], lp)
    assert [x and (x.token_id, round(x.logprob, 4)) for x in got.prompt_logprobs] == \
        [x and (x.token_id, round(x.logprob, 4)) for x in ref.prompt_logprobs]
    assert got.token_ids == ref.token_ids
