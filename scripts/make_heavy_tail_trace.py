"""Writes a synthetic trace with heavy-tailed output lengths (see workload.heavy_tailed_trace):
prompts resampled from a real trace, outputs bounded-Pareto with the same mean, no arrival
times (give the simulator --rate or --load).

    python scripts/make_heavy_tail_trace.py ../shared/traces/azure_conv_2023.csv out/heavy_tail.csv
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fastserve_jax.workload import heavy_tailed_trace, load_trace, save_trace  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts_from", help="trace CSV whose prompt lengths are resampled")
    ap.add_argument("out", help="CSV to write")
    ap.add_argument("-n", type=int, default=20_000)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lo", type=int, default=22)
    ap.add_argument("--hi", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    base, _ = load_trace(a.prompts_from)
    tr = heavy_tailed_trace(base, a.n, a.alpha, a.lo, a.hi, a.seed)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    save_trace(a.out, tr, timed=False)     # it wrote arrived_at 0 for all: one burst where --rate was forgotten
    print(f"wrote {len(tr)} requests to {a.out}")
