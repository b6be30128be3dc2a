"""vLLM's bad_words (fastserve_jax/bad_words.py): tokenized as vLLM does, matched against the
output only, banned through the sampler's logit-bias slots, refused where the slots could
overflow. The demo model's greedy counting under them runs in test_protocol_fields.py (through
the server, async scheduling on) and, against the synchronous engine, in the slow test here."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fastserve_jax import SamplingParams
from fastserve_jax.admission import check_bad_words
from fastserve_jax.bad_words import MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS, BadWords, tokenize_bad_words
from fastserve_jax.request import Request
from fastserve_jax.runner.launch import penalty_arrays
from fastserve_jax.sampling_params import BIAS_SLOTS


@pytest.fixture(scope="module")
def demo_tok():
    from fastserve_jax.models import demo_model_path
    from fastserve_jax.models.tokenizer import load_tokenizer
    return load_tokenizer(demo_model_path())


class CharTokenizer:
    """One token per character, its code point; "" encodes to nothing."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_words_tokenize_as_vllm_does(demo_tok):
    enc = {w: tuple(demo_tok.encode(w, add_special_tokens=False)) for w in ("7", " 7", "7 8", " 7 8", "12", " 12")}
    # the word and, where it is as long and starts elsewhere, the word after a space
    assert tokenize_bad_words([" 7"], demo_tok) == tokenize_bad_words(["  7"], demo_tok) == [enc["7"], enc[" 7"]]
    assert tokenize_bad_words(["7 8"], demo_tok) == [enc["7 8"], enc[" 7 8"]]
    # "12" is two tokens, " 12" one: vLLM keeps only the first (the lengths differ)
    assert len(enc["12"]) == 2 and len(enc[" 12"]) == 1
    assert tokenize_bad_words(["12"], demo_tok) == [enc["12"]]
    # a word is refused when it encodes to nothing, or past vLLM's limits
    with pytest.raises(ValueError, match="must tokenize to at least one token"):
        tokenize_bad_words(["x"], type("Empty", (), {"encode": lambda self, t, add_special_tokens: []})())
    with pytest.raises(ValueError, match=f"at most {MAX_BAD_WORDS} are allowed"):
        tokenize_bad_words([chr(200 + i) for i in range(MAX_BAD_WORDS + 1)], CharTokenizer())
    with pytest.raises(ValueError, match=f"at most {MAX_BAD_WORD_TOKENS} are allowed"):
        tokenize_bad_words(["a" * (MAX_BAD_WORD_TOKENS + 1)], CharTokenizer())


def test_prefix_matching():
    bw = BadWords.of([(5,), (1, 2, 3), (2, 4), (7, 2, 9)])
    assert bw.bans([]) == bw.bans([1]) == bw.bans([2, 1]) == {5}
    assert bw.bans([1, 2]) == {5, 3, 4}                   # (1, 2) and (2,) end the output
    assert bw.bans([7, 2]) == {5, 9, 4}
    assert bw.bans([8, 1, 2, 6]) == {5}
    assert bw.max_bans == 3 and bw.tokens == {3, 4, 5, 9}
    # async scheduling: may the bans after `unknown` tokens not on the host yet depend on them?
    three = BadWords.of([(5,), (1, 2, 3)])
    assert not three.needs_history([], 1)                 # the prefix needs 2 output tokens
    assert three.needs_history([1], 1) and not three.needs_history([4], 1)
    assert three.needs_history([4], 2)                    # both of its tokens may be the unknown ones
    assert not BadWords.of([(5,), (6,)]).needs_history([1, 2], 2)
    assert BadWords.of([(2, 4)]).needs_history([], 1)


def _req(prompt, output, sp, bad, pending=0):
    r = Request("r", prompt, sp, 0.0, bad_words=bad, output_token_ids=list(output))
    r.pending_tokens = pending
    return r


def _row_bias(r, max_model_len=32) -> dict[int, float]:
    p = penalty_arrays([None, r], max_model_len)
    ids, bias = p.bias_ids[1], p.bias[1]
    return {int(t): float(b) for t, b in zip(ids, bias) if t >= 0}


def test_bans_ride_in_the_bias_slots():
    sp = SamplingParams(bad_words=["x"], logit_bias={3: 5.0, 8: -2.0})
    assert sp.penalized and SamplingParams(bad_words=[]).bad_words is None
    bad = BadWords.of([(5,), (1, 2, 3)])
    assert _row_bias(_req([9, 9], [1, 2], sp, bad)) == {3: -np.inf, 5: -np.inf, 8: -2.0}    # the ban wins
    assert _row_bias(_req([9, 9], [0, 2], sp, bad)) == {3: 5.0, 5: -np.inf, 8: -2.0}
    # the output only: a prefix ending the prompt bans nothing (vLLM matches output tokens)
    assert _row_bias(_req([1, 2], [], sp, bad)) == {3: 5.0, 5: -np.inf, 8: -2.0}
    assert _row_bias(_req([7, 1], [2], sp, bad)) == {3: 5.0, 5: -np.inf, 8: -2.0}
    # a token in flight: only what cannot depend on it (the engine waits where a prefix may end there)
    assert _row_bias(_req([9], [1, 2], sp, bad, pending=1)) == {3: 5.0, 5: -np.inf, 8: -2.0}


@pytest.mark.parametrize("kw,message", [
    (dict(bad_words="x"), "must be a list of strings"), (dict(bad_words=[1]), "must be a list of strings"),
    (dict(bad_words=["ok", " \n"]), "a character other than whitespace"), (dict(bad_words=[""]), "other than")])
def test_sampling_params_check_bad_words(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_admission_counts_the_worst_step_against_the_slots():
    tok, singles = CharTokenizer(), [chr(1000 + i) for i in range(BIAS_SLOTS - 300 + 1)]
    bias = {i: 1.0 for i in range(300)}
    with pytest.raises(ValueError, match=f"makes {BIAS_SLOTS + 1}; the sampler biases at most {BIAS_SLOTS}"):
        check_bad_words(SamplingParams(bad_words=singles, logit_bias=bias), tok, 2000)
    assert check_bad_words(SamplingParams(bad_words=singles[1:], logit_bias=bias), tok, 2000).max_bans == 20
    # tokens logit_bias names already take no other slot; min_tokens' EOS and stop ids do
    overlap = {**dict(list(bias.items())[1:]), ord(singles[0]): 1.0}     # 300 entries, one a bad word's
    assert check_bad_words(SamplingParams(bad_words=singles, logit_bias=overlap), tok, 2000)
    with pytest.raises(ValueError, match="makes 321"):
        check_bad_words(SamplingParams(bad_words=singles[1:], logit_bias=bias, min_tokens=1), tok, 2000,
                        frozenset({1999}))
    # words of several tokens: at one step at most one prefix of each length ends the output
    words = ["a" + chr(1000 + i) for i in range(60)] + ["b" + chr(1100 + i) for i in range(60)]
    assert check_bad_words(SamplingParams(bad_words=words), tok, 2000).max_bans == 60
    with pytest.raises(ValueError, match=r"outside this model's vocabulary \[0, 1000\): \[1000"):
        check_bad_words(SamplingParams(bad_words=singles), tok, 1000)


@pytest.mark.slow
def test_async_scheduling_bans_exactly_what_the_synchronous_engine_does():
    """The demo model's counts under words of one, two and four tokens, greedy and seeded: the
    same tokens with async scheduling as without (a row whose bans may depend on a token in
    flight waits for it on the host), and no banned sequence in any of them."""
    from fastserve_jax import LLM
    from fastserve_jax.models import demo_task

    pairs = [(3, 12), (40, 60), (95, 130), (7, 30)]
    words = [[" 7"], ["8 9"], ["45 46"], ["4 5 6 7", "100"], ["7 8", " 50", "11 12 13"]]
    params = [SamplingParams(max_tokens=30, temperature=t, seed=s, bad_words=w)
              for w in words for t, s in ((0, None), (0.7, 5))]
    prompts = [demo_task.make_prompt(*pairs[i % len(pairs)]) for i in range(len(params))]
    runs = {}
    for a in (False, True):
        llm = LLM(None, warmup=False, max_model_len=128, max_num_seqs=8, async_scheduling=a)
        runs[a] = [o.token_ids for o in llm.generate(prompts, params)]
    assert runs[True] == runs[False]
    tok = llm.engine.tokenizer
    for ids, sp in zip(runs[True], params):
        for seq in tokenize_bad_words(sp.bad_words, tok):
            assert not any(tuple(ids[i:i + len(seq)]) == seq for i in range(len(ids))), (sp.bad_words, ids)


def test_allowed_token_ids_take_the_slots_and_mark_the_row_exclusive():
    """vLLM's allowed_token_ids ride in the same slots: exactly the allowed tokens, each with its
    logit_bias or ban, and the row marked exclusive (the sampler masks every other token), so
    logit_bias entries and bans outside them take no slot and cannot overflow."""
    sp = SamplingParams(allowed_token_ids=[5, 3, 3, 9], logit_bias={3: 5.0, 8: -2.0}, bad_words=["x"])
    assert sp.allowed_token_ids == [3, 5, 9] and sp.penalized
    r = _req([9, 9], [1, 2], sp, BadWords.of([(5,), (2, 8)]))
    assert _row_bias(r) == {3: 5.0, 5: -np.inf, 9: 0.0}            # 8's ban and bias: masked anyway
    assert penalty_arrays([None, r, _req([1], [], SamplingParams(logit_bias={1: 1.0}), None)], 32).exclusive.tolist() \
        == [False, True, False]
    tok, singles = CharTokenizer(), [chr(1000 + i) for i in range(BIAS_SLOTS - 300 + 1)]
    sp = SamplingParams(bad_words=singles, logit_bias={i: 1.0 for i in range(300)})
    with pytest.raises(ValueError, match="makes 321"):
        check_bad_words(sp, tok, 2000)
    check_bad_words(dataclasses.replace(sp, allowed_token_ids=[1]), tok, 2000)    # the slots hold [1] only


@pytest.mark.parametrize("ids,message", [
    ([], "non-empty list"), ([1, -1], "non-empty list"), ([True], "non-empty list"), ("12", "non-empty list"),
    (list(range(BIAS_SLOTS + 1)), f"at most {BIAS_SLOTS} distinct tokens")])
def test_sampling_params_check_allowed_token_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(allowed_token_ids=ids)
    assert SamplingParams(allowed_token_ids=[0] * (BIAS_SLOTS + 1)).allowed_token_ids == [0]     # distinct ones count
