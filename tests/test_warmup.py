"""Warm-up modes (runner/compiler.py): lazy compiles only what batches use, background answers
from the covering set without compiling on the request path, and every mode gives the same
greedy tokens."""

from __future__ import annotations

import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.runner.compile_guard import CompileCounter
from fastserve_jax.runner.keys import DecodeKey, PrefillKey
from tiny_engine import ENGINE_KW, random_prompts   # the engine tests' settings (small bucket grid) and prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def lazy(tiny_checkpoints):
    return LLM(tiny_checkpoints("llama"), **ENGINE_KW)


def test_lazy_compiles_only_the_shapes_batches_use(lazy):
    runner = lazy.engine.runner
    assert lazy.engine.warmup_mode == "lazy" and lazy.engine.warmup_seconds == 0.0
    assert runner.compiler.count() == 0
    lazy.generate(random_prompts(2, 5, 12, seed=1), GREEDY)
    used = set(lazy.engine.stats.launches)
    assert used and set(runner.stages[0].compiled) == used     # exactly the launches that ran
    assert runner.compiler.count() < len(runner.compiler.all_keys())
    with CompileCounter() as cc:                              # the same batch again: nothing new
        lazy.generate(random_prompts(2, 5, 12, seed=1), GREEDY)
    assert cc.count == 0


def test_covering_set_answers_any_request_without_compiling(lazy, tiny_checkpoints):
    """With only the covering set compiled and the builder falling back to the smallest ready
    bucket (background warm-up before its thread has done anything), a mixed batch compiles
    nothing and gives the tokens of exact buckets."""
    prompts = random_prompts(5, 3, 90, seed=2)
    want = [o.token_ids for o in lazy.generate(prompts, GREEDY)]
    llm = LLM(tiny_checkpoints("llama"), **ENGINE_KW)
    comp, builder = llm.engine.runner.compiler, llm.engine.runner.builder
    comp.compile_now(comp.covering_keys())
    builder.ready = comp.launch_ready
    with CompileCounter() as cc:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert cc.count == 0 and got == want
    covering = {k for k in comp.covering_keys() if isinstance(k, (DecodeKey, PrefillKey))}
    assert set(llm.engine.stats.launches) == covering


def test_background_warmup_finishes_and_then_serves_exact_buckets(lazy, tiny_checkpoints):
    prompts = random_prompts(3, 3, 40, seed=3)
    want = [o.token_ids for o in lazy.generate(prompts, GREEDY)]
    llm = LLM(tiny_checkpoints("llama"), warmup="background", **ENGINE_KW)
    got_early = [o.token_ids for o in llm.generate(prompts, GREEDY)]     # while the thread compiles
    comp = llm.engine.runner.compiler
    comp.wait_background()
    assert comp.background_done() and all(comp.compiled(k) for k in comp.all_keys())
    with CompileCounter() as cc:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert cc.count == 0 and got == got_early == want


def test_unknown_warmup_mode_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="warmup must be one of"):
        LLM(tiny_checkpoints("llama"), warmup="eager", **ENGINE_KW)


def test_background_warmup_profiles_on_the_covering_set_then_fully_once_done(lazy, tiny_checkpoints, tmp_path,
                                                                             monkeypatch):
    """Under a background warm-up a policy's cost model is first timed on the covering set's
    padded launches (compiling nothing for it, caching nothing), so the server is up as soon
    as the covering set is; once every shape is compiled, the next idle moment profiles every
    bucket, caches it, and the live scheduler takes it (quanta from the new decode step)."""
    from fastserve_jax import cost_profile

    monkeypatch.setenv("FASTSERVE_JAX_CACHE", str(tmp_path))       # no profile cached by other tests
    prompts = random_prompts(3, 3, 40, seed=4)
    want = [o.token_ids for o in lazy.generate(prompts, GREEDY)]
    measured_with = []
    real = cost_profile._measure
    monkeypatch.setattr(cost_profile, "_measure", lambda e, r, sparse: measured_with.append(
        (sorted(e.runner.stages[0].compiled, key=str), e.runner.builder.ready)) or real(e, r, sparse))
    llm = LLM(tiny_checkpoints("llama"), warmup="background", **dict(ENGINE_KW, scheduler="skip-join-mlfq"))
    eng, comp = llm.engine, llm.engine.runner.compiler
    covering = sorted((k for k in comp.covering_keys() if isinstance(k, (DecodeKey, PrefillKey))), key=str)
    assert measured_with == [(covering, comp.launch_ready)]       # timed padded, on the covering set alone
    assert eng.profile_provisional and eng.cost_model.name.endswith(cost_profile.PROVISIONAL)
    assert not (tmp_path / "cost_models").exists()
    comp.stop_background()                                        # shapes left: no full profile yet
    assert eng.runner.shapes_pending() and cost_profile.refine_profile(eng) is False and eng.profile_provisional
    comp.start_background(comp.all_keys())
    comp.wait_background()
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]     # refines first: the engine is idle
    assert got == want and not eng.profile_provisional
    cm = eng.cost_model
    assert cm.decode_batch == eng.cfg.decode_batch_buckets and cm.prefill_tokens == eng.cfg.prefill_token_buckets
    assert eng.scheduler.cost_model is cm and eng.scheduler.quanta[0] == pytest.approx(cm.decode_time(1))
    cached = list((tmp_path / "cost_models").glob("*.json"))
    assert len(cached) == 1 and cost_profile.CostModel.load(str(cached[0])) == cm
    assert cost_profile.refine_profile(eng) is False                          # once
    assert eng.kv.num_free_blocks == eng.kv.num_usable_blocks


def test_a_warm_up_stopped_midway_drops_the_compiles_not_started():
    """run_jobs: when progress raises (a server stopping while it warms up), the queued jobs
    are dropped; without that, leaving the pool ran every one of them first."""
    import threading
    import time

    from fastserve_jax.runner.compiler import run_jobs

    ran: list[int] = []
    lock = threading.Lock()

    class Job:
        def __init__(self, i: int) -> None:
            self.i = i

        def run(self) -> None:
            time.sleep(0.01)
            with lock:
                ran.append(self.i)

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs([Job(i) for i in range(50)], progress, threads=2)
    assert 2 <= len(ran) <= 6, ran       # the two seen, plus those already running on the 2 workers
