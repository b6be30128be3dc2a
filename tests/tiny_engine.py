"""What the engine tests share (test_engine.py, test_engine_parity.py): the tiny engine's
settings, random prompts, and transformers' greedy decoding and prompt logprobs as the references.

Every engine here uses the small bucket grid (engine_grids.py): a lazily warmed engine then
meets fewer distinct launch shapes, so it compiles less, and engines of the same model and
pool size share their executables through the session's compilation cache.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastserve_jax import SamplingParams
from engine_grids import SMALL_GRID

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
ENGINE_KW = dict(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, block_size=8, num_device_blocks=160,
                 scheduler="fcfs", **SMALL_GRID)


def random_prompts(n, lo, hi, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, rng.integers(lo, hi + 1))] for _ in range(n)]


def hf_greedy(path, prompts, n, **generate_kw):
    """transformers' greedy continuation of each prompt, `n` tokens, EOS ignored; generate_kw
    go to generate (repetition_penalty=1.3)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None   # like ignore_eos (min_new_tokens would mask EOS instead)
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                               pad_token_id=0, **generate_kw)
            out.append(g[0, len(p):].tolist())
    return out


def hf_prompt_logprobs(path, prompts):
    """Per prompt, transformers' log-softmax over the vocabulary at every position (L, V)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].log_softmax(-1).numpy() for p in prompts]


def check_prompt_logprobs(got, prompt, ref, k):
    """vLLM's layout: None, then per prompt token its logprob given the tokens before it and
    the k most likely tokens there, equal to the reference (L, V) log-softmax."""
    assert len(got) == len(prompt) and got[0] is None
    for i, e in enumerate(got[1:], 1):
        assert e.token_id == prompt[i] and e.logprob == pytest.approx(ref[i - 1, prompt[i]], abs=2e-4)
        best = np.sort(ref[i - 1])[::-1][:k]
        assert len(e.top) == k and sorted(e.top.values(), reverse=True) == pytest.approx(best, abs=2e-4)
        assert all(ref[i - 1, t] == pytest.approx(v, abs=2e-4) for t, v in e.top.items())
