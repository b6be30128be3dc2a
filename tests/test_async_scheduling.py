"""Async scheduling (engine.py, runner/token_box.py): batch N+1 is planned and dispatched before
batch N's tokens are read, its decode rows take their input tokens from the device. Outputs
must be exactly the synchronous engine's, under preemption, swapping and every sampling option."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.config import EngineConfig
from fastserve_jax.kv_cache import KVManager
from fastserve_jax.models import demo_task
from fastserve_jax.request import Request
from fastserve_jax.runner.compile_guard import CompileCounter
from fastserve_jax.runner.launch import LaunchBuilder
from fastserve_jax.scheduler.base import ScheduledRequest
from engine_grids import DEMO_SWAP_GRID
from tiny_engine import ENGINE_KW, random_prompts


def _params(n, seed):
    """Greedy, seeded random, penalised, logprobs and stop-token requests of mixed lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 5
        kw = dict(max_tokens=int(rng.integers(1, 50)), ignore_eos=True)
        if kind == 1:
            kw.update(temperature=0.8, top_p=0.9, min_p=0.05, seed=int(rng.integers(1 << 30)))
        elif kind == 2:
            kw.update(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
        elif kind == 3:
            kw.update(temperature=0, logprobs=2)
        elif kind == 4:
            kw.update(temperature=0, stop_token_ids=[int(t) for t in rng.integers(3, 256, 12)])
        else:
            kw.update(temperature=0)
        out.append(SamplingParams(**kw))
    return out


def _serve(llm, prompts, params, abort_at=None):
    """Serve to completion, checking the ledger after every iteration; `abort_at`: (iteration,
    index) aborts that request there. Returns each request's (tokens, finish reason, logprobs)."""
    e = llm.engine
    reqs = []
    for i, (p, sp) in enumerate(zip(prompts, params)):
        reqs.append(e.add_request(p, sp))
        if i % 4 == 3:
            e.step()
            e.kv.check_integrity()
    it = 0
    while e.has_unfinished():
        e.step()
        e.kv.check_integrity()
        it += 1
        if abort_at is not None and it == abort_at[0]:
            e.abort(reqs[abort_at[1]].request_id)
    assert not e._inflight and e.kv.num_used_blocks == 0 and e.kv.num_host_used_blocks == 0
    return [(r.output_token_ids, r.finish_reason,
             None if r.logprobs is None else [(lp.token_id, pytest.approx(lp.logprob, abs=1e-4)) for lp in r.logprobs])
            for r in reqs]


# the default policy and the baseline, swapping proactively, in the default suite; the other
# swap policies with -m slow (and in scripts/fuzz_engine.py's seeds, async or not)
@pytest.mark.parametrize("scheduler,swap_policy", [
    ("fcfs", "proactive"), ("skip-join-mlfq", "proactive"),
    pytest.param("skip-join-mlfq", "recompute", marks=pytest.mark.slow),
    pytest.param("mlfq", "reactive", marks=pytest.mark.slow)])
def test_async_scheduling_serves_exactly_what_the_synchronous_engine_does(tiny_checkpoints, scheduler, swap_policy):
    """A device pool of 30 blocks for 24 requests: requests are preempted, swapped or
    recomputed while their previous batch is still in flight; a request is aborted midway."""
    path = tiny_checkpoints("llama")
    prompts = random_prompts(24, 5, 60, seed=11)
    params = _params(24, 12)
    kw = dict(ENGINE_KW, scheduler=scheduler, num_device_blocks=30, num_host_blocks=80, swap_policy=swap_policy)
    runs = {}
    for a in (False, True):
        llm = LLM(path, warmup=False, async_scheduling=a, **kw)
        if a:
            took = []
            box = llm.engine.runner.token_box
            real_take = box.take
            box.take = lambda host, src: took.append(int((src >= 0).sum())) or real_take(host, src)
        runs[a] = (_serve(llm, prompts, params, abort_at=(6, 5)), llm.engine.stats)
    got, want = runs[True][0], runs[False][0]
    assert got[:5] + got[6:] == want[:5] + want[6:]
    # the aborted one: what it had by the 6th iteration, which differs with the batches' timing
    (a, reason, _), (s, _, _) = got[5], want[5]
    assert reason == "abort" and a[:len(s)] == s[:len(a)]
    assert sum(took) > 200, "decode rows should read most input tokens from the device"
    sync, asyn = runs[False][1], runs[True][1]
    # Iterations move with the machine's speed: an upload lands when its copy is done (proactive
    # and reactive alike), and MLFQ's quanta are wall-clock seconds, so on a loaded machine more
    # iterations run while one is still in flight (143 against 123 once under the full suite,
    # 1.16x; 166 against 126, 1.32x, with reactive swapping in a fresh clone's suite on
    # 2026-12-04; alone on the VM within 1.15x). A loop that wasted every other iteration would
    # give 2x.
    assert asyn.iterations <= sync.iterations * 1.5, (asyn.iterations, sync.iterations)
    if swap_policy != "recompute":
        assert asyn.swap_out_blocks > 0
    else:
        assert asyn.recomputations > 0


@pytest.mark.parametrize("kw", [dict(), dict(async_scheduling=False, batches_in_flight=2)])
def test_aborting_the_last_live_request_leaves_no_batch_in_flight(tiny_checkpoints, kw):
    """Async scheduling, and pipeline mode's batches: an abort that leaves no live request
    collects what is still in flight. A server steps only while requests are live, so the batch
    waited for the next request, and its time (from the collection before it) then counted the
    idle gap as busy and as one step of the swap policy's step time (2 s idle: busy +2.0 s, step
    time 0.025 -> 0.42 s)."""
    llm = LLM(tiny_checkpoints("llama"), warmup=False, **dict(ENGINE_KW, **kw))
    e = llm.engine
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    req = e.add_request([5, 6, 7, 8], greedy)
    for _ in range(3):
        e.step()
    assert e._inflight
    e.abort(req.request_id)
    assert not e._inflight and not e.has_unfinished() and e.kv.num_used_blocks == 0
    busy = e.stats.busy
    time.sleep(0.3)                      # idle
    e.add_request([5, 6, 7, 8], greedy)
    e.step()
    assert e.stats.busy - busy < 0.3


def test_demo_model_counts_exactly_under_async_scheduling_with_swapping():
    """The bundled model's counting answers (a wrong position or input token breaks the count),
    skip-join with MLFQ's demotions and a pool that holds a third of the live KV."""
    rng = np.random.default_rng(3)
    pairs = [demo_task.sample_pair(rng, 60) for _ in range(20)]
    llm = LLM(None, warmup=False, **DEMO_SWAP_GRID, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, block_size=8,
              num_device_blocks=40, num_host_blocks=160, scheduler="skip-join-mlfq", protect_decodes=False,
              async_scheduling=True)
    outs = llm.generate([demo_task.make_prompt(a, b) for a, b in pairs],
                        [SamplingParams(max_tokens=demo_task.answer_num_tokens(a, b) + 4, temperature=0) for a, b in pairs])
    for (a, b), o in zip(pairs, outs):
        assert demo_task.check_answer(a, b, o.text), (a, b, o.text)
        assert o.finish_reason == "stop"                      # EOS seen on the host one batch late
    assert llm.engine.stats.swap_out_blocks > 0
    assert not llm.engine._inflight


def test_nothing_compiles_after_full_warmup_with_async_scheduling(tiny_checkpoints):
    llm = LLM(tiny_checkpoints("llama"), warmup="full", async_scheduling=True,
              **dict(ENGINE_KW, num_device_blocks=30, num_host_blocks=80, scheduler="skip-join-mlfq"))
    prompts = random_prompts(24, 1, 60, seed=5)
    with CompileCounter(this_thread=True) as cc:
        _serve(llm, prompts, _params(24, 6))
    assert cc.count == 0, f"{cc.count} compilations after warm-up"


def test_decode_rows_with_a_pending_token_read_it_from_the_box():
    cfg = EngineConfig(max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, block_size=4).resolve()
    kv = KVManager(32, 4)
    a = Request("a", [5, 6, 7], SamplingParams(max_tokens=9), 0.0)
    b = Request("b", [8, 9], SamplingParams(max_tokens=9), 0.0)
    for r in (a, b):
        kv.allocate(r, r.num_prompt_tokens + 2)
    a.output_token_ids, a.num_computed_tokens = [11], 3            # its token 11 is on the host
    b.output_token_ids, b.num_computed_tokens, b.pending_tokens, b.token_slot = [12], 3, 1, 6
    ln = LaunchBuilder(cfg).build([ScheduledRequest(a, 1), ScheduledRequest(b, 1)], kv)[0]
    assert ln.tokens[:2, 0].tolist() == [11, 0] and ln.src.tolist()[:2] == [-1, 6]
    assert ln.batch.positions[:2, 0].tolist() == [3, 3]
    b.token_slot = -1
    with pytest.raises(AssertionError, match="neither on the host nor in the box"):
        LaunchBuilder(cfg).build([ScheduledRequest(b, 1)], kv)


@pytest.mark.parametrize("bad", [dict(async_scheduling="yes"), dict(async_scheduling=True, pipeline_parallel_size=2),
                                 dict(async_scheduling=True, batches_in_flight=3)])
def test_async_scheduling_config_is_checked(bad):
    with pytest.raises(ValueError, match="async_scheduling must be None"):
        EngineConfig(**bad)


def test_async_scheduling_is_on_by_default_where_it_can_run():
    on = EngineConfig().resolve()
    assert on.async_scheduling is True and on.batches_in_flight == 2
    for kw, inflight in ((dict(pipeline_parallel_size=2), 2), (dict(batches_in_flight=1), 1),
                         (dict(batches_in_flight=2), 2)):      # pipeline mode's batches, as asked
        off = EngineConfig(**kw).resolve()
        assert off.async_scheduling is False and off.batches_in_flight == inflight, kw
    off = EngineConfig(async_scheduling=False).resolve()
    assert off.async_scheduling is False and off.batches_in_flight == 1


def test_async_scheduling_flag_reaches_the_engine_and_started_servers():
    from fastserve_jax.serve.engine_args import engine_argv, engine_kwargs, parse_engine_args

    for flags, value in (([], None), (["--async-scheduling"], True), (["--no-async-scheduling"], False)):
        a = parse_engine_args(flags)
        assert engine_kwargs(a)["async_scheduling"] is value
        assert engine_argv(a)[-len(flags):] == flags if flags else "async" not in " ".join(engine_argv(a))
