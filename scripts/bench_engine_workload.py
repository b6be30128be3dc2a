"""The workload of scripts/bench_engine.py: trace rows drawn and scaled into requests, length
statistics, the random-weight checkpoint, and greedy agreement between two runs' tokens."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TRACE = os.path.join(REPO, "fastserve_jax", "traces", "azure_conv_2023.csv")   # shipped with the package
VOCAB_LO = 3                     # prompt ids are drawn from [VOCAB_LO, vocab): skips pad/bos/eos
ARCH = "llama-125m"


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    out_lens: list[int]
    trace_rows: list[int]
    raw_prompt_lens: list[int]
    raw_out_lens: list[int]
    how: str

    @property
    def num_output_tokens(self) -> int:
        return sum(self.out_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def load_workload(path: str, n: int, scale: float, prompt_clip: tuple[int, int], out_clip: tuple[int, int],
                  vocab: int, seed: int) -> Workload:
    """n trace rows drawn without replacement (seeded), kept in arrival order; lengths scaled."""
    with open(path, newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(rows), size=n, replace=False).tolist())
    raw_p = [rows[i][0] for i in idx]
    raw_d = [rows[i][1] for i in idx]
    p_len = [int(np.clip(round(p / scale), *prompt_clip)) for p in raw_p]
    d_len = [int(np.clip(round(d / scale), *out_clip)) for d in raw_d]
    prompts = [rng.integers(VOCAB_LO, vocab, size=k).tolist() for k in p_len]
    how = (f"{n} of {len(rows)} trace rows (numpy seed {seed}, without replacement, arrival order; all submitted "
           f"at t=0); prompt = clip(round(num_prefill_tokens / {scale:g}), {prompt_clip[0]}, {prompt_clip[1]}), "
           f"output = clip(round(num_decode_tokens / {scale:g}), {out_clip[0]}, {out_clip[1]}); "
           f"prompt ids uniform in [{VOCAB_LO}, {vocab})")
    return Workload(prompts, d_len, idx, raw_p, raw_d, how)


def length_stats(xs: list[int]) -> dict:
    a = np.asarray(xs)
    return dict(sum=int(a.sum()), mean=float(a.mean()), p50=float(np.median(a)), p90=float(np.percentile(a, 90)),
                min=int(a.min()), max=int(a.max()))


def fmt_stats(s: dict) -> str:
    return (f"sum {s['sum']:6d}  mean {s['mean']:6.1f}  p50 {s['p50']:5.0f}  p90 {s['p90']:5.0f}  "
            f"min {s['min']:4d}  max {s['max']:4d}")


def ensure_checkpoint(work_dir: str) -> str:
    path = os.path.join(work_dir, ARCH)
    if not os.path.isfile(os.path.join(path, "config.json")):
        from fastserve_jax.models.random_checkpoint import make_random_checkpoint

        print(f"building random checkpoint {ARCH} in {path} ...", flush=True)
        os.makedirs(work_dir, exist_ok=True)
        make_random_checkpoint(path, ARCH, seed=0)
    return path


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical requests, and tokens agreeing before each request's first divergence."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
    total = sum(len(x) for x in a)
    return dict(identical_requests=same, requests=len(a), prefix_tokens=prefix, tokens=total)
