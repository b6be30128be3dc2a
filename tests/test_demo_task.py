"""The bundled demo model (models/demo/): its task helpers, tokenizer and trained weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fastserve_jax.models import demo_model_path, demo_task
from fastserve_jax.models.demo_task import (MAX_SPAN, ExampleEncoder, answer_num_tokens, check_answer, expected_answer,
                              held_out_pairs, make_prompt, pair_for_output_len, parse_prompt, sample_pairs)

DEMO = demo_model_path()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(DEMO)


# ----------------------------------------------------------------------------- text helpers

def test_prompt_and_answer_text():
    assert make_prompt(7, 10) == "count from 7 to 10:"
    assert expected_answer(7, 10) == " 7 8 9 10"
    assert expected_answer(5, 5) == " 5"
    assert check_answer(7, 10, " 7 8 9 10")
    assert not check_answer(7, 10, " 7 8 9 10 11")
    assert not check_answer(7, 10, " 7 8 9")
    assert not check_answer(7, 10, "7 8 9 10")
    assert parse_prompt("count from 7 to 10:") == (7, 10)
    for bad in ["count from 10 to 7:", "count from 07 to 10:", "count from 7 to 1000:", "count from 7 to 10", ""]:
        assert parse_prompt(bad) is None, bad
    for a, b in [(-1, 3), (5, 4), (0, 1000)]:
        with pytest.raises(ValueError, match="0 <= A <= B <= 999"):
            make_prompt(a, b)


def test_held_out_pairs_are_prefix_stable_distinct_and_valid():
    pairs = held_out_pairs(500)
    assert pairs[:100] == held_out_pairs(100)
    assert len(set(pairs)) == len(pairs)
    assert all(0 <= a <= b <= 999 and b - a <= MAX_SPAN for a, b in pairs)
    spans = np.asarray([b - a for a, b in pairs])
    assert spans.min() == 0 and spans.max() > 511  # short, long and A == B all covered


def test_sample_pairs_excludes_and_is_seeded():
    excl = set(held_out_pairs(demo_task.NUM_HELD_OUT))
    a = sample_pairs(2000, np.random.default_rng(3), exclude=excl)
    assert a == sample_pairs(2000, np.random.default_rng(3), exclude=excl)
    assert not excl & set(a)
    assert all(b - a <= 10 for a, b in sample_pairs(200, np.random.default_rng(0), max_span=10))


@pytest.mark.parametrize("n", [1, 2, 3, 100, 210, 600, MAX_SPAN + 2, 5000])
def test_pair_for_output_len(n):
    rng = np.random.default_rng(n)
    for _ in range(20):
        a, b = pair_for_output_len(n, rng)
        assert 0 <= a <= b <= 999
        assert answer_num_tokens(a, b) == min(max(n, 2), MAX_SPAN + 2)


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_special_tokens_and_single_number_tokens(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    ids = demo_task.number_token_ids(tok)  # raises unless every " N" is one token
    assert len(set(ids.tolist())) == 1000
    for w in ["count", " from", " to", ":"]:
        assert len(tok.encode(w, add_special_tokens=False)) == 1, w
    prompt = tok.encode(make_prompt(123, 456))
    assert prompt[0] == tok.bos_token_id and len(prompt) == 7
    ans = tok.encode(expected_answer(97, 203), add_special_tokens=False)
    assert ans == ids[97:204].tolist()  # k numbers -> k tokens
    assert tok.decode(ans) == expected_answer(97, 203)
    # no leading zeros and no 4-digit tokens: those split
    assert len(tok.encode(" 07", add_special_tokens=False)) == 2
    assert len(tok.encode(" 1000", add_special_tokens=False)) == 2


@pytest.mark.parametrize("text", [
    "count from 7 to 10:", " 7 8 9 10", "Hello, world!\n", "  leading and trailing  ", "tabs\tand\r\nnewlines",
    "héllo wörld ñ", "日本語のテキスト", "emoji 🙂👍🏽", "\x00\x01\x7f control", "x" * 300, "1234567890 0 00 999 1000",
])
def test_tokenizer_round_trip_any_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_incremental_detokenization(tok):
    text = expected_answer(990, 999) + " — done ✓ ünïcode"
    ids = tok.encode(text, add_special_tokens=False)
    shown = ""
    for k in range(1, len(ids) + 1):
        cur = tok.decode(ids[:k])
        stable = shown.rstrip("\ufffd")  # a split multi-byte char shows as U+FFFD until complete
        assert cur.startswith(stable), (shown, cur)
        shown = cur
    assert shown == text
    # number answers decode token by token with no surprises
    nums = tok.encode(expected_answer(7, 10), add_special_tokens=False)
    assert [tok.decode(nums[:k]) for k in range(1, 5)] == [" 7", " 7 8", " 7 8 9", " 7 8 9 10"]


def test_chat_template_reproduces_prompt(tok):
    msgs = [{"role": "user", "content": "count from 3 to 5:"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "count from 3 to 5:"


# ----------------------------------------------------------------------------- model

def test_demo_config_files(tok):
    with open(os.path.join(DEMO, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["vocab_size"] == len(tok)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    assert cfg["max_position_embeddings"] >= MAX_SPAN + 2 + 7
    with open(os.path.join(DEMO, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == tok.eos_token_id
    size = sum(os.path.getsize(os.path.join(DEMO, f)) for f in os.listdir(DEMO))
    assert size < 8e6


@pytest.fixture(scope="module")
def demo_model():
    from fastserve_jax.models.loader import load_model
    return load_model(DEMO, cache_dir="")


def test_demo_model_greedy_exact_match_on_held_out(tok, demo_model):
    """Greedy decoding gives the exact answer iff every answer position's teacher-forced
    argmax (EOS included) is the target: one batched forward checks 100 held-out prompts."""
    import jax

    _, module, params = demo_model
    apply = jax.jit(lambda t, b: module.apply({"params": params}, t, b)[0])
    enc = ExampleEncoder(tok)
    pairs = held_out_pairs(100, max_span=255)   # the shipped model covers B - A <= 255 (TRAINING.md)
    ok = demo_task.teacher_forced_exact(apply, [enc.encode(a, b) for a, b in pairs])
    failed = [p for p, good in zip(pairs, ok) if not good]
    assert ok.mean() >= 0.99, f"{len(failed)} held-out prompts fail: {failed}"


def test_demo_model_runs_in_transformers(tok):
    """The checkpoint is a real HF Llama: transformers' greedy generation counts too."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    model.eval()
    prompt = tok(make_prompt(97, 103), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id
    assert check_answer(97, 103, tok.decode(new[:-1]))
