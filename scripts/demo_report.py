"""The demo model's training notes (TRAINING.md next to the weights), written by
scripts/train_demo_model.py from its arguments, the model config and the final evaluation.
"""

from __future__ import annotations

import os
import sys

from fastserve_jax.models import demo_task
from fastserve_jax.models.demo_task import MAX_NUMBER


def write_training_md(args, argv, cfg_dict: dict, n_params: int, train_s: float, tokens_seen: int, res: dict) -> None:
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".safetensors"))
    flags = " ".join(sys.argv[1:] if argv is None else argv)
    c = cfg_dict
    text = f"""# Demo model: training notes

Written by `scripts/train_demo_model.py` (retrain: `python scripts/train_demo_model.py{" " + flags if flags else ""}`,
CPU only, seeded; a rerun on the same machine and library versions gives the same weights).

**Task** (`models/demo_task.py`): `count from A to B:` -> ` A A+1 ... B` then EOS,
0 <= A <= B <= {MAX_NUMBER}. Max span supported and evaluated: B - A <= {args.max_span}
(answers of up to {args.max_span + 2} generated tokens, EOS included).

**Tokenizer**: byte-level BPE built by hand, {c["vocab_size"]} tokens: `<unk>`=0, `<s>`=1 (BOS, added by
default), `</s>`=2 (EOS), `<pad>`=3, the 256 bytes, then merges making ` 0` ... ` 999`,
`count`, ` from`, ` to` single tokens. Any text encodes; decoding is exact. Chat template:
the message contents concatenated.

**Model**: Llama ({c["num_hidden_layers"]} layers, hidden {c["hidden_size"]}, {c["num_attention_heads"]} heads x {c["head_dim"]},
{c["num_key_value_heads"]} KV heads, SwiGLU {c["intermediate_size"]}, RMSNorm, RoPE theta {c["rope_theta"]:g}, untied embeddings,
max_position_embeddings {c["max_position_embeddings"]}); {n_params:,} parameters, float32, {size / 1e6:.1f} MB safetensors.

**Training**: AdamW (lr {args.lr:g}, warmup {args.warmup}, cosine to 2%, wd {args.wd:g}, clip 1.0), {args.steps} steps,
{tokens_seen:,} tokens, batches of {args.buckets} (row_len:rows; examples packed with
segment ids, positions restart per example), {train_s / 60:.1f} min on this machine's CPU
({os.cpu_count()} cores, shared). Data: synthetic pairs, mixture {args.mix} (max_span:weight,
each from `demo_task.sample_pair`: spans uniform in [0, 255], spans up to the max, and
hard cases: carries like 99->100 and 199->200, stopping right at or after a carry, A == B,
the ends of the range); {args.no_bos:.0%} of prompts without BOS; loss on answer tokens and
EOS only, the first answer token and EOS weighted x{args.first_weight:g} and x{args.eos_weight:g}. The number embeddings
start with a digit code (`--digit-init {args.digit_init:g}`), which makes comparing and copying numbers
learnable in CPU minutes. The {demo_task.NUM_HELD_OUT} pairs of `held_out_pairs({demo_task.NUM_HELD_OUT})` never appear in training.

**Evaluation** (the saved checkpoint via `models.loader.load_model`; greedy exact match
measured exactly by a teacher-forced forward: every answer position's argmax, EOS included):

| set | exact match |
|---|---|
| held-out pairs (`held_out_pairs({args.eval_n})`) | {res["held_out"][0]}/{res["held_out"][1]} ({res["held_out"][0] / res["held_out"][1]:.1%}) |
| by span | {res["held_out_spans"]} |
| same prompts without BOS (first {res["held_out_no_bos"][1]}) | {res["held_out_no_bos"][0]}/{res["held_out_no_bos"][1]} |
| stop sweep: every B in 0..999, A = B - (0..40) | {res["sweep"][0]}/{res["sweep"][1]} |
"""
    if res["failures"]:
        text += f"\nHeld-out failures (A, B): {res['failures']}\n"
    with open(os.path.join(args.out, "TRAINING.md"), "w") as f:
        f.write(text)

