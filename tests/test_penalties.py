"""Presence and frequency penalties and logit_bias (OpenAI semantics) and min_tokens (vLLM's):
the device sampler on literal arrays, and greedy decoding through the engine against a
step-by-step reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastserve_jax import LLM, SamplingParams
from fastserve_jax.runner.compile_guard import CompileCounter
from engine_grids import SMALL_GRID
from fastserve_jax.sampling import Penalties, SamplingArrays, apply_penalties, sample
from fastserve_jax.sampling_draw import cut_logits


def _arrays(n, min_p=0.0):
    return SamplingArrays(jnp.ones(n, jnp.float32), jnp.full(n, -1, jnp.int32), jnp.ones(n, jnp.float32),
                          jnp.full(n, min_p, jnp.float32), jnp.zeros(n, jnp.uint32), jnp.zeros(n, jnp.int32))


def _pen(presence, frequency, history, bias: list[dict] | None = None, repetition=None, out_start=None,
         exclusive=None) -> Penalties:
    """Penalties from lists; `bias`: per row {token: bias}, padded to 3 slots with -1;
    repetition 1, out_start 0 (no prompt tokens in the history) and no exclusive rows unless given."""
    n = len(presence)
    ids, vals = np.full((n, 3), -1, np.int32), np.zeros((n, 3), np.float32)
    for i, row in enumerate(bias or []):
        ids[i, :len(row)], vals[i, :len(row)] = list(row), list(row.values())
    return Penalties(jnp.asarray(presence, jnp.float32), jnp.asarray(frequency, jnp.float32),
                     jnp.asarray(repetition or [1.0] * n, jnp.float32), jnp.asarray(out_start or [0] * n, jnp.int32),
                     jnp.asarray(history, jnp.int32), jnp.asarray(ids), jnp.asarray(vals),
                     jnp.asarray(exclusive or [False] * n))


def test_penalties_on_literal_arrays():
    logits = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], jnp.float32)
    pen = _pen([0.5, 0.0], [1.0, -1.0], [[3, 3, 1, -1, -1], [2, -1, -1, -1, -1]])
    got = np.asarray(apply_penalties(logits, pen))
    # row 0: token 3 twice (4 - 2*1 - 0.5), token 1 once (2 - 1 - 0.5); row 1: token 2 once, frequency -1
    np.testing.assert_allclose(got, [[1.0, 0.5, 3.0, 1.5], [1.0, 2.0, 4.0, 4.0]])
    # biases add on top; -inf bans a token; padding slots (-1) change nothing
    pen = _pen([0.5, 0.0], [1.0, 0.0], [[3, 3, 1, -1, -1], [-1] * 5], [{0: 2.5, 3: -np.inf}, {1: -1.0, 2: 100.0}])
    got = np.asarray(apply_penalties(logits, pen))
    np.testing.assert_allclose(got, [[3.5, 0.5, 3.0, -np.inf], [1.0, 1.0, 103.0, 4.0]])
    # an exclusive row (allowed_token_ids) keeps only its slots' tokens, with their biases, token 0 too
    # (the padding slots' scatter index); the other row is untouched
    pen = _pen([0.0, 0.0], [0.0, 0.0], [[-1] * 5, [-1] * 5], [{0: 0.0, 2: 1.0}, {1: -1.0}], exclusive=[True, False])
    got = np.asarray(apply_penalties(logits, pen))
    np.testing.assert_allclose(got, [[1.0, -np.inf, 4.0, -np.inf], [1.0, 1.0, 3.0, 4.0]])
    pen = _pen([0.0], [0.0], [[-1] * 5], [{3: 0.0}], exclusive=[True])     # slot 0 padding: token 0 not allowed
    np.testing.assert_allclose(np.asarray(apply_penalties(logits[:1], pen)), [[-np.inf, -np.inf, -np.inf, 4.0]])


_jsample = jax.jit(sample, static_argnames=("greedy", "with_logprobs"))   # op by op it took seconds


def test_penalties_change_greedy_choice_but_not_logprobs():
    logits = jnp.full((1, 24), -10.0, jnp.float32).at[0, :3].set(jnp.asarray([0.0, 5.0, 4.0]))
    hist = jnp.asarray([[1, 1, -1]], jnp.int32)
    plain = _jsample(logits, _arrays(1), greedy=True, with_logprobs=True)
    pen = _jsample(logits, _arrays(1), _pen([0.0], [1.0], hist), greedy=True, with_logprobs=True)
    assert int(plain.tokens[0]) == 1 and int(pen.tokens[0]) == 2      # 5 - 2*1 = 3 < 4
    raw = np.asarray(logits - jnp.log(jnp.exp(logits).sum()))
    assert abs(float(pen.logprob[0]) - raw[0, 2]) < 1e-5              # logprobs stay the raw model's
    zero = _jsample(logits, _arrays(1), _pen([0.0], [0.0], hist), greedy=True, with_logprobs=False)
    assert int(zero.tokens[0]) == 1
    for greedy in (True, False):                 # a banned token is never drawn, in either mode
        banned = _jsample(jnp.tile(logits, (64, 1)), _arrays(64)._replace(seed=jnp.arange(64, dtype=jnp.uint32)),
                        _pen([0.0] * 64, [0.0] * 64, jnp.tile(hist, (64, 1)), [{1: -np.inf, 2: -np.inf}] * 64),
                        greedy=greedy, with_logprobs=False)
        assert not set(np.asarray(banned.tokens).tolist()) & {1, 2}


def test_repetition_penalty_matches_transformers_over_prompt_and_output():
    """transformers' RepetitionPenaltyLogitsProcessor over prompt + output ids (what a decoder
    sees) equals the sampler's: prompt tokens (distinct, before out_start) and output tokens
    alike, positive logits divided and negative ones multiplied. Frequency and presence count
    the output only; biases come first (vLLM's order: 2 + 1 = 3 divided, not 2 / 1.5 + 1)."""
    pytest.importorskip("torch")
    import torch
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = np.random.default_rng(1).standard_normal((2, 12)).astype(np.float32) * 3
    prompts, outputs = [[4, 9, 4, 0], [7]], [[5, 9, 5], []]
    hist = np.full((2, 10), -1, np.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        row = sorted(set(p)) + o
        hist[i, :len(row)] = row
    for rep in (1.3, 0.7):
        got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), _pen([0.0, 0.0], [0.0, 0.0], hist, repetition=[rep, rep],
                                                                     out_start=[3, 1])))
        for i, (p, o) in enumerate(zip(prompts, outputs)):
            want = RepetitionPenaltyLogitsProcessor(rep)(torch.tensor([p + o]), torch.tensor(logits[i:i + 1]))
            np.testing.assert_allclose(got[i], want[0].numpy(), rtol=1e-6)
    x = jnp.asarray([[2.0, -2.0, 1.0, 1.0]])
    pen = _pen([0.5], [1.0], [[0, 1, 3, 3, -1]], [{2: 5.0, 0: 1.0}], repetition=[1.5], out_start=[2])
    # token 0 prompt: (2 + 1) / 1.5; token 1 prompt: -2 * 1.5; token 2 unseen: 1 + 5; token 3 output
    # twice: 1 / 1.5 - 2 * 1 - 0.5
    np.testing.assert_allclose(np.asarray(jax.jit(apply_penalties)(x, pen)), [[2.0, -3.0, 6.0, 1 / 1.5 - 2.5]], rtol=1e-6)


def test_min_p_matches_transformers_and_comes_before_top_p():
    """transformers' MinPLogitsWarper keeps what the sampler's min-p keeps (over tempered
    logits, top-k and top-p off). With top-p as well we follow vLLM's v1 sampler, min-p first:
    probabilities (0.5, 0.3, 0.15, 0.05) and min_p 0.35 leave (0.625, 0.375), where top_p 0.6
    keeps token 0 alone; transformers' top-p first would keep tokens 0 and 1."""
    pytest.importorskip("torch")
    import torch
    from transformers.generation.logits_process import MinPLogitsWarper

    logits = jnp.sort(jax.random.normal(jax.random.key(0), (1, 64)) * 3, axis=-1)[:, ::-1]
    cut = jax.jit(cut_logits)
    for min_p in (0.0, 0.01, 0.2, 0.9, 1.0):
        got = np.isfinite(np.asarray(cut(logits, jnp.asarray([-1]), jnp.asarray([1.0]),
                                                 jnp.asarray([min_p], jnp.float32))))
        want = np.isfinite(MinPLogitsWarper(min_p)(None, torch.tensor(np.asarray(logits))).numpy()) \
            if min_p > 0 else np.ones_like(got)
        assert (got == want).all() and got.sum() >= 1, min_p
    rows = jnp.tile(jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]])), (64, 1))
    s = _arrays(64, min_p=0.35)._replace(seed=jnp.arange(64, dtype=jnp.uint32))
    draw = jax.jit(lambda s: sample(rows, s, greedy=False, with_logprobs=False).tokens)
    assert set(np.asarray(draw(s)).tolist()) == {0, 1}
    assert set(np.asarray(draw(s._replace(top_p=jnp.full(64, 0.6, jnp.float32)))).tolist()) == {0}


def test_penalty_arrays_put_the_prompts_distinct_tokens_first_only_with_a_repetition_penalty():
    from fastserve_jax.request import Request
    from fastserve_jax.runner.launch import penalty_arrays, sampling_arrays

    rep = Request("a", [6, 2, 6, 3], SamplingParams(repetition_penalty=1.2, min_p=0.1), 0.0)
    pres = Request("b", [6, 2], SamplingParams(presence_penalty=0.5), 0.0)
    rep.output_token_ids, pres.output_token_ids = [8, 8], [9]
    p = penalty_arrays([rep, pres, None], 8)
    assert p.history.tolist() == [[2, 3, 6, 8, 8, -1, -1, -1], [9] + [-1] * 7, [-1] * 8]
    assert p.out_start.tolist() == [3, 0, 0] and p.repetition.tolist() == pytest.approx([1.2, 1.0, 1.0])
    assert sampling_arrays([rep, pres, None]).min_p.tolist() == pytest.approx([0.1, 0.0, 0.0])


def test_penalty_history_grows_with_the_output_and_is_made_anew_where_it_changed_otherwise():
    """penalty_arrays' histories equal ones built from scratch while the outputs grow a token at
    a time (past the buffer's first size), and where a list is replaced, shortened or changed
    at its last token; an appended token is copied into the same buffer, not the whole output."""
    from fastserve_jax.request import Request
    from fastserve_jax.runner.launch import penalty_arrays

    rep = Request("a", [6, 2, 6, 3], SamplingParams(repetition_penalty=1.2), 0.0)
    pres = Request("b", [6, 2], SamplingParams(presence_penalty=0.5), 0.0)

    def check():
        p = penalty_arrays([rep, None, pres], 64)
        for row, r, prompt in ((0, rep, [2, 3, 6]), (2, pres, [])):
            want = prompt + r.output_token_ids
            assert p.history[row].tolist() == want + [-1] * (64 - len(want)) and p.out_start[row] == len(prompt)
        assert (p.history[1] == -1).all()

    check()
    buffers = []                                           # the distinct arrays rep's rows are views of
    for t in range(40):
        rep.output_token_ids.append(t % 7)
        pres.output_token_ids.append(t)
        check()
        base = rep.penalty_history(True)[0].base
        buffers += [] if any(b is base for b in buffers) else [base]
    assert len(buffers) <= 3                               # made once, doubled as it filled
    kept = rep.penalty_history(True)[0].copy()
    rep.output_token_ids = [8] * 39 + [4, 1]               # another list, alike at the last token mirrored
    del pres.output_token_ids[-5:]                         # shorter
    check()
    rep.output_token_ids[-1] = 4                           # its last token changed
    check()
    assert kept.tolist() == [2, 3, 6] + [t % 7 for t in range(40)]   # what it returned did not change


def test_penalty_params_are_validated():
    with pytest.raises(ValueError, match=r"presence_penalty must be a number in \[-2, 2\]"):
        SamplingParams(presence_penalty=2.5)
    with pytest.raises(ValueError, match="frequency_penalty"):
        SamplingParams(frequency_penalty="1")
    assert SamplingParams(frequency_penalty=-2).penalized and not SamplingParams().penalized
    assert SamplingParams(logit_bias={5: 1}).penalized and SamplingParams(min_tokens=1).penalized
    for bad, match in ((dict(min_tokens=17), r"min_tokens must be an integer in \[0, max_tokens=16\]"),
                       (dict(min_tokens=True), "min_tokens"), (dict(logit_bias={5: 1e31}), r"\[-1e\+30, 1e\+30\]"),
                       (dict(logit_bias={-1: 1}), "non-negative token ids"), (dict(logit_bias={"5": 1}), "token ids"),
                       (dict(logit_bias={5: float("nan")}), "numbers"), (dict(logit_bias={5: float("inf")}), "or -inf"),
                       (dict(logit_bias=dict.fromkeys(range(301), 1.0)), "at most 300")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(repetition_penalty=1.05).penalized and SamplingParams(repetition_penalty=0.5).penalized
    assert not SamplingParams(min_p=0.1).penalized                  # the random sampler's own, like top_p
    for bad, match in ((dict(repetition_penalty=0), r"repetition_penalty must be a number in \[1e-30, 1e\+30\]"),
                       (dict(repetition_penalty=float("inf")), "repetition_penalty"),
                       (dict(repetition_penalty=True), "repetition_penalty"),
                       (dict(min_p=1.5), r"min_p must be a number in \[0, 1\]"), (dict(min_p=-0.1), "min_p"),
                       (dict(min_p=float("nan")), "min_p")):
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    assert SamplingParams(logit_bias={np.int64(5): 2}).logit_bias == {5: 2.0}
    assert SamplingParams(logit_bias={5: 200, 6: -1e9}).logit_bias == {5: 200.0, 6: -1e9}   # vLLM's: unclamped
    assert SamplingParams(logit_bias={}).logit_bias is None


# Same settings as tests/test_engine.py, so its compiled executables come from the session cache.
ENGINE_KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8, num_device_blocks=160,
                 scheduler="fcfs")


def _reference_greedy(path: str, prompt: list[int], sp: SamplingParams) -> list[int]:
    """Greedy decoding with a dense causal forward over the whole sequence each step (padded
    to one length, so it compiles once), the penalties and logit biases applied in numpy, the
    stop token ids banned below min_tokens and ending the output from there (EOS ignored)."""
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
        for t, b in (sp.logit_bias or {}).items():
            logits[t] += b
        if len(out) < sp.min_tokens:
            logits[sp.stop_token_ids] = -np.inf
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
        if out[-1] in sp.stop_token_ids:
            break
    return out


@pytest.fixture(scope="module")
def warm(tiny_checkpoints):
    """One engine warmed up in full for the two tests below: they only generate on it (fcfs
    learns nothing, every request finishes), and each counts its own compilations."""
    path = tiny_checkpoints("llama")
    return path, LLM(path, warmup="full", **ENGINE_KW, **SMALL_GRID)


def test_engine_applies_penalties_without_new_compilations(warm):
    path, llm = warm
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 256, 12)] for _ in range(3)]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    pen = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, presence_penalty=0.7, frequency_penalty=1.3)
    solo = llm.generate(prompts[1], plain)[0].token_ids
    with CompileCounter(this_thread=True) as cc:
        outs = llm.generate(prompts, [pen, plain, pen])
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    assert outs[1].token_ids == solo                       # a penalty-free row in a penalized batch is unchanged
    for p, o in ((prompts[0], outs[0]), (prompts[2], outs[2])):
        assert o.token_ids == _reference_greedy(path, p, pen)
    unpenalized = llm.generate(prompts[0], plain)[0].token_ids
    assert outs[0].token_ids != unpenalized                # the check above is not vacuous


def test_engine_applies_logit_bias_and_min_tokens(warm):
    """logit_bias moves greedy choices, min_tokens holds back stop tokens until that many are
    out (the pending token of async scheduling counted), in a batch with a plain row, with
    the warmed-up executables; the synchronous loop gives the same."""
    path, llm = warm
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 256, 12)] for _ in range(3)]
    plain = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    solo = [o.token_ids for o in llm.generate(prompts, plain)]
    biased = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                            logit_bias={solo[0][0]: -100, solo[0][3]: 3.5, 7: -2})
    held = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[solo[2][0], solo[2][1]],
                          min_tokens=5)
    with CompileCounter() as cc:
        outs = llm.generate(prompts, [biased, plain, held])
    assert cc.count == 0, f"{cc.count} compilations after warm-up"
    assert outs[1].token_ids == solo[1]
    assert outs[0].token_ids != solo[0] and outs[0].token_ids == _reference_greedy(path, prompts[0], biased)
    # -inf bans a token (vLLM's SamplingParams takes it; refused until 2026-12-07), as -100 did here
    banned = dataclasses.replace(biased, logit_bias={**biased.logit_bias, solo[0][0]: float("-inf")})
    assert llm.generate(prompts[0], banned)[0].token_ids == outs[0].token_ids
    drawn = llm.generate(prompts[0], dataclasses.replace(banned, temperature=1.5, seed=3, n=4))[0]
    assert all(solo[0][0] not in c.token_ids for c in drawn.outputs)
    want = _reference_greedy(path, prompts[2], held)
    assert outs[2].token_ids == want and len(want) > 5
    # without min_tokens the first token is a stop token: the check above is not vacuous
    assert llm.generate(prompts[2], dataclasses.replace(held, min_tokens=0))[0].token_ids == [solo[2][0]]
    sync = LLM(path, warmup=False, async_scheduling=False, **ENGINE_KW, **SMALL_GRID)
    assert [o.token_ids for o in sync.generate(prompts, [biased, plain, held])] == [o.token_ids for o in outs]


def test_min_tokens_holds_back_eos_and_stop_strings():
    """The demo model counts and ends with EOS; min_tokens makes it go on past its EOS, and a
    stop string in the first min_tokens tokens is not looked for (vLLM's semantics)."""
    llm = LLM(warmup=False, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64, decode_batch_buckets=(4,),
              prefill_token_buckets=(64,), block_buckets=(8, 24))     # a few small programs
    prompt = "count from 3 to 12:"
    base = SamplingParams(max_tokens=30, temperature=0)
    plain = llm.generate(prompt, base)[0]
    assert plain.finish_reason == "stop" and len(plain.token_ids) == 11       # " 3" .. " 12", EOS
    longer = llm.generate(prompt, dataclasses.replace(base, min_tokens=14))[0]
    eos = min(llm.engine.eos_ids)
    assert len(longer.token_ids) >= 14 and eos not in longer.token_ids[:14]
    assert longer.token_ids[:10] == plain.token_ids[:10]
    cut = llm.generate(prompt, dataclasses.replace(base, stop=["5"]))[0]
    assert cut.text == " 3 4 "
    late = llm.generate(prompt, dataclasses.replace(base, stop=["5"], min_tokens=4))[0]
    assert late.text == plain.text                        # " 5" was the 3rd token, below min_tokens
    # the boundary, as vLLM's detokenizer draws it: stop strings are looked for only in tokens
    # past the first min_tokens (the 3rd token's " 5" ended the request with min_tokens=3)
    at = llm.generate([prompt] * 2, [dataclasses.replace(base, stop=["5"], min_tokens=k) for k in (2, 3)])
    assert [o.text for o in at] == [" 3 4 ", plain.text]
