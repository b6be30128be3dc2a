"""Host time of the penalties' arrays per decode step (runner/launch.py penalty_arrays), every
row penalized (repetition and presence penalties), prompts of 1-4k tokens, side by side:

- "made anew": each row's history built from its whole output, as every step did until
  Request.penalty_history kept it between steps (forced here by handing each request a new
  output list, which that method treats as a change);
- "grown": one token appended to each row's output between calls, the engine's steady state.

    python scripts/bench_penalty_history.py [--rows 8 32 64] [--max-model-len 8192 32768]

Each figure is the median of --repeats calls, milliseconds; "array MiB" is the history array's
size, sent to the device with every penalized launch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from fastserve_jax.config import SamplingParams  # noqa: E402
from fastserve_jax.request import Request  # noqa: E402
from fastserve_jax.runner.launch import penalty_arrays  # noqa: E402


def requests(rows: int, out: int, vocab: int = 32_000) -> list[Request]:
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_tokens=out + 1_000, repetition_penalty=1.1, presence_penalty=0.5)
    reqs = []
    for i in range(rows):
        r = Request(f"r{i}", rng.integers(0, vocab, int(rng.integers(1_000, 4_001))).tolist(), sp, 0.0)
        r.output_token_ids = rng.integers(0, vocab, out).tolist()
        reqs.append(r)
    return reqs


def median_ms(reqs: list[Request], max_model_len: int, repeats: int, anew: bool) -> float:
    penalty_arrays(reqs, max_model_len)          # the prompts' distinct tokens, made once either way
    times = []
    for k in range(repeats):
        for r in reqs:
            if anew:
                r.output_token_ids = list(r.output_token_ids)
            else:
                r.output_token_ids.append(k)
        t = time.perf_counter()
        penalty_arrays(reqs, max_model_len)
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--max-model-len", type=int, nargs="+", default=[8_192, 32_768])
    ap.add_argument("--outputs", type=int, nargs="+", default=[100, 1_000, 4_000])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"median of {args.repeats} calls, ms per call")
    print(f"{'max_len':>7} {'rows':>4} {'output':>6} {'array MiB':>9} {'made anew':>9} {'grown':>6}")
    for mml in args.max_model_len:
        for n in args.rows:
            for out in args.outputs:
                reqs = requests(n, out)
                cells = [median_ms(reqs, mml, args.repeats, anew) for anew in (True, False)]
                print(f"{mml:>7} {n:>4} {out:>6} {n * mml * 4 / 2**20:>9.1f} {cells[0]:>9.2f} {cells[1]:>6.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
