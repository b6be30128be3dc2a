"""The device sampler's draws against an exact numpy reference of vLLM's semantics, and its
logprobs: thousands of seeded draws per setting; and seeded requests through the engine (all
slow; the cheap checks of each fixed defect are in test_units.py).

The reference follows vLLM's sampler: logit biases (min_tokens bans EOS and stop ids as a
bias of -inf), then the repetition penalty over the prompt and output tokens, then
presence/frequency penalties on the output tokens only, then temperature (below 1e-5
greedy), then min-p, then top-k (tokens tied with the k-th kept), then top-p over what min-p
and top-k left, renormalized (the tokens tied with the last one it keeps stay too). Each token's frequency must lie within 5 standard errors of its
probability, and tokens of probability 0 are never drawn.
"""

from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax import LLM
from fastserve_jax.request import Request
from fastserve_jax.runner.launch import penalty_arrays
from fastserve_jax import sampling_draw
from fastserve_jax.sampling import Penalties, SamplingArrays, sample
from fastserve_jax.sampling_params import SamplingParams
from tiny_engine import ENGINE_KW, random_prompts

pytestmark = pytest.mark.slow

DRAWS = 20_000
V = 16


@functools.cache
def _sampler(candidates: int):
    """The jitted sampler traced with sampling_draw.CANDIDATES = candidates: V settles every
    cut from the candidates, 3 leaves deeper top-k and most top-p cuts to the bisection."""
    jitted = jax.jit(lambda *a, **kw: sample(*a, **kw), static_argnames=("greedy", "with_logprobs"))

    def run(*args, **kw):
        with mock.patch.object(sampling_draw, "CANDIDATES", candidates):
            return jitted(*args, **kw)
    return run


def reference(logits, temp=1.0, top_k=-1, top_p=1.0, hist=(), presence=0.0, frequency=0.0, bias=None,
              prompt=(), repetition=1.0, min_p=0.0):
    """The probability of each token (float64); `hist` is the output so far."""
    x = np.asarray(logits, np.float64).copy()
    for t, b in (bias or {}).items():
        x[t] += b
    seen = np.zeros(len(x), bool)
    seen[list(prompt) + list(hist)] = True
    x[seen] = np.where(x[seen] > 0, x[seen] / repetition, x[seen] * repetition)
    counts = np.bincount(np.asarray(hist, np.int64), minlength=len(x))
    x = x - frequency * counts - presence * (counts > 0)
    if temp < 1e-5:
        return np.eye(len(x))[np.argmax(x)]
    x = x / temp
    if min_p > 0:
        p = np.exp(x - x.max())
        x[p < min_p * p.max()] = -np.inf
    if 0 < top_k < len(x):
        x[x < np.sort(x)[::-1][top_k - 1]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    above = np.array([p[x > t].sum() for t in x])            # mass strictly above each token
    x[above >= top_p] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


def draw(logits, temp=1.0, top_k=-1, top_p=1.0, hist=(), presence=0.0, frequency=0.0, bias=None, step=0,
         n=DRAWS, with_logprobs=False, prompt=(), repetition=1.0, min_p=0.0, candidates=V):
    """n draws from one logits row, row i seeded i, through the jitted sampler (the penalties
    variant when any penalty, history or bias is given; the history as the runner lays it out:
    the prompt's distinct tokens, then the output)."""
    rows = jnp.tile(jnp.asarray(logits, jnp.float32)[None], (n, 1))
    s = SamplingArrays(jnp.full(n, temp, jnp.float32), jnp.full(n, top_k, jnp.int32), jnp.full(n, top_p, jnp.float32),
                       jnp.full(n, min_p, jnp.float32), jnp.arange(n, dtype=jnp.uint32), jnp.full(n, step, jnp.int32))
    pen = None
    if hist or presence or frequency or bias or repetition != 1.0:
        seen = sorted(set(prompt))
        h = np.full((n, 12), -1, np.int32)
        h[:, :len(seen) + len(hist)] = seen + list(hist)
        ids, vals = np.full((n, V), -1, np.int32), np.zeros((n, V), np.float32)
        ids[:, :len(bias or {})] = list(bias or {})
        vals[:, :len(bias or {})] = list((bias or {}).values())
        pen = Penalties(jnp.full(n, presence, jnp.float32), jnp.full(n, frequency, jnp.float32),
                        jnp.full(n, repetition, jnp.float32), jnp.full(n, len(seen), jnp.int32), jnp.asarray(h),
                        jnp.asarray(ids), jnp.asarray(vals), jnp.zeros(n, bool))
    return _sampler(candidates)(rows, s, pen, greedy=False, with_logprobs=with_logprobs)


def check(logits, **kw):
    want = reference(logits, **{k: v for k, v in kw.items() if k not in ("step", "candidates")})
    got = np.bincount(np.asarray(draw(logits, **kw).tokens), minlength=V) / DRAWS
    assert got[want == 0].sum() == 0, (kw, got, want)
    se = np.sqrt(want * (1 - want) / DRAWS)
    assert (np.abs(got - want) <= 5 * se + 1e-9).all(), (kw, np.round(got, 4), np.round(want, 4))
    return want


LOGITS = np.random.default_rng(0).standard_normal(V) * 2
TIES = np.array([3.0, 3.0, 3.0, 3.0, 1.0, 0.0] + [-2.0] * (V - 6))


@pytest.mark.parametrize("kw", [
    {}, dict(temp=1e-4), dict(temp=0.3), dict(temp=1.7), dict(temp=50.0), dict(temp=1e-6), dict(step=7),
    dict(top_k=1), dict(top_k=2), dict(top_k=V), dict(top_k=V + 1), dict(top_k=2**31 - 1),
    dict(top_p=1e-6), dict(top_p=0.5), dict(top_p=0.999), dict(top_p=1.0),
    dict(top_k=3, top_p=0.5), dict(top_k=5, top_p=0.8, temp=0.5), dict(top_p=0.6, temp=2.0), dict(top_p=0.6, temp=0.5),
    dict(bias={0: 5.0, 3: -100.0, 7: 2.0}), dict(bias={2: 100.0}, temp=1e-4),
    dict(bias={i: -100.0 for i in range(V) if i != 4}), dict(bias={i: -100.0 for i in range(V) if i != 4}, temp=5.0),
    dict(hist=[6, 6, 6, 2], presence=0.5, frequency=0.7),
    dict(hist=[5, 5, 9], presence=-1.0, frequency=-0.5, temp=0.7, top_p=0.9),
    dict(hist=[6, 1], presence=2.0, frequency=2.0, top_k=4, top_p=0.7, temp=0.8),
    dict(bias={6: -np.inf, 1: -np.inf}, top_k=3),                  # min_tokens' bans
    dict(min_p=0.05), dict(min_p=0.3, temp=0.7), dict(min_p=0.1, temp=2.0), dict(min_p=1.0), dict(min_p=0.1, top_k=3),
    dict(min_p=0.1, top_p=0.7), dict(min_p=0.2, top_k=4, top_p=0.8, temp=1.5),
    dict(prompt=[6, 2, 6], hist=[9], repetition=1.5), dict(prompt=[0, 3], repetition=0.6, temp=0.8),
    dict(prompt=[6, 2], hist=[2, 11, 11], repetition=1.3, presence=0.4, frequency=0.5, bias={11: 1.5, 6: -1.0},
         min_p=0.02, top_p=0.9),
], ids=repr)
@pytest.mark.parametrize("candidates", [V, 3])
def test_draws_follow_the_reference(kw, candidates):
    check(LOGITS, candidates=candidates, **kw)


@pytest.mark.parametrize("kw", [dict(top_p=0.5), dict(top_k=2), dict(top_k=1), dict(temp=1e-4), dict(top_k=5, top_p=0.9)],
                         ids=repr)
@pytest.mark.parametrize("candidates", [V, 3])
def test_ties(kw, candidates):
    """Tokens tied with the k-th stay in top-k, and those tied with the last token top-p keeps
    stay too (vLLM keeps whichever its sort puts first; we keep no id before another)."""
    check(TIES, candidates=candidates, **kw)


def test_the_reference_tells_the_usual_mistakes_apart():
    """The cases above would catch these: top-p before temperature, top-k off by one, top-p
    over the whole vocabulary rather than what top-k kept, min-p before temperature or after
    top-p (transformers' order), the repetition penalty over the output only."""
    assert (reference(LOGITS, top_p=0.6, temp=2.0) > 0).sum() != (reference(LOGITS, top_p=0.6) > 0).sum()
    assert (reference(LOGITS, min_p=0.1, temp=2.0) > 0).sum() != (reference(LOGITS, min_p=0.1) > 0).sum()
    top_p_first = reference(LOGITS, top_p=0.7)                     # then min-p: transformers' order
    top_p_first = (top_p_first >= 0.1 * top_p_first.max()) & (top_p_first > 0)
    assert (reference(LOGITS, min_p=0.1, top_p=0.7) > 0).sum() == 2 and top_p_first.sum() == 3
    assert not np.allclose(reference(LOGITS, prompt=[6, 2, 6], hist=[9], repetition=1.5),
                           reference(LOGITS, hist=[9], repetition=1.5))
    assert (reference(LOGITS, top_k=2) > 0).sum() == 2
    assert (reference(LOGITS, top_k=3, top_p=0.5) > 0).sum() == 1


def test_logprobs_are_the_raw_models_and_agree_with_the_top_entries():
    """vLLM's default (raw_logprobs): the log-softmax of the logits before penalties, biases
    and temperature, for the drawn token and the top entries alike, finite where a bias bans
    tokens, and on bf16-rounded logits too."""
    wide = np.concatenate([LOGITS, LOGITS - 1.0])               # the sampler computes 20 top entries
    for logits in (wide, np.asarray(jnp.asarray(wide * 4, jnp.bfloat16).astype(jnp.float32))):
        raw = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        out = draw(logits, temp=0.5, top_k=6, bias={0: -np.inf, 3: 50.0}, hist=[1, 1], frequency=1.0, n=512,
                   with_logprobs=True)
        toks, lp = np.asarray(out.tokens), np.asarray(out.logprob)
        assert np.isfinite(lp).all() and np.abs(lp - raw[toks]).max() < 1e-5
        top_ids, top_lp = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
        assert (top_ids == np.argsort(-raw, kind="stable")[:top_ids.shape[1]]).all()
        assert np.abs(top_lp - raw[top_ids]).max() < 1e-5 and (np.diff(top_lp, axis=1) <= 0).all()
        inside = (top_ids == toks[:, None])
        assert (np.abs(top_lp - lp[:, None])[inside] < 1e-6).all()


def test_penalties_count_output_tokens_only_and_min_tokens_bans_stops():
    """vLLM's presence and frequency penalties see the output, not the prompt; below
    min_tokens the EOS and stop ids are banned (bias -inf), from then on not."""
    sp = SamplingParams(presence_penalty=1.0, stop_token_ids=[9], min_tokens=3, logit_bias={4: 1.5})
    r = Request("r", [1, 2, 2, 3], sp, 0.0, eos_token_ids=frozenset({0}))
    r.output_token_ids = [5, 5]
    p = penalty_arrays([r, None], 8)
    assert p.history[0].tolist() == [5, 5] + [-1] * 6 and (p.history[1] == -1).all()
    assert dict(zip(p.bias_ids[0][p.bias_ids[0] >= 0].tolist(), p.bias[0][p.bias_ids[0] >= 0].tolist())) == \
        {4: 1.5, 9: -np.inf, 0: -np.inf}
    r.output_token_ids = [5, 5, 6]
    p = penalty_arrays([r], 8)
    assert dict(zip(p.bias_ids[0][p.bias_ids[0] >= 0].tolist(), p.bias[0][p.bias_ids[0] >= 0].tolist())) == {4: 1.5}


def test_seeded_tokens_do_not_depend_on_how_the_engine_runs_them(tiny_checkpoints):
    """A seeded request (penalties, repetition penalty, min-p, logit bias and min_tokens too) gets the same tokens alone,
    at another place in batches of other sizes, over a chunked prefill, under recompute and
    swap preemption, with async scheduling on or off; n=3 gives seeds seed, seed + 1, seed + 2;
    unseeded requests differ."""
    path = tiny_checkpoints("llama")
    prompts = random_prompts(1, 150, 150, seed=2) + random_prompts(5, 20, 40, seed=9)   # the first: 3 chunks
    others = random_prompts(7, 1, 120, seed=3)
    sp = [SamplingParams(max_tokens=24, top_k=50, top_p=0.95, seed=100 + i, ignore_eos=True, presence_penalty=0.5,
                         frequency_penalty=0.3, logit_bias={5: 2.0}, min_tokens=3, repetition_penalty=1.2,
                         min_p=0.01) for i in range(len(prompts))]
    plain = SamplingParams(max_tokens=7)
    want = None
    for asyn in (False, True):
        llm = LLM(path, warmup=False, async_scheduling=asyn, **ENGINE_KW)
        alone = [llm.generate([p], s, use_tqdm=False)[0].token_ids for p, s in zip(prompts, sp)]
        want = want or alone
        assert alone == want
        mixed = llm.generate(others[:3] + prompts[:2] + others[3:], [plain] * 3 + sp[:2] + [plain] * 4, use_tqdm=False)
        assert [o.token_ids for o in mixed[3:5]] == want[:2]
        three = llm.generate([prompts[0]], dataclasses.replace(sp[0], n=3), use_tqdm=False)[0].outputs
        assert three[0].token_ids == want[0]
        assert [o.token_ids for o in three[1:]] == [llm.generate([prompts[0]], dataclasses.replace(sp[0], seed=s),
                                                                 use_tqdm=False)[0].token_ids for s in (101, 102)]
        unseeded = llm.generate([prompts[1]] * 3, dataclasses.replace(sp[1], seed=None), use_tqdm=False)
        assert len({tuple(o.token_ids) for o in unseeded}) == 3
        for policy in ("recompute", "reactive"):
            small = LLM(path, warmup=False, async_scheduling=asyn,
                        **dict(ENGINE_KW, num_device_blocks=24, swap_policy=policy, scheduler="skip-join-mlfq"))
            outs = small.generate(prompts[1:], sp[1:], use_tqdm=False)
            st = small.engine.stats
            assert (st.recomputations if policy == "recompute" else st.swap_out_blocks) > 0
            assert [o.token_ids for o in outs] == want[1:]
