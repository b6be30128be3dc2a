"""Greedy tokens of the engine equal `transformers` generate for every tiny architecture,
and under recompute preemption (a pool too small for all sequences)."""

from __future__ import annotations

import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.models.random_checkpoint import TINY_PRESETS
from tiny_engine import ENGINE_KW, GREEDY, hf_greedy, random_prompts


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_matches_transformers(tiny_checkpoints, preset):
    path = tiny_checkpoints(preset)
    prompts = random_prompts(3, 1, 90, seed=1)   # 90 > the 64-token budget: chunked prefill too
    eng = LLM(path, warmup=False, **ENGINE_KW)
    got = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    assert got == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_recompute_preemption_keeps_outputs(tiny_checkpoints):
    """A pool too small for all sequences forces FCFS to drop and recompute KV."""
    kw = dict(ENGINE_KW, num_device_blocks=24, swap_policy="recompute")
    small = LLM(tiny_checkpoints("llama"), warmup=False, **kw)
    prompts = random_prompts(6, 20, 40, seed=9)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    with pytest.raises(ValueError, match="KV blocks"):     # 200 tokens need 25 blocks; the pool has 23
        small.generate([[3] * 200], SamplingParams(max_tokens=5))
    reqs = [small.engine.add_request(p, sp) for p in prompts]
    while small.engine.has_unfinished():
        small.engine.step()
        small.engine.kv.check_integrity()
    assert sum(r.num_preemptions for r in reqs) > 0
    got = [small.engine.output_of(r) for r in reqs]
    assert [o.token_ids for o in got] == hf_greedy(tiny_checkpoints("llama"), prompts, 30)
