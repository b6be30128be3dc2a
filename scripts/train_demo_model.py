"""Build the bundled demo model (models/demo/): tokenizer, a small Llama trained to count.

    python scripts/train_demo_model.py            # tokenizer + training + eval + save (CPU, minutes)
    python scripts/train_demo_model.py --tokenizer-only

The task (models/demo_task.py): `count from A to B:` -> ` A A+1 ... B` + EOS, 0 <= A <= B <= 999.

Tokenizer: byte-level BPE built by hand (no training): 4 special tokens, the 256 byte
tokens, then merges that make ` 0` ... ` 999` (no leading zeros), `count`, ` from`, ` to`
single tokens. Any text encodes (every byte has a token); decoding is exact.

Model: our Linen Llama (models.llama) trained from scratch with AdamW on packed rows of
synthetic examples, loss on answer tokens and EOS only. Evaluation: greedy exact match on
held-out pairs via one teacher-forced forward (models.demo_task.teacher_forced_exact).
Everything is seeded; the same command gives the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# One module per role, next to this script (scripts/ is on sys.path when it runs).
from demo_eval import final_eval  # noqa: E402
from demo_report import write_training_md  # noqa: E402
from demo_tokenizer import build_tokenizer, verify_tokenizer  # noqa: E402
from demo_train import model_config_dict, train  # noqa: E402
from fastserve_jax.models import demo_task  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "models", "demo"))
    p.add_argument("--tokenizer-only", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--mlp", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--buckets", default="256:32,1024:8", help="row_len:rows per training batch shape")
    p.add_argument("--max-span", type=int, default=demo_task.MAX_SPAN)
    p.add_argument("--first-weight", type=float, default=10.0, help="loss weight of the first answer token")
    p.add_argument("--eos-weight", type=float, default=10.0, help="loss weight of the EOS position")
    p.add_argument("--weight-anneal", type=float, default=0.7,
                   help="fraction of training over which the two weights above fall linearly to 1")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--digit-init", type=float, default=1.0, help="strength of the digit code in the "
                   "initial number embeddings (0: plain random init)")
    p.add_argument("--mix", default="31:0.55,255:0.3,999:0.15",
                   help="training mixture: max_span:weight, each drawn from demo_task.sample_pair(max_span)")
    p.add_argument("--no-bos", type=float, default=0.2, help="fraction of training prompts without BOS")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--monitor", type=int, default=200, help="held-out pairs checked during training")
    p.add_argument("--eval-n", type=int, default=1000, help="held-out pairs in the final evaluation")
    p.add_argument("--save-npz", default=None, help="also save the Linen params here (debugging)")
    a = p.parse_args(argv)
    if not 0 <= a.warmup < a.steps:     # optax's schedule raised a traceback (decay_steps < 0)
        p.error(f"--warmup ({a.warmup}) must be at least 0 and less than --steps ({a.steps})")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    tok = build_tokenizer(args.out)
    verify_tokenizer(tok)
    print(f"tokenizer: {len(tok)} tokens, bos={tok.bos_token_id} eos={tok.eos_token_id} pad={tok.pad_token_id}")
    if args.tokenizer_only:
        return
    cfg_dict = model_config_dict(len(tok), args)
    module, params, n_params, train_s, tokens_seen = train(args, tok, cfg_dict)
    print(f"trained {args.steps} steps, {tokens_seen:,} tokens in {train_s:.0f}s")
    if args.save_npz:
        import jax
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(args.save_npz, **flat)
        with open(args.save_npz + ".json", "w") as f:
            json.dump(cfg_dict, f, indent=2)
    save_artifacts(args.out, cfg_dict, params, tok)
    results = final_eval(args, tok)
    write_training_md(args, argv, cfg_dict, n_params, train_s, tokens_seen, results)


def save_artifacts(out_dir: str, cfg_dict: dict, params: dict, tok) -> None:
    """config.json + model.safetensors (models.loader), generation_config.json; the
    tokenizer files are already there (build_tokenizer)."""
    from fastserve_jax.models.loader import save_hf_checkpoint

    save_hf_checkpoint(cfg_dict, params, out_dir)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id, "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
