"""Part of scripts/device_check.py: the engine's bf16 outputs scored by transformers on the same
device (tests/test_engine_parity.py scores the CPU's the same way).

A random-weight Llama-3-style checkpoint is written to a temporary directory and served by our
engine on each attention backend in bf16: greedy, with each chosen token's logprob, prompts
longer than one prefill launch (a chunked prefill) beside short ones. transformers then
reads the same checkpoint in bf16 and scores each engine's sequences teacher-forced: every
token the engine chose must be transformers' argmax or within BF16_TIE nats of it, and the
engine's logprob must agree with transformers' within BF16_LOGPROB nats. That holds across
near-ties, where comparing greedy tokens alone would fail on rounding. Beside it, fp32
transformers gives the exact answer: the engine's bf16 logprobs should be about as far from it
as transformers' own bf16 are (vs_fp32 against hf_bf16_vs_fp32), a yardstick that holds at any
logit scale, where the fixed limits hold only for small logits.
"""

from __future__ import annotations

import json
import os
import tempfile

# the bf16 tolerances (nats) of tests/test_engine_parity.py and docs/attention.md
BF16_TIE, BF16_LOGPROB = 0.1, 0.05


def scored(hf_model, prompts: list[list[int]], outs, device: str = "cpu") -> list:
    """Per output, the log-softmax rows (fp32) transformers' `hf_model` gives at each of its
    tokens, teacher-forced on the prompt and the engine's tokens before it."""
    import torch

    rows = []
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logits = hf_model(torch.tensor([p + o.token_ids], device=device)).logits[0].float()
        rows.append(torch.log_softmax(logits, -1)[len(p) - 1:-1])   # the distribution each new token came from
    return rows


def worst_gaps(outs, rows: list) -> tuple[float, float]:
    """(worst tie, worst logprob gap) in nats of the engine's greedy outputs `outs` (RequestOutputs
    with logprobs) against transformers' log-softmax `rows` (scored) at their tokens."""
    worst_tie = worst_lp = 0.0
    for o, lp in zip(outs, rows):
        for i, (tok, got) in enumerate(zip(o.token_ids, o.logprobs)):
            worst_tie = max(worst_tie, float(lp[i].max() - lp[i, tok]))
            worst_lp = max(worst_lp, abs(got.logprob - float(lp[i, tok])))
    return worst_tie, worst_lp


def teacher_forced(hf_model, prompts: list[list[int]], outs, device: str = "cpu") -> tuple[float, float]:
    """worst_gaps of `outs` for `prompts` against the transformers model `hf_model`."""
    return worst_gaps(outs, scored(hf_model, prompts, outs, device))


def rounding_yardstick(hf_bf16, hf_fp32, prompts, outs, device: str) -> tuple[float, float]:
    """(the engine's worst logprob gap to fp32 transformers, transformers bf16's own on the same
    tokens): bf16 is right when the first is not far above the second, at any logit scale."""
    import torch

    exact = scored(hf_fp32, prompts, outs, device)
    theirs = 0.0
    for o, a, b in zip(outs, scored(hf_bf16, prompts, outs, device), exact):
        at = torch.tensor(o.token_ids, device=a.device)[:, None]          # the engine's tokens
        theirs = max(theirs, float((a.gather(-1, at) - b.gather(-1, at)).abs().max()))
    return worst_gaps(outs, exact)[1], theirs


def bf16_parity(backends: list[str], shapes: dict, device: str, new_tokens: int = 16, seed: int = 0) -> dict:
    """Per backend {worst_tie, worst_logprob, ok, tokens} (or an error), and the checkpoint's shape."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fastserve_jax import LLM, SamplingParams
    from fastserve_jax.models.random_checkpoint import make_random_checkpoint

    os.environ.setdefault("FASTSERVE_JAX_LENGTHS_DIR", "off")
    out: dict = dict(shape=dict(shapes), tolerances=dict(tie=BF16_TIE, logprob=BF16_LOGPROB))
    shapes = dict(shapes)
    std = shapes.pop("init_std")
    budget = 64                                     # tokens per prefill launch: the long prompts take several
    sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(tmp, "llama3", dtype="bfloat16", init_std=std, **shapes)
        with open(os.path.join(path, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        rng = np.random.default_rng(seed)
        prompts = [[int(t) for t in rng.integers(3, vocab, n)] for n in (5, 40, 3 * budget + 7, 100)]
        for b in backends:
            try:
                # fcfs: no cost profile to time first (skip-join's would, on every backend)
                llm = LLM(path, dtype="bfloat16", attention_backend=b, warmup=False, max_num_seqs=4, block_size=16,
                          max_num_batched_tokens=budget, max_model_len=512, scheduler="fcfs")
                out[b] = dict(outs=llm.generate(prompts, sp))
                del llm
            except Exception as e:                  # reported in its place; the other backend still runs
                out[b] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        exact = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        for b in backends:
            if "outs" in out[b]:
                outs = out[b].pop("outs")
                tie, lp = teacher_forced(hf, prompts, outs, device)
                ours, theirs = rounding_yardstick(hf, exact, prompts, outs, device)
                out[b].update(worst_tie=tie, worst_logprob=lp, ok=tie <= BF16_TIE and lp <= BF16_LOGPROB,
                              vs_fp32=ours, hf_bf16_vs_fp32=theirs, tokens=[list(o.token_ids) for o in outs])
        del hf, exact
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
