"""KV swapping between the device and host pools: the ledger, the policies, the copies, and
end-to-end token identity under memory pressure."""

from __future__ import annotations

import dataclasses

import random

import jax
import numpy as np
import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.runner.compile_guard import CompileCounter
from engine_grids import DEMO_SWAP_GRID, SMALL_GRID
from fastserve_jax.config import SchedulerConfig
from fastserve_jax.cost_model import CostModel
from fastserve_jax.kv_cache import KVLocation, KVManager
from fastserve_jax.kv_plan import SwapAhead, apply_ahead, apply_plan
from fastserve_jax.runner.kv_transfer import power_of_two_runs
from fastserve_jax.request import Request, RequestStatus
from fastserve_jax.scheduler import Limits, make_scheduler
from fastserve_jax.scheduler.base import Plan, ScheduledRequest
from fastserve_jax.sim import SimConfig, advance, simulate
from fastserve_jax.swap_policy import SwapPolicy
from fastserve_jax.workload import TraceRequest
from fastserve_jax.models import demo_task

COST = CostModel("literal", prefill_tokens=(1, 100, 10_000), prefill_seconds=(0.01, 0.01, 1.0),
                 decode_batch=(1,), decode_seconds=(0.01,), kv_bytes_per_token=1000, swap_bandwidth=1e6)
CFG = SchedulerConfig(base_quantum=0.01, quantum_ratio=2.0, num_queues=5, starvation_threshold=0.2)
# the small bucket grid: engines with the same pool share executables through the session
# cache (the reference's 160 blocks are test_engine's, the 30 of the others are shared here)
ENGINE_KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8, scheduler="mlfq",
                 **SMALL_GRID)


def req(rid: str, n: int, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0)


# -- the ledger -------------------------------------------------------------------------------
def test_swap_lifecycle_moves_blocks_between_pools():
    kv = KVManager(num_blocks=9, block_size=4, num_host_blocks=5)
    a = req("a", 10)
    kv.allocate(a, 10)
    a.num_computed_tokens = 10
    assert kv.location(a) is KVLocation.DEVICE and kv.num_free_blocks == 5
    out = kv.swap_out(a)
    assert out.num_blocks == 3 and kv.num_free_blocks == 8 and kv.num_host_used_blocks == 3
    assert kv.location(a) is KVLocation.SWAPPING_OUT and kv.block_table(a) == [] and kv.has_kv(a)
    kv.finish_swap_out(a)
    assert kv.location(a) is KVLocation.HOST and kv.blocks_needed(a, 1) == 3
    kv.check_integrity()
    back = kv.swap_in(a)
    assert back.num_blocks == 3 and kv.location(a) is KVLocation.SWAPPING_IN
    assert kv.num_host_used_blocks == 3 and kv.num_free_blocks == 5      # in flight: holds both
    kv.check_integrity()
    kv.finish_swap_in(a)
    assert kv.location(a) is KVLocation.DEVICE and kv.num_host_used_blocks == 0
    kv.allocate(a, 3)                                                     # grows again on the device
    assert len(kv.block_table(a)) == 4
    kv.free(a)
    assert kv.num_free_blocks == 8 and not kv.has_kv(a)
    kv.check_integrity()


def test_host_pool_full_refuses_swap_out_and_integrity_catches_leaks():
    kv = KVManager(num_blocks=9, block_size=4, num_host_blocks=2)
    a = req("a", 10)
    kv.allocate(a, 10)
    assert not kv.can_swap_out(a)
    with pytest.raises(RuntimeError, match="host pool full"):
        kv.swap_out(a)
    kv.check_integrity()                  # the refused swap left nothing half done
    kv._host_free -= 1
    with pytest.raises(AssertionError, match="host blocks"):
        kv.check_integrity()


def test_power_of_two_runs():
    assert power_of_two_runs(13) == [8, 4, 1]
    assert power_of_two_runs(1) == [1] and power_of_two_runs(16) == [16] and power_of_two_runs(0) == []


def test_eviction_swaps_while_the_host_has_room_then_recomputes_the_lowest():
    """A holder that must grow evicts lower-priority paused requests: to the host while it has
    room, then (host full) by dropping their KV."""
    kv = KVManager(num_blocks=13, block_size=4, num_host_blocks=3)
    sched = make_scheduler("mlfq", Limits(1, 100), kv, CFG)
    sched.swap_on_evict = True
    rs = [req(f"r{i}", 12, max_tokens=40) for i in range(4)]
    for r in rs:
        sched.add(r)
        kv.allocate(r, 12)
        r.num_computed_tokens = 12
        r.output_token_ids.append(5)       # the next decode step writes position 12
    assert kv.num_free_blocks == 0
    plan = sched.schedule(0.0)             # r0 decodes and needs a 4th block
    assert [s.request.request_id for s in plan.scheduled] == ["r0"]
    assert plan.swapped_out == [rs[3]] and plan.preempted == []
    apply_plan(plan, kv, 0.0)
    kv.check_integrity()
    rs[0].num_computed_tokens = 24
    rs[0].output_token_ids += [5] * 12     # 25 tokens: 3 more blocks, 2 free; the host is full: r2 is dropped
    plan = sched.schedule(0.0)
    assert plan.preempted == [rs[2]] and plan.swapped_out == []
    apply_plan(plan, kv, 0.0)
    assert rs[2].num_computed_tokens == 0 and rs[2].status is RequestStatus.WAITING
    assert kv.location(rs[3]) is KVLocation.SWAPPING_OUT
    kv.check_integrity()


def test_mlfq_enst_orders_by_queue_and_promotion():
    kv = KVManager(num_blocks=100, block_size=4)
    sched = make_scheduler("mlfq", Limits(1, 100), kv, SchedulerConfig(base_quantum=0.01, num_queues=3,
                                                                       starvation_threshold=1.0))
    a, b, c = req("a", 4), req("b", 4), req("c", 4)
    for r in (a, b, c):
        sched.add(r)
    sched._move(c, 2)                      # quanta 0.01, 0.02, 0.04
    a.attained_service = 0.004
    est = sched.next_run_estimates(0.5, 0.01)
    assert est["a"] == 0.0
    assert est["b"] == pytest.approx(0.01 - 0.004)                   # rest of a's quantum in queue 0
    # c waits for a and b to fall through queues 0 and 1: (0.03 - 0.004) + 0.03
    assert est["c"] == pytest.approx(0.056)
    # 3 live requests share 1 slot: the 1 s threshold stretches to 3 s, and promotion comes first
    assert sched.next_run_estimates(2.99, 0.01)["c"] == pytest.approx(0.01)
    # asked for some requests only (the swap policy asks for the KV holders): the same figures
    assert sched.next_run_estimates(0.5, 0.01, only={"c", "b"}) == {k: est[k] for k in ("b", "c")}
    fcfs = make_scheduler("fcfs", Limits(1, 100), kv)
    for r in (req("x", 4), req("y", 4), req("z", 4)):
        fcfs.add(r)
    assert fcfs.next_run_estimates(0.0, 0.01, only={"z"}) == {"z": 0.02}


@pytest.mark.parametrize("seconds_per_block,in_flight,uploads", [
    (0.0, 0, 4),          # speed unknown: as many as the free blocks take
    (0.01 / 2.5, 0, 1),   # 2.5 blocks per step: one 2-block request, the next does not fit
    (0.01 / 1, 0, 1),     # under one request per step: still one, so uploads make progress
    (0.01 / 2.5, 3, 0)])  # 3 blocks already on their way use up the step's link
def test_uploads_ahead_fit_what_the_link_carries_in_one_step(seconds_per_block, in_flight, uploads):
    kv = KVManager(num_blocks=24, block_size=4, num_host_blocks=24)
    sched = make_scheduler("fcfs", Limits(8, 64), kv, CFG, COST)
    swap = SwapPolicy("proactive", kv, 64, seconds_per_block=seconds_per_block)
    swap.on_iteration(0.01)
    hosted = [req(f"r{i}", 8) for i in range(4)]
    busy = [req("busy", 4 * in_flight)] if in_flight else []
    for r in hosted + busy:
        sched.add(r)
        kv.allocate(r, r.num_prompt_tokens)
        r.num_computed_tokens = r.num_prompt_tokens
        kv.swap_out(r)
        kv.finish_swap_out(r)
    for r in busy:
        kv.swap_in(r)
    assert kv.num_swapping_in_blocks == in_flight
    ahead = swap.plan_ahead(Plan(), {r.request_id: r for r in hosted}, sched, 0.01)
    assert [r.request_id for r in ahead.upload] == [f"r{i}" for i in range(uploads)] and not ahead.offload


@pytest.mark.parametrize("host_tokens,uploads", [(24, []), (8, ["host"])])
def test_the_planner_estimates_next_runs_only_when_something_can_move(host_tokens, uploads):
    """Every device holder runs (nothing to offload), so an upload must fit the free blocks
    above the reserve. A 6-block request in 5 free blocks cannot: nothing moves, and the
    planner says so without the next-run estimates (its cost, most iterations where memory
    binds). A 2-block one can: it is uploaded, ranked by the estimates."""
    kv = KVManager(num_blocks=10, block_size=4, num_host_blocks=24)
    sched = make_scheduler("skip-join-mlfq", Limits(8, 64), kv, CFG, COST)
    swap = SwapPolicy("proactive", kv, 64, reserve_blocks=1)
    swap.on_iteration(0.01)
    running, hosted = req("run", 16), req("host", host_tokens)
    for r in (hosted, running):
        sched.add(r)
        kv.allocate(r, r.num_prompt_tokens)
        r.num_computed_tokens = r.num_prompt_tokens
        if r is hosted:
            kv.swap_out(hosted)
            kv.finish_swap_out(hosted)
    assert kv.num_free_blocks == 5
    estimates = []
    real = sched.next_run_estimates
    sched.next_run_estimates = lambda *a, **k: estimates.append(1) or real(*a, **k)
    plan = Plan(scheduled=[ScheduledRequest(running, 1)])
    ahead = swap.plan_ahead(plan, {r.request_id: r for r in (running, hosted)}, sched, 0.01)
    assert [r.request_id for r in ahead.upload] == uploads and not ahead.offload
    assert len(estimates) == len(uploads)


def _retire(plan, now, kv, sched, swap, live) -> None:
    """The step of `plan` ended at `now` (0.01 s long): finished requests leave every ledger."""
    for r in advance(plan, now):
        kv.free(r)
        sched.remove(r)
        swap.forget(r)
        del live[r.request_id]
    sched.on_iteration(plan, 0.01, now)


# -- a long randomized run of the ledger under every swap policy -----------------------------
def randomized_run(kv, policy: str, rng: random.Random, new_request, scheduler: str = "skip-join-mlfq") -> int:
    """600 iterations of `scheduler` over `kv` with arrivals (`new_request(i)`, 120 at most),
    preemption, swaps both ways, cancellations and finishes, checking the ledger after every
    iteration; everything is freed at the end. Returns the swap copies issued."""
    sched = make_scheduler(scheduler, Limits(6, 32), kv, CFG, COST)
    swap = SwapPolicy(policy, kv, 32)
    sched.swap_on_evict = swap.swaps
    live: dict[str, Request] = {}
    uploading: list[Request] = []
    now, made, moves = 0.0, 0, 0
    for it in range(600):
        if made < 120 and rng.random() < 0.35:
            r = new_request(made)
            made += 1
            live[r.request_id] = r
            sched.add(r)
            swap.on_arrival(r, now)
        for r in uploading:
            if kv.location(r) is KVLocation.SWAPPING_IN:
                kv.finish_swap_in(r)
        uploading.clear()
        for r in live.values():
            kv.finish_swap_out(r)
        if live and rng.random() < 0.03:                 # a client goes away
            r = rng.choice(list(live.values()))
            r.status, r.finish_reason = RequestStatus.FINISHED, "abort"
            sched.remove(r)
            kv.free(r)
            swap.forget(r)
            del live[r.request_id]
        if not live:
            now += 0.01
            continue
        plan = sched.schedule(now)
        assert plan.scheduled, "some request always runs"
        copies = apply_plan(plan, kv, now)
        ahead = swap.plan_ahead(plan, live, sched, now)
        # a request that runs in this step is never offloaded under it
        assert not {r.request_id for r in ahead.offload} & {s.request.request_id for s in plan.scheduled}
        later = apply_ahead(ahead, kv)
        uploading += [c.request for c in later.swap_in]
        moves += len(copies.swap_out) + len(copies.swap_in) + len(later.swap_out) + len(later.swap_in)
        kv.check_integrity()
        now += 0.01
        _retire(plan, now, kv, sched, swap, live)
        swap.on_iteration(0.01)
        kv.check_integrity()
    for r in list(live.values()):
        kv.free(r)
    kv.check_integrity()
    assert kv.num_used_blocks == 0 and kv.num_host_used_blocks == 0
    return moves


@pytest.mark.parametrize("policy", ["proactive", "reactive", "recompute"])
@pytest.mark.parametrize("seed", [0, 1])
def test_randomized_ledger_invariants(policy, seed):
    """Arrivals, preemption, swaps both ways, cancellations and finishes: the ledger stays
    consistent after every iteration and everything is freed at the end."""
    rng = random.Random(seed)
    kv = KVManager(num_blocks=40, block_size=4, num_host_blocks=0 if policy == "recompute" else 30)
    moves = randomized_run(kv, policy, rng, lambda i: req(f"r{i}", rng.randint(1, 40), max_tokens=rng.randint(1, 60)))
    assert (moves > 0) == (policy != "recompute")


# -- the simulator ----------------------------------------------------------------------------
def test_simulator_charges_swap_time():
    trace = [TraceRequest(0.001 * i, 30 + 7 * (i % 5), 20 + 13 * (i % 4)) for i in range(40)]
    base = dict(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_capacity_tokens=200,
                scheduler_config=CFG)
    out = {}
    for policy in ("recompute", "reactive", "proactive"):
        r = simulate(trace, "skip-join-mlfq", COST, SimConfig(**base, host_kv_capacity_tokens=400, swap_policy=policy))
        assert all(len(q.output_token_ids) == t.output_tokens for q, t in zip(r.requests, trace))
        out[policy] = r.metrics()
    assert out["recompute"]["swap_blocks_out"] == 0
    for policy in ("reactive", "proactive"):
        m = out[policy]
        assert m["swap_blocks_out"] > 0 and m["swap_stall_seconds"] > 0   # a 1 MB/s link: on-demand swap-ins stall
        # skip-join: memory binds and a backlog waits, so new requests drop some host KV instead
        # of waiting for it to come back (SkipJoinMLFQScheduler.drops_to_start)
        assert 0 < m["swap_blocks_in"] < m["swap_blocks_out"] and m["preemptions"] > 0, policy
    # plain MLFQ drops no host KV to start requests: every block copied out comes back
    m = simulate(trace, "mlfq", COST, SimConfig(**base, host_kv_capacity_tokens=400, swap_policy="reactive")).metrics()
    assert 0 < m["swap_blocks_out"] == m["swap_blocks_in"] and m["swap_stall_seconds"] > 0
    with pytest.raises(ValueError, match="swap_bandwidth"):
        simulate(trace, "mlfq", CostModel("bare", (1,), (0.01,), (1,), (0.01,)),
                 SimConfig(**base, host_kv_capacity_tokens=400, swap_policy="reactive"))


def test_simulator_charges_swap_issue_time_and_the_policys_host_time_only_when_asked():
    trace = [TraceRequest(0.001 * i, 30 + 7 * (i % 5), 20 + 13 * (i % 4)) for i in range(40)]
    cfg = SimConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_capacity_tokens=200,
                    scheduler_config=CFG, host_kv_capacity_tokens=400, swap_policy="proactive")
    plain = simulate(trace, "skip-join-mlfq", COST, cfg).metrics()
    # the launches, the stalls and nothing else make up the busy time; the policy's calls are timed anyway
    assert plain["swap_busy_seconds"] == pytest.approx(plain["launch_seconds"] + plain["swap_stall_seconds"])
    assert plain["swap_copies_issued"] > 0 and plain["policy_host_seconds"] > 0
    issue = dataclasses.replace(COST, swap_issue_seconds=0.5)           # half a second per copy: dominates
    m = simulate(trace, "skip-join-mlfq", issue, cfg).metrics()
    assert m["swap_busy_seconds"] == pytest.approx(
        m["launch_seconds"] + m["swap_stall_seconds"] + 0.5 * m["swap_copies_issued"])
    assert m["swap_busy_seconds"] > plain["swap_busy_seconds"] + 0.5 * plain["swap_copies_issued"] / 2
    charged = simulate(trace, "skip-join-mlfq", COST, dataclasses.replace(cfg, host_time_scale=2.5)).metrics()
    # the charged time is the policy's own, scaled: what the run measured, on top of launches and stalls
    assert charged["swap_busy_seconds"] == pytest.approx(
        charged["launch_seconds"] + charged["swap_stall_seconds"] + 2.5 * charged["policy_host_seconds"], rel=1e-9)
    with pytest.raises(ValueError, match="host_time_scale must be"):
        dataclasses.replace(cfg, host_time_scale=-1.0)


def test_simulator_with_async_scheduling_runs_the_host_work_beside_the_launch():
    """SimConfig.async_scheduling: the host work of a step (here half a second to issue each swap
    copy) runs beside the launch before, plus (1 - async_overlap) of the shorter of the two; a
    launch after a long host step is hidden only by the host work of the step after it."""
    trace = [TraceRequest(0.001 * i, 30 + 7 * (i % 5), 20 + 13 * (i % 4)) for i in range(40)]
    cfg = SimConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_capacity_tokens=200,
                    scheduler_config=CFG, host_kv_capacity_tokens=400, swap_policy="proactive")
    wall = ("sim_wall_seconds", "policy_host_seconds")          # this process's clock, not the simulation's

    # when each token is read moves with async scheduling (the next test), nothing else
    late = ("mean_jct", "p50_jct", "p95_jct", "p99_jct", "mean_ttft", "p99_ttft", "mean_tpot",
            "mean_latency_per_token", "throughput_rps", "throughput_tps")

    def run(cost, **kw):
        m = simulate(trace, "skip-join-mlfq", cost, dataclasses.replace(cfg, **kw)).metrics()
        return {k: v for k, v in m.items() if k not in wall + late}

    # nothing on the host: the launches back to back (stalls may hide behind the launch before)
    m = run(COST, async_scheduling=True)
    assert m["launch_seconds"] <= m["swap_busy_seconds"] <= m["launch_seconds"] + m["swap_stall_seconds"] + 1e-9
    issue = dataclasses.replace(COST, swap_issue_seconds=0.5)
    sync = run(issue)
    assert sync["swap_busy_seconds"] - sync["swap_stall_seconds"] == pytest.approx(
        sync["launch_seconds"] + 0.5 * sync["swap_copies_issued"])
    m = run(issue, async_scheduling=True, async_overlap=0.0)        # nothing hidden: the sum (a stall may wait
    launch, host = m["launch_seconds"], 0.5 * m["swap_copies_issued"]  # while the launch before runs)
    assert launch + host - 1e-9 <= m["swap_busy_seconds"] <= launch + host + m["swap_stall_seconds"] + 1e-9
    # (each run schedules on its own clock, so their copies and launches differ; each within its bounds)
    for overlap in (1.0, 0.5):
        m = run(issue, async_scheduling=True, async_overlap=overlap)
        launch, host = m["launch_seconds"], 0.5 * m["swap_copies_issued"]
        busy = m["swap_busy_seconds"] - m["swap_stall_seconds"]
        assert max(launch, host) + (1 - overlap) * min(launch, host) <= busy + 1e-9 < launch + host, overlap
    with pytest.raises(ValueError, match="async_overlap must be in"):
        dataclasses.replace(cfg, async_overlap=1.5)


def test_simulator_with_async_scheduling_reads_each_iteration_s_tokens_during_the_next():
    """LLMEngine.step reads batch N's tokens once it has planned and dispatched batch N + 1, so
    the simulator stamps a first token or a finish after the next iteration's host work (here a
    second, far longer than any launch, so each iteration takes a second); the last batch is
    read when its launch ends."""
    host_bound = dataclasses.replace(COST, iteration_overhead=1.0)
    trace = [TraceRequest(0.0, 10, 2), TraceRequest(0.0, 10, 6)]
    cfg = SimConfig(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, kv_capacity_tokens=200,
                    scheduler_config=CFG)
    short, long = simulate(trace, "fcfs", host_bound, dataclasses.replace(cfg, async_scheduling=True)).requests
    # iteration 0 (ends at 1 s) prefills both; 1 ends the short one; 2-5 decode the long one
    assert short.metrics.ttft == pytest.approx(2.0) and long.metrics.ttft == pytest.approx(2.0)
    assert short.metrics.latency == pytest.approx(3.0)
    assert long.metrics.latency == pytest.approx(6.01)              # the last batch: dispatched at 6 s, 10 ms
    sync_short, sync_long = simulate(trace, "fcfs", host_bound, cfg).requests
    assert 1.0 < sync_short.metrics.ttft < 1.1 and 2.0 < sync_short.metrics.latency < 2.2   # launch + host, in turn


def _serve_fcfs_proactive(sizes, num_blocks, num_host_blocks, budget, limit=500):
    """fcfs with proactive swapping, copies landing at once, the calls in the engine's order:
    the iterations it took to finish `sizes` [(prompt, max_tokens)], or where each live
    request's KV sits when `limit` iterations did not."""
    kv = KVManager(num_blocks, 8, num_host_blocks)
    sched = make_scheduler("fcfs", Limits(8, budget), kv, CFG, COST)
    swap = SwapPolicy("proactive", kv, budget)
    live = {}
    for i, (p, o) in enumerate(sizes):
        r = req(f"r{i}", p, max_tokens=o)
        live[r.request_id] = r
        sched.add(r)
        swap.on_arrival(r, 0.0)
    now = 0.0
    for it in range(limit):
        if not live:
            return it
        swap.configure(sched)
        plan = sched.schedule(now)
        apply_plan(plan, kv, now)
        for r in plan.swapped_out:
            kv.finish_swap_out(r)
        now += 0.01
        _retire(plan, now, kv, sched, swap, live)
        ahead = swap.plan_ahead(plan, live, sched, now)
        apply_ahead(ahead, kv)
        for r in ahead.offload:
            kv.finish_swap_out(r)
        for r in ahead.upload:
            kv.finish_swap_in(r)
        swap.on_iteration(0.01)
        kv.check_integrity()
    return {rid: kv.location(r).value for rid, r in live.items()}


@pytest.mark.parametrize("sizes,num_blocks,num_host_blocks,budget", [
    ([(11, 13), (5, 19)], 4, 6, 64),                       # 3 usable blocks, each request needs 3
    ([(1, 85), (61, 41), (14, 17)], 14, 10, 16)])          # from a fuzzed engine run, minimized
def test_fcfs_with_proactive_swapping_never_deadlocks(sizes, num_blocks, num_host_blocks, budget):
    """The swap policy uploaded a request that fcfs had evicted back into the blocks the
    running one needed; fcfs evicted only running requests, so the runner gave way to a
    waiting request that could not start either, and nothing ran again (before the fix:
    both requests on the device with no block free; in the second case one on the host
    behind a waiting one that held 10 device blocks). Waiting requests' device KV now goes
    first."""
    done = _serve_fcfs_proactive(sizes, num_blocks, num_host_blocks, budget)
    assert isinstance(done, int), f"deadlock: {done}"


def test_fcfs_head_of_the_queue_takes_the_device_kv_of_waiting_requests_behind_it():
    kv = KVManager(8, 4, 20)                               # 7 usable blocks
    sched = make_scheduler("fcfs", Limits(4, 64), kv, CFG, COST)
    sched.swap_on_evict = True
    head, behind = req("head", 20, max_tokens=4), req("behind", 12, max_tokens=4)
    for r in (head, behind):
        sched.add(r)
    kv.allocate(behind, 12)                                 # as if uploaded ahead of need: 3 blocks
    behind.num_computed_tokens = 12
    plan = sched.schedule(0.0)                              # head needs 6 blocks, 4 are free
    assert [s.request for s in plan.scheduled] == [head] and plan.swapped_out == [behind]
    assert list(sched.waiting) == [behind]                  # it keeps its place


# -- the engine: real copies, token identity --------------------------------------------------
def _prompts(n, seed):
    rng = np.random.default_rng(seed)
    return [[int(x) for x in rng.integers(3, 250, int(k))] for k in rng.integers(20, 40, n)]


def _run_all(e, prompts, sp) -> list[Request]:
    """Serve `prompts` to completion, checking the ledger after every iteration."""
    reqs = [e.add_request(p, sp) for p in prompts]
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
    return reqs


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    prompts = _prompts(10, 3)
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, warmup=False, num_device_blocks=160, **ENGINE_KW).generate(prompts, sp)]
    return path, prompts, sp, want


@pytest.mark.parametrize("policy", ["proactive", "reactive", "recompute"])
def test_tokens_identical_under_swapping(reference, policy):
    """A device pool of 29 blocks for 10 requests of up to 10 blocks each: requests go out and
    come back several times, and greedy tokens match a run with ample memory."""
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy=policy, **ENGINE_KW)
    e = llm.engine
    reqs = _run_all(e, prompts, sp)
    assert [r.output_token_ids for r in reqs] == want
    st = e.stats
    assert e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0
    if policy == "recompute":
        assert st.swap_out_blocks == 0 and st.recomputations > 0
    else:
        assert st.recomputations == 0 and st.swap_in_blocks == st.swap_out_blocks
        assert st.swap_out_blocks > 3 * sum(e.kv.blocks_for_tokens(len(p)) for p in prompts) / len(prompts)
        assert st.swap_out_bytes == st.swap_out_blocks * e.runner.transfer.host_block_bytes


def test_host_pool_too_small_falls_back_to_recomputation(reference):
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=6, swap_policy="reactive", **ENGINE_KW)
    e = llm.engine
    reqs = _run_all(e, prompts, sp)
    assert [r.output_token_ids for r in reqs] == want
    assert e.stats.swap_out_blocks > 0 and e.stats.recomputations > 0
    # vLLM's num_preemptions (serve/prometheus.py): requests whose KV left the device, either way
    from fastserve_jax.serve.prometheus import vllm_families
    snap = e.snapshot()
    assert 0 < snap["swap_outs_total"] <= e.stats.swap_out_blocks
    preempted = {m.name: m.samples[0].value for m in vllm_families(snap, "m")}["vllm:num_preemptions"]
    assert preempted == snap["swap_outs_total"] + snap["device_drops_total"]
    assert 0 < e.stats.device_drops <= e.stats.recomputations
    # a drop of host KV is no second preemption: that request left the device when it was
    # swapped out (until 2026-12-07 every drop counted, so such a request counted twice)
    from types import SimpleNamespace
    from fastserve_jax.stats import EngineStats
    st, on = EngineStats(), {"a": KVLocation.DEVICE, "b": KVLocation.HOST, "c": KVLocation.SWAPPING_OUT}
    reqs = [SimpleNamespace(request_id=k, num_computed_tokens=10) for k in on]
    st.count_drops(reqs, SimpleNamespace(location=lambda r: on[r.request_id]))
    assert (st.recomputations, st.recomputed_tokens, st.device_drops) == (3, 30, 1)


def test_oversize_request_rejected_and_abort_frees_host(reference):
    path, prompts, sp, _ = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=200, swap_policy="reactive", **ENGINE_KW)
    e = llm.engine
    with pytest.raises(ValueError, match="device pool holds 232 .*num_device_blocks"):   # host space does not help
        e.add_request([3] * 240, SamplingParams(max_tokens=1))              # 30 blocks; the pool has 29
    capped = e.add_request([3] * 200, SamplingParams(max_tokens=40))        # ends at the pool's 232 tokens
    assert capped.sampling.max_tokens == 32
    e.abort(capped.request_id)
    assert not e.has_unfinished()
    reqs = [e.add_request(p, sp) for p in prompts]            # 10 prompts need more than the 29 blocks
    for _ in range(30):
        e.step()
    swapped = [r for r in reqs if e.kv.location(r) in (KVLocation.HOST, KVLocation.SWAPPING_OUT)]
    assert swapped, "the small pool should have pushed someone to the host"
    assert e.snapshot()["requests_swapped"] == len(swapped)
    e.abort(swapped[0].request_id)
    e.kv.check_integrity()
    assert e.kv.host_blocks(swapped[0]) == 0
    while e.has_unfinished():
        e.step()
    assert e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0


@pytest.mark.parametrize("where", [KVLocation.SWAPPING_IN, KVLocation.SWAPPING_OUT])
def test_abort_while_the_kv_is_in_flight_frees_both_pools_and_spares_the_rest(reference, where):
    """A request aborted while its copy runs (an upload issued ahead of need, or an offload):
    its device and host blocks come back once, the ledger holds after every step, and every
    other request's greedy tokens are those of the ample-memory run. Offloads happen on their
    own here; the upload is issued through the engine's own path once a request's KV is on the
    host and fits the free blocks (the policy's own uploads ahead are few and timing-bound)."""
    path, prompts, sp, want = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy="proactive", **ENGINE_KW)
    e = llm.engine
    reqs = [e.add_request(p, sp) for p in prompts]
    aborted = None
    for _ in range(400):
        e.step()
        e.kv.check_integrity()
        live = [r for r in reqs if r.status is not RequestStatus.FINISHED]
        if where is KVLocation.SWAPPING_IN:
            hosted = [r for r in live if e.kv.location(r) is KVLocation.HOST
                      and e.kv.host_blocks(r) <= e.kv.num_free_blocks]
            if hosted:
                e.copies.issue(SwapAhead(upload=[hosted[0]]))
        caught = [r for r in live if e.kv.location(r) is where]
        if caught:
            aborted = caught[0]
            break
    assert aborted is not None, f"no request was ever {where.value} after a step"
    e.abort(aborted.request_id)
    e.kv.check_integrity()
    assert not e.kv.has_kv(aborted) and e.kv.host_blocks(aborted) == 0
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
    assert aborted.finish_reason == "abort"
    for r, w in zip(reqs, want):
        if r is not aborted:
            assert r.output_token_ids == w, r.request_id
    assert e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0 and e.kv.num_swapping_in_blocks == 0
    assert not e.runner.transfer._held, "the aborted request's host copy is still held"


def test_engine_measures_its_link_for_the_swap_policy(reference):
    """The engine times its device-host link at start (one device's share of a block, each
    way) and hands the swap policy the upload time per block, as the simulator hands it the
    cost model's; /metrics reads the speed from the snapshot."""
    path, prompts, sp, want = reference
    e = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy="proactive",
            **ENGINE_KW).engine
    link = e.copies.link
    assert link is not None and link.device_block_bytes > 0
    assert 0 < e.swap.seconds_per_block == link.in_seconds_per_block < 1.0
    snap = e.snapshot()
    assert snap["swap_link_in_bytes_per_second"] == pytest.approx(link.device_block_bytes / link.in_seconds_per_block)
    assert snap["swap_link_out_bytes_per_second"] > 0
    off = LLM(path, warmup=False, num_device_blocks=30, swap_policy="recompute", **ENGINE_KW).engine
    assert off.copies.link is None and off.swap.seconds_per_block == 0 and off.snapshot()["swap_link_in_bytes_per_second"] == 0


def test_swap_copies_keep_the_cache_donated_and_use_host_memory(reference):
    path, prompts, sp, _ = reference
    llm = LLM(path, warmup=False, num_device_blocks=30, num_host_blocks=80, swap_policy="reactive", **ENGINE_KW)
    e = llm.engine
    t = e.runner.transfer
    assert t.memory_kind == "pinned_host"
    reqs = [e.add_request(p, sp) for p in prompts]
    seen_host = False
    while e.has_unfinished():
        ptr = e.runner.stages[0].cache.k.unsafe_buffer_pointer()
        e.step()
        for rid in t._held:
            assert all(part.k.sharding.memory_kind == "pinned_host" for run in t.host_runs(rid) for part in run)
            seen_host = True
        if e.stats.swap_in_blocks:
            # scatters donate the cache: the buffer is updated in place, never copied whole
            assert e.runner.stages[0].cache.k.unsafe_buffer_pointer() == ptr
    assert seen_host and all(r.finished for r in reqs)


def test_nothing_compiles_after_warmup_with_swapping(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    llm = LLM(path, warmup="full", num_device_blocks=30, num_host_blocks=80, swap_policy="proactive", **ENGINE_KW)
    e = llm.engine
    prompts = _prompts(24, 5)
    rng = np.random.default_rng(6)
    with CompileCounter(this_thread=True) as cc:
        reqs = []
        for i, p in enumerate(prompts):
            reqs.append(e.add_request(p, SamplingParams(max_tokens=int(rng.integers(5, 60)), temperature=0,
                                                        ignore_eos=True)))
            if i % 3 == 2:
                e.step()
        while e.has_unfinished():
            e.step()
            e.kv.check_integrity()
    assert e.stats.swap_out_blocks > 0
    assert cc.count == 0, f"{cc.count} compilations after warm-up"


def test_engine_with_small_swaps_fused_and_large_ones_by_device_put(reference, monkeypatch):
    """The accelerators' rule on the CPU (FUSED_MAX_BYTES emptied, the threshold at five blocks'
    share): after a full warm-up, swaps of up to five blocks go fused and larger ones by
    device_put, nothing compiles, and greedy tokens match a run with ample memory. (This
    workload swaps 4-8 blocks at a time under skip-join.)"""
    from fastserve_jax.runner import kv_transfer as kt

    path, prompts, sp, want = reference
    kw = dict(num_device_blocks=30, num_host_blocks=80, swap_policy="proactive", **ENGINE_KW)
    probe = LLM(path, warmup=False, **kw).engine.runner
    share = probe.transfer._block_share(probe.caches)
    monkeypatch.setattr(kt, "FUSED_MAX_BYTES", {})
    monkeypatch.setattr(kt, "ACCELERATOR_FUSED_MAX_BYTES", 5 * share)
    e = LLM(path, warmup="full", **kw).engine
    sizes = {True: [], False: []}
    fused = e.runner.transfer.fused
    monkeypatch.setattr(e.runner.transfer, "fused", lambda n: sizes[fused(n)].append(n) or fused(n))
    with CompileCounter(this_thread=True) as cc:
        reqs = _run_all(e, prompts, sp)
    assert [r.output_token_ids for r in reqs] == want
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    assert sizes[True] and sizes[False] and max(sizes[True]) <= 5 < min(sizes[False]), sizes


@pytest.mark.parametrize("policy", ["proactive", "reactive"])
def test_demo_model_counts_correctly_while_swapped(policy):
    """The bundled model's counting answers survive being swapped out and back (a position or
    block-order bug breaks the count)."""
    pairs = [(3, 40), (120, 170), (7, 60), (500, 530), (250, 290), (0, 45), (610, 660), (88, 120)]
    prompts = [demo_task.make_prompt(a, b) for a, b in pairs]
    llm = LLM(None, warmup=False, **DEMO_SWAP_GRID, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, block_size=8,
              num_device_blocks=40, num_host_blocks=120, swap_policy=policy, scheduler="mlfq")
    outs = llm.generate(prompts, SamplingParams(max_tokens=120, temperature=0))
    for (a, b), o in zip(pairs, outs):
        assert demo_task.check_answer(a, b, o.text), (a, b, o.text)
    st, t, link = llm.engine.stats, llm.engine.runner.transfer, llm.engine.copies.link
    assert st.swap_out_blocks > 0 and st.recomputations == 0
    # every swap on the CPU is fused: its copies run between steps, unseen by host-side waits;
    # their estimated time is stall (it read 0 before), and charged to the stall budget
    assert t.fused_blocks_out == st.swap_out_blocks and t.fused_blocks_in == st.swap_in_blocks
    assert st.swap_fused_seconds == pytest.approx(st.swap_out_blocks * link.out_seconds_per_block +
                                                  st.swap_in_blocks * link.in_seconds_per_block)
    assert st.swap_stall >= st.swap_fused_seconds > 0 and llm.engine.copies._fused_charged == st.swap_fused_seconds


@pytest.mark.parametrize("swap_policy", ["proactive", "reactive"])
def test_demo_model_counts_correctly_when_new_requests_drop_host_kv(monkeypatch, swap_policy):
    """skip-join's drop_to_start (forced on here; skip-join turns it on where memory binds and
    a backlog waits): new requests drop the host KV of paused requests ranked below them, and
    those prefill again from scratch. Every answer stays exact, with either swap policy."""
    from fastserve_jax.scheduler.skip_join import SkipJoinMLFQScheduler
    monkeypatch.setattr(SkipJoinMLFQScheduler, "drops_to_start", lambda self: True)
    rng = np.random.default_rng(0)
    pairs = [demo_task.sample_pair(rng, 60) for _ in range(24)]
    llm = LLM(None, warmup=False, **DEMO_SWAP_GRID, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
              num_device_blocks=18, num_host_blocks=120, swap_policy=swap_policy, scheduler="skip-join-mlfq",
              protect_decodes=False)           # MLFQ's demotions pause requests; evictions move them to the host
    outs = llm.generate([demo_task.make_prompt(a, b) for a, b in pairs],
                        [SamplingParams(max_tokens=demo_task.answer_num_tokens(a, b), temperature=0) for a, b in pairs])
    for (a, b), o in zip(pairs, outs):
        assert demo_task.check_answer(a, b, o.text), (a, b, o.text)
    st = llm.engine.stats
    assert st.swap_out_blocks > 0 and st.recomputations > 0, (st.swap_out_blocks, st.recomputations)


def test_host_memory_kind_is_available_here():
    kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
    assert "pinned_host" in kinds


def test_engine_fcfs_with_proactive_swapping_finishes_in_a_three_block_pool(reference):
    """The deadlock above on the real engine (it hung forever before the fix): greedy tokens
    match the ample-memory run."""
    path = reference[0]
    sp = [SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
          SamplingParams(max_tokens=19, temperature=0, ignore_eos=True)]
    prompts = [list(range(10, 21)), list(range(30, 35))]
    kw = dict(ENGINE_KW, scheduler="fcfs")
    want = [o.token_ids for o in LLM(path, warmup=False, num_device_blocks=160, **kw).generate(prompts, sp)]
    e = LLM(path, warmup=False, num_device_blocks=4, num_host_blocks=6, swap_policy="proactive",
            async_scheduling=False, **kw).engine
    reqs = [e.add_request(p, s) for p, s in zip(prompts, sp)]
    for _ in range(200):
        if not e.has_unfinished():
            break
        e.step()
        e.kv.check_integrity()
    assert not e.has_unfinished(), {r.request_id: e.kv.location(r).value for r in reqs}
    assert [r.output_token_ids for r in reqs] == want
    assert e.stats.swap_out_blocks > 0


def _kv_heads_split_over_two_devices(k: np.ndarray, v: np.ndarray):
    """(sharding, KVCache) of a cache (layers, blocks, block size, kv heads, D) whose KV heads
    are split over two devices."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fastserve_jax.models.attention import KVCache

    sh = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("tp",)), P(None, None, None, "tp", None))
    return sh, KVCache(jax.device_put(k, sh), jax.device_put(v, sh))


def _count_device_puts(monkeypatch) -> list:
    """A list that gets the target (device or sharding) of each later jax.device_put call made
    from Python on concrete arrays (not one traced into a compiled call)."""
    puts, real_put = [], jax.device_put

    def put(x, device=None, **kw):
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(x)):
            puts.append(device)
        return real_put(x, device, **kw)
    monkeypatch.setattr(jax, "device_put", put)
    return puts


@pytest.mark.parametrize("host_memory", [True, False])
def test_probe_link_times_one_devices_share_of_a_block(host_memory, monkeypatch):
    """probe_link times the largest per-device share of one block (here KV heads split over 2
    devices: half a block), to host memory and back; without a host memory space (some
    backends) the copies are numpy's, and it still gives a speed each way."""
    from fastserve_jax.runner.kv_transfer import KVTransfer

    zeros = np.zeros((3, 9, 4, 2, 8), np.float32)
    sh, cache = _kv_heads_split_over_two_devices(zeros, zeros)
    t = KVTransfer([sh], max_blocks=8, block_bytes=2 * 3 * 4 * 2 * 8 * 4, cache_shape=zeros.shape)
    if not host_memory:
        t.memory_kind = None
    puts = _count_device_puts(monkeypatch)
    link = t.probe_link([cache], max_blocks=4, repeats=2)
    assert link.device_block_bytes == 2 * 3 * 4 * 1 * 8 * 4         # K and V of one device's KV head
    assert link.out_seconds_per_block > 0 and link.in_seconds_per_block > 0
    assert link.bytes_per_second("in") == pytest.approx(link.device_block_bytes / link.in_seconds_per_block)
    kinds = {getattr(d, "memory_kind", None) for d in puts}
    assert ("pinned_host" in kinds or "unpinned_host" in kinds) == host_memory, kinds


@pytest.mark.parametrize("path", ["backend", "fused", "device_put"])
def test_swap_copies_round_trip_by_either_copy_path(path, monkeypatch):
    """A request's blocks go to host memory and come back into other blocks unchanged. On the
    CPU backend every swap is fused: the gather writes them straight into host memory and the
    scatter moves them back inside its compiled call (no jax.device_put from Python: its Python
    path cost more than the copy); the accelerators' path for larger swaps (device_put both
    ways) gives the same blocks."""
    from fastserve_jax.runner import kv_transfer as kt

    vals = np.random.default_rng(0).normal(size=(3, 16, 4, 2, 8)).astype(np.float32)
    sh, cache = _kv_heads_split_over_two_devices(vals, -vals)
    with kt.forced_copy_path(path):
        t = kt.KVTransfer([sh], max_blocks=8, block_bytes=2 * 3 * 4 * 2 * 8 * 4, cache_shape=vals.shape)
    assert t.memory_kind == "pinned_host" and kt.FUSED_MAX_BYTES == {"cpu": float("inf")}
    fused = path != "device_put"
    puts = _count_device_puts(monkeypatch)
    t.swap_out([cache], "r", (3, 5, 7, 9, 11, 13, 15))          # runs of 4, 2 and 1 blocks
    assert t.fused(7) == fused
    assert all(part.k.sharding.memory_kind == "pinned_host" for run in t.host_runs("r") for part in run)
    t.start_swap_in("r", (1, 2, 4, 6, 8, 10, 12))
    (cache,) = t.land_swap_in([cache], "r")
    assert bool(puts) != fused, len(puts)
    src, dst = [3, 5, 7, 9, 11, 13, 15], [1, 2, 4, 6, 8, 10, 12]
    np.testing.assert_array_equal(np.asarray(cache.k)[:, dst], vals[:, src])
    np.testing.assert_array_equal(np.asarray(cache.v)[:, dst], -vals[:, src])
    assert cache.k.sharding.memory_kind == "device" and t.blocks_out == t.blocks_in == 7


@pytest.mark.parametrize("path", ["fused", "device_put"])
def test_a_swap_in_copies_only_the_runs_with_blocks_the_device_lacks(path):
    """Prefix caching: NULL_BLOCK (0) marks a block the device holds already. Of a 7-block host
    copy (runs of 4, 2 and 1), blocks 0-4 found: the 4-block run is not copied, the 2-block run
    is, its found row landing in the null block, and the 1-block run is; every other block of
    the pool is untouched."""
    from fastserve_jax.runner import kv_transfer as kt

    vals = np.random.default_rng(2).normal(size=(3, 16, 4, 2, 8)).astype(np.float32)
    sh, cache = _kv_heads_split_over_two_devices(vals, -vals)
    with kt.forced_copy_path(path):
        t = kt.KVTransfer([sh], max_blocks=8, block_bytes=2 * 3 * 4 * 2 * 8 * 4, cache_shape=vals.shape)
    t.swap_out([cache], "r", (3, 5, 7, 9, 11, 13, 15))
    t.start_swap_in("r", (0, 0, 0, 0, 0, 2, 4))
    assert t.blocks_in == 3 and len(t._uploads["r"].runs) == 2
    (cache,) = t.land_swap_in([cache], "r")
    k = np.asarray(cache.k)
    np.testing.assert_array_equal(k[:, [2, 4]], vals[:, [13, 15]])
    np.testing.assert_array_equal(np.asarray(cache.v)[:, [2, 4]], -vals[:, [13, 15]])
    np.testing.assert_array_equal(k[:, 1:], np.concatenate([vals[:, 1:2], vals[:, 13:14], vals[:, 3:4],
                                                            vals[:, 15:16], vals[:, 5:]], axis=1))
    t.swap_out([cache], "s", (6, 8))                                # all found: nothing moves, landing is free
    t.start_swap_in("s", (0, 0))
    assert t.blocks_in == 3 and t.in_landed("s")
    (same,) = t.land_swap_in([cache], "s")
    np.testing.assert_array_equal(np.asarray(same.k), k)


@pytest.mark.parametrize("path", ["fused", "device_put"])
def test_a_swap_out_leaves_pinned_runs_on_the_device_until_a_fill_copies_them(path):
    """Prefix caching's pins: a 6-block swap-out whose first 4 blocks are NULL_BLOCK copies only
    the other 2; a later call for the same request with those 4 blocks (the rest NULL_BLOCK)
    fills them in; the swap-in then brings all 6 back. With 3 kept of 7, the copy's runs are
    2 + 1 and 4 (not 4 + 2 + 1, whose first run would mix kept and copied blocks). A swap-in that
    needs a run the host copy lacks is refused."""
    from fastserve_jax.runner import kv_transfer as kt

    vals = np.random.default_rng(3).normal(size=(3, 16, 4, 2, 8)).astype(np.float32)
    sh, cache = _kv_heads_split_over_two_devices(vals, -vals)
    with kt.forced_copy_path(path):
        t = kt.KVTransfer([sh], max_blocks=8, block_bytes=2 * 3 * 4 * 2 * 8 * 4, cache_shape=vals.shape)
    t.swap_out([cache], "r", (0, 0, 0, 0, 9, 11))
    jax.block_until_ready(t.host_runs("r"))     # the copy is asynchronous: on a busy machine it had not landed yet
    assert t.blocks_out == 2 and t._held["r"][0][2] is None and t.out_landed("r")
    t.swap_out([cache], "r", (3, 5, 7, 8, 0, 0))                    # the fill
    assert t.blocks_out == 6 and len(t.host_runs("r")) == 2
    with pytest.raises(AssertionError, match="over a host copy's run"):
        t.swap_out([cache], "r", (3, 5, 7, 8, 0, 0))
    t.start_swap_in("r", (1, 2, 4, 6, 10, 12))
    (cache,) = t.land_swap_in([cache], "r")
    np.testing.assert_array_equal(np.asarray(cache.k)[:, [1, 2, 4, 6, 10, 12]], vals[:, [3, 5, 7, 8, 9, 11]])
    t.swap_out([cache], "s", (0, 0, 0, 0, 9, 11))
    with pytest.raises(AssertionError, match="lacks"):
        t.start_swap_in("s", (1, 2, 0, 0, 10, 12))
    t.swap_out([cache], "u", (0, 0, 0, 3, 5, 7, 8))
    assert [(at, n, run is None) for at, n, run in t._held["u"]] == [(0, 2, True), (2, 1, True), (3, 4, False)]
    assert t.blocks_out == 12
    t.start_swap_in("u", (0, 0, 0, 13, 14, 0, 15))                  # the device holds them all but 4
    assert t.blocks_in == 10 and t._uploads["u"].ids[0].tolist() == [13, 14, 0, 15]


def test_accelerators_fuse_small_swaps_and_device_put_large_ones(monkeypatch):
    """Off the CPU a swap is fused while one device's share of it is at most
    ACCELERATOR_FUSED_MAX_BYTES (fused copies are ordered with the steps; device_puts overlap
    them): here a share of a block is 768 bytes (K and V, 3 layers, 4 tokens, one KV head of 8,
    float32, heads split over 2 devices), so with the threshold at 3 blocks a 2-block swap is
    fused and a 5-block one goes by device_put, each way, and both land intact. Warm-up
    compiles the fused gather and scatter only for runs that fit under the threshold."""
    from fastserve_jax.runner import kv_transfer as kt
    from fastserve_jax.runner.compiler import run_jobs

    monkeypatch.setattr(kt, "FUSED_MAX_BYTES", {})                 # the CPU treated as an accelerator
    monkeypatch.setattr(kt, "ACCELERATOR_FUSED_MAX_BYTES", 3 * 768)
    vals = np.random.default_rng(1).normal(size=(3, 16, 4, 2, 8)).astype(np.float32)
    sh, cache = _kv_heads_split_over_two_devices(vals, -vals)
    t = kt.KVTransfer([sh], max_blocks=8, block_bytes=2 * 3 * 4 * 2 * 8 * 4, cache_shape=vals.shape)
    jobs = t.compile_jobs([cache])
    assert t._block_share([cache]) == 768 and len(jobs) == 2 * (4 + 2)   # runs 1, 2, 4, 8 by device_put; 1, 2 fused
    run_jobs(jobs)
    assert {k.op for k in t._compiled} == {"gather", "scatter", "gather_host", "scatter_host"}
    puts = _count_device_puts(monkeypatch)
    t.swap_out([cache], "small", (3, 5))
    t.swap_out([cache], "large", (7, 9, 11, 13, 15))
    assert len(puts) == 1 and t.fused(2) and not t.fused(5)        # the large swap-out's one device_put
    t.start_swap_in("small", (1, 2))
    t.start_swap_in("large", (4, 6, 8, 10, 12))
    assert len(puts) == 2
    (cache,) = t.land_swap_in([cache], "small")
    (cache,) = t.land_swap_in([cache], "large")
    src, dst = [3, 5, 7, 9, 11, 13, 15], [1, 2, 4, 6, 8, 10, 12]
    np.testing.assert_array_equal(np.asarray(cache.k)[:, dst], vals[:, src])
    np.testing.assert_array_equal(np.asarray(cache.v)[:, dst], -vals[:, src])
