"""The models' matmuls with weights (in, out), Linen Dense's layout, against (out, in), the
layout models/linear.py stores, in one process and in interleaved rounds.

Each cell is one XLA program of a Llama's matmuls (q k v o gate up down per layer, then the
head) on M token rows, the bench_engine model's shapes by default (hidden 768, MLP 3072,
12 layers, 12 heads over 4 KV heads of 64, vocab 32000; float32). Each layout is compiled
twice: with XLA's defaults (on jaxlib 0.10 XLA:CPU hands dots to YNNPACK) and with YNNPACK's
fusions off (Eigen), since the engine once turned them off for decode launches. Medians over
the rounds, and each cell's time over the (out, in) default's.

    python scripts/bench_weight_layout.py
    python scripts/bench_weight_layout.py --rows 1 32 --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastserve_jax.models.linear import linear  # noqa: E402

YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def weights(rng, shapes, out_in: bool):
    return [jnp.asarray(rng.standard_normal((n, k) if out_in else (k, n), np.float32) * 0.02) for k, n in shapes]


def program(shapes, layers: int, out_in: bool):
    """The matmuls alone: per layer q, k, v (added into q's width), o, gate, up, down; the head."""
    mm = linear if out_in else (lambda x, w: x @ w)

    def f(x, ws):
        for i in range(layers):
            q, k, v, o, g, u, d = ws[7 * i:7 * i + 7]
            kv = mm(x, k) + mm(x, v)
            x = x + mm(mm(x, q) + jnp.tile(kv, q.shape[0 if out_in else 1] // kv.shape[-1]), o)
            x = x + mm(jax.nn.silu(mm(x, g)) * mm(x, u), d)
        return mm(x, ws[-1])
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--mlp", type=int, default=3072)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    h, q, kv = a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, a.mlp), (h, a.mlp), (a.mlp, h)] * a.layers + [(h, a.vocab)]
    rng = np.random.default_rng(0)
    ws = {lay: weights(np.random.default_rng(0), shapes, lay == "(out, in)") for lay in ("(in, out)", "(out, in)")}
    cells = {}
    for m in a.rows:
        x = jnp.asarray(rng.standard_normal((m, h), np.float32))
        for lay, w in ws.items():
            fn = jax.jit(program(shapes, a.layers, lay == "(out, in)"))
            for opts_name, opts in (("XLA defaults", None), ("YNNPACK off", YNN_OFF)):
                exe = fn.lower(x, w).compile(compiler_options=opts)
                exe(x, w).block_until_ready()
                cells[(m, lay, opts_name)] = (exe, x, w, [])
    for _ in range(a.rounds):
        for exe, x, w, times in cells.values():
            t = time.perf_counter()
            exe(x, w).block_until_ready()
            times.append(time.perf_counter() - t)
    print(f"matmuls of a {a.layers}-layer Llama (hidden {h}, MLP {a.mlp}, vocab {a.vocab}), float32; jax "
          f"{jax.__version__}, jaxlib {importlib.metadata.version('jaxlib')} on {jax.devices()[0].platform}; "
          f"medians of {a.rounds} interleaved rounds, ms (x the (out, in) default's time)")
    cols = [(lay, o) for lay in ws for o in ("XLA defaults", "YNNPACK off")]
    print(f"{'rows':>6} " + " ".join(f"{lay + ', ' + o:>26}" for lay, o in cols))
    for m in a.rows:
        med = {c: statistics.median(cells[(m,) + c][3]) for c in cols}
        base = med[("(out, in)", "XLA defaults")]
        print(f"{m:>6} " + " ".join(f"{1e3 * med[c]:>17.1f} ({med[c] / base:.2f}x)" for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
