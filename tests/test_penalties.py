"""Presence and frequency penalties (OpenAI semantics): the device sampler on literal
arrays, and greedy decoding through the engine against a step-by-step reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.runner.compile_guard import CompileCounter
from engine_grids import SMALL_GRID
from fastserve_jax.sampling import Penalties, SamplingArrays, apply_penalties, sample


def _arrays(n):
    return SamplingArrays(jnp.ones(n, jnp.float32), jnp.full(n, -1, jnp.int32), jnp.ones(n, jnp.float32),
                          jnp.zeros(n, jnp.uint32), jnp.zeros(n, jnp.int32))


def test_penalties_on_literal_arrays():
    logits = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
    pen = Penalties(presence=jnp.asarray([0.5, 0.0], jnp.float32), frequency=jnp.asarray([1.0, -1.0], jnp.float32),
                    history=jnp.asarray([[3, 3, 1, -1, -1], [2, -1, -1, -1, -1]], jnp.int32))
    got = np.asarray(apply_penalties(logits, pen))
    # row 0: token 3 twice (4 - 2*1 - 0.5), token 1 once (2 - 1 - 0.5); row 1: token 2 once, frequency -1
    np.testing.assert_allclose(got, [[1.0, 0.5, 3.0, 1.5], [1.0, 2.0, 4.0, 4.0]])


def test_penalties_change_greedy_choice_but_not_logprobs():
    logits = jnp.full((1, 24), -10.0, jnp.float32).at[0, :3].set(jnp.asarray([0.0, 5.0, 4.0]))
    hist = jnp.asarray([[1, 1, -1]], jnp.int32)
    plain = sample(logits, _arrays(1), greedy=True, with_logprobs=True)
    pen = sample(logits, _arrays(1), Penalties(jnp.zeros(1), jnp.ones(1), hist), greedy=True, with_logprobs=True)
    assert int(plain.tokens[0]) == 1 and int(pen.tokens[0]) == 2      # 5 - 2*1 = 3 < 4
    raw = np.asarray(logits - jnp.log(jnp.exp(logits).sum()))
    assert abs(float(pen.logprob[0]) - raw[0, 2]) < 1e-5              # logprobs stay the raw model's
    zero = sample(logits, _arrays(1), Penalties(jnp.zeros(1), jnp.zeros(1), hist), greedy=True, with_logprobs=False)
    assert int(zero.tokens[0]) == 1


def test_penalty_params_are_validated():
    with pytest.raises(ValueError, match=r"presence_penalty must be a number in \[-2, 2\]"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty="1")
    assert SamplingParams(frequency_penalty=-2).penalized and not SamplingParams().penalized


# Same settings as tests/test_engine.py, so its compiled executables come from the session cache.
ENGINE_KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8, num_device_blocks=160,
                 scheduler="fcfs")


def _reference_greedy(path: str, prompt: list[int], sp: SamplingParams) -> list[int]:
    """Greedy decoding with a dense causal forward over the whole sequence each step (padded
    to one length, so it compiles once) and the penalties applied in numpy."""
    import jax

    from fastserve_jax.models.attention import dense_batch
    from fastserve_jax.models.loader import load_model

    _, module, params = load_model(path)
    length = len(prompt) + sp.max_tokens
    forward = jax.jit(lambda toks: module.apply({"params": params}, toks, dense_batch((1, length)))[0])
    ids, out = list(prompt), []
    for _ in range(sp.max_tokens):
        logits = np.asarray(forward(jnp.asarray([ids + [0] * (length - len(ids))])))[len(ids) - 1]  # (L, V) rows
        counts = np.bincount(np.asarray(out, np.int64), minlength=logits.shape[0])[:logits.shape[0]]
        logits = logits - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def test_engine_applies_penalties_without_new_compilations(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    llm = LLM(path, warmup="full", **ENGINE_KW, **SMALL_GRID)
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 256, 12)] for _ in range(3)]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    pen = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=0.7, frequency_penalty=1.3)
    solo = llm.generate(prompts[1], plain)[0].token_ids
    with CompileCounter() as cc:
        outs = llm.generate(prompts, [pen, plain, pen])
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    assert outs[1].token_ids == solo                       # a penalty-free row in a penalized batch is unchanged
    for p, o in ((prompts[0], outs[0]), (prompts[2], outs[2])):
        assert o.token_ids == _reference_greedy(path, p, pen)
    unpenalized = llm.generate(prompts[0], plain)[0].token_ids
    assert outs[0].token_ids != unpenalized                # the check above is not vacuous
