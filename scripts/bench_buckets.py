"""What the block dimension of the launch grid buys: decode step time at every (rows, blocks)
bucket, next to the buckets EngineConfig.launch_kv_fraction drops for the model.

For each model and decode row count it times the compiled step at each block bucket and
prints, side by side from one run:

    blocks      step time per block bucket (ms; "-" marks a bucket that launch_kv_fraction's
                accelerator default, 1/8, would not compile; on CPU every bucket is compiled)
    pad cost    how much slower a dropped bucket's launches run, padded to the rule's floor
                (worst over the dropped buckets)
    no dim      how much slower the smallest bucket's launches run if the block dimension were
                dropped altogether (every decode padded to max_model_len)

    python scripts/bench_buckets.py                 # the demo model and a random llama-125m
    python scripts/bench_buckets.py --models demo --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastserve_jax import LLM  # noqa: E402
from fastserve_jax.runner import compiler as C  # noqa: E402
from fastserve_jax.runner.keys import DecodeKey  # noqa: E402

ACCELERATOR_FRACTION = 0.125     # EngineConfig.launch_kv_fraction's default off CPU


def _concrete(key: DecodeKey, runner, rng: np.random.Generator):
    st = runner.stages[0]
    x, batch, idx = C.abstract_launch_args(runner.builder, key, st, runner.model_cfg.hidden_size, runner.act_dtype)
    n = runner.num_blocks
    ids = rng.integers(1, n, size=batch.block_ids.shape).astype(np.int32)
    r, nb = ids.shape
    bs = runner.cfg.block_size
    pos = np.full((r, 1), nb * bs - 1, np.int32)           # every row at the end of its blocks
    arrays = batch._replace(positions=pos, seg=np.zeros((r, 1), np.int32),
                            slots=(ids[:, -1:] * bs + bs - 1).astype(np.int32), block_ids=ids,
                            block_seg=np.zeros((r, nb), np.int32),
                            block_pos=np.tile(np.arange(nb, dtype=np.int32) * bs, (r, 1)))
    return jnp.zeros(x.shape, x.dtype), jax.tree.map(jnp.asarray, arrays), jnp.arange(idx.shape[0], dtype=jnp.int32)


def step_ms(runner, key: DecodeKey, repeats: int, rng) -> float:
    st = runner.stages[0]
    fn = runner.executable(key)
    x, batch, idx = _concrete(key, runner, rng)
    times = []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        out, st.cache = fn(st.params, st.cache, x, batch, idx)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def bench_model(name: str, path: str | None, rows: list[int], repeats: int, max_num_seqs: int) -> None:
    llm = LLM(path, max_num_seqs=max_num_seqs, launch_kv_fraction=0.0)   # compile what we time, lazily
    runner = llm.engine.runner
    kept = set(_rule_keys(llm))                          # what the accelerator default keeps
    cfg = runner.cfg
    blocks = [b for b in cfg.block_buckets if b <= runner.builder.decode_top]
    rng = np.random.default_rng(0)
    print(f"\n{name}: {sum(x.nbytes for x in jax.tree.leaves(runner.stages[0].params)) / 1e6:.1f} MB of weights, "
          f"{runner.stages[0].cache.k.nbytes * 2 // runner.num_blocks / 1e3:.1f} KB per KV block, "
          f"launch_kv_fraction {ACCELERATOR_FRACTION} (the GPU/TPU default) keeps {sum(1 for k in kept if isinstance(k, DecodeKey))} of {len(cfg.decode_batch_buckets) * len(blocks)} "
          "decode shapes")
    print(f"{'rows':>5} | " + " ".join(f"{b:>7}" for b in blocks) + " | pad cost | no dim")
    for r in rows:
        t = {b: step_ms(runner, DecodeKey(r, b), repeats, rng) for b in blocks}
        floor = min(b for b in blocks if DecodeKey(r, b) in kept)
        dropped = [b for b in blocks if b < floor]
        pad = max((t[floor] / t[b] - 1 for b in dropped), default=0.0)
        cells = " ".join(f"{t[b]:7.2f}" if DecodeKey(r, b) in kept else f"{'-' + format(t[b], '.2f'):>7}" for b in blocks)
        print(f"{r:>5} | {cells} | {pad:+8.0%} | {t[blocks[-1]] / t[blocks[0]] - 1:+6.0%}")


def _rule_keys(llm) -> list:
    from fastserve_jax.kv_sizing import kv_block_bytes
    from fastserve_jax.runner.launch import LaunchBuilder
    eng = llm.engine
    cfg = dataclasses.replace(eng.cfg, launch_kv_fraction=ACCELERATOR_FRACTION, min_launch_blocks=0,
                              block_buckets=())
    weights = sum(x.nbytes for st in eng.runner.stages for x in jax.tree.leaves(st.params))
    return LaunchBuilder(cfg.resolve(weights, kv_block_bytes(eng.model_cfg, cfg))).launch_keys()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "llama-125m"], choices=["demo", "llama-125m"])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    for name in args.models:
        if name == "demo":
            bench_model("demo model", None, [1, 2, 4, 8, 16, 32], args.repeats, 32)
        else:
            from fastserve_jax.models.random_checkpoint import make_random_checkpoint
            with tempfile.TemporaryDirectory() as d:
                path = make_random_checkpoint(os.path.join(d, "m"), "llama-125m")
                bench_model("random llama-125m (float32)", path, [1, 4, 16], args.repeats, 16)


if __name__ == "__main__":
    main()
