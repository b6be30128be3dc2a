"""Greedy tokens of the engine equal `transformers` generate for every tiny architecture,
and under recompute preemption (a pool too small for all sequences)."""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.models.random_checkpoint import TINY_PRESETS
from tiny_engine import ENGINE_KW, GREEDY, check_prompt_logprobs, hf_greedy, hf_prompt_logprobs, random_prompts


# Two architectures run in the default suite (OPT's learned positions, Llama 3's rope scaling);
# the other four (about 3 s each on 2 cores, mostly compiling their engine) are marked slow:
# test_models checks every architecture's logits against transformers on the paged prefill and
# decode path in the default suite, and the plain GQA Llama's greedy tokens are checked against
# transformers' in the default suite by the test below and test_engine.py's batch invariance
# (chunked prefill too), so its cell here went to -m slow on 2026-12-06.
DEFAULT_SUITE = ("opt", "llama3")


@pytest.mark.parametrize("preset", [pytest.param(p, marks=() if p in DEFAULT_SUITE else pytest.mark.slow)
                                    for p in TINY_PRESETS])
def test_greedy_matches_transformers(tiny_checkpoints, preset):
    path = tiny_checkpoints(preset)
    prompts = random_prompts(3, 1, 90, seed=1)   # 90 > the 64-token budget: chunked prefill too
    eng = LLM(path, warmup=False, **ENGINE_KW)
    got = [o.token_ids for o in eng.generate(prompts, GREEDY)]
    assert got == hf_greedy(path, prompts, GREEDY.max_tokens)


def test_recompute_preemption_keeps_outputs_and_prompt_logprobs(tiny_checkpoints):
    """A pool too small for all sequences forces FCFS to drop and recompute KV. Half the
    requests ask for prompt logprobs: a recomputed prefill neither records them twice nor
    changes them (fastserve_jax/prompt_logprobs.py). The last, seeded with a repetition
    penalty (its history holds the prompt) and min-p, samples what it samples alone."""
    path = tiny_checkpoints("llama")
    kw = dict(ENGINE_KW, num_device_blocks=24, swap_policy="recompute")
    small = LLM(path, warmup=False, **kw)
    prompts = random_prompts(6, 20, 40, seed=9)
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=30, temperature=1.0, seed=11, repetition_penalty=1.5, min_p=0.02,
                            ignore_eos=True)
    with pytest.raises(ValueError, match="device pool holds 184"):     # 200 tokens need 25 blocks; the pool has 23
        small.generate([[3] * 200], SamplingParams(max_tokens=5))
    alone = small.generate(prompts[-1:], seeded)[0].token_ids
    reqs = [small.engine.add_request(p, dataclasses.replace(sp, prompt_logprobs=3) if i % 2 else sp)
            for i, p in enumerate(prompts)] + [small.engine.add_request(prompts[-1], seeded)]
    while small.engine.has_unfinished():
        small.engine.step()
        small.engine.kv.check_integrity()
    assert sum(r.num_preemptions for r in reqs[1::2]) > 0 and reqs[-1].num_preemptions > 0
    got = [small.engine.output_of(r) for r in reqs]
    assert got.pop().token_ids == alone
    assert [o.token_ids for o in got] == hf_greedy(path, prompts, 30)
    for o, p, ref in zip(got[1::2], prompts[1::2], hf_prompt_logprobs(path, prompts[1::2])):
        check_prompt_logprobs(o.prompt_logprobs, p, ref, 3)


# bf16 tolerances, stated in docs/attention.md ("bf16"): the engine runs weights, KV and
# activations in bf16 with norms and softmax in fp32, transformers runs its own bf16 kernels,
# so logits differ by rounding. Each greedy token the engine picks must be transformers' argmax
# or within BF16_TIE nats of it (a near-tie that rounding may flip), and the engine's logprob of
# it must agree with transformers' within BF16_LOGPROB nats. scripts/device_check.py scores a
# GPU's outputs with the same function and limits.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
from device_check_parity import BF16_LOGPROB, BF16_TIE, teacher_forced  # noqa: E402


@pytest.mark.parametrize("backend", ["reference", "pallas"])
def test_bfloat16_engine_agrees_with_transformers_in_bfloat16(tiny_checkpoints, backend):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints("llama")
    prompts = random_prompts(3, 4, 90, seed=5)           # 90 > the 64-token budget: a chunked prefill
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)
    outs = LLM(path, dtype="bfloat16", attention_backend=backend, warmup=False, **ENGINE_KW).generate(prompts, sp)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    worst_tie, worst_lp = teacher_forced(hf, prompts, outs)
    assert worst_tie <= BF16_TIE and worst_lp <= BF16_LOGPROB, (worst_tie, worst_lp)
