"""The random-mode sampler alone, per call: vocabularies 32k and 128k, 1/8/32 rows, and the
filter mixes requests use (none, top_k=50, top_p=0.9, and a batch mixing those with min-p and a
deep top-k), over logits shaped like a trained model's (Gaussian, scale 3) or flat.

    python scripts/bench_sampler.py                       # this tree's sampler
    python scripts/bench_sampler.py --baseline fd2ead0    # and another commit's, in this process

The baseline's fastserve_jax/sampling.py is read with `git show` and run as it stood (its
sampling_draw.py too where it has one). Each figure is the median of --repeats timed calls
after one warm call; the greedy sampler is timed beside them as the floor.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fastserve_jax import sampling  # noqa: E402


def baseline_module(rev: str):
    """fastserve_jax/sampling.py at `rev`, imported under another name (its sampling_draw.py
    beside it, where it has one, is put in place of the package's for its import)."""
    tmp = tempfile.mkdtemp()
    names = {}
    for name in ("sampling_draw", "sampling"):
        try:
            src = subprocess.run(["git", "-C", REPO, "show", f"{rev}:fastserve_jax/{name}.py"], check=True,
                                 capture_output=True, text=True).stdout
        except subprocess.CalledProcessError:
            continue
        for dep, alias in names.items():
            src = src.replace(f"from fastserve_jax.{dep} import", f"from {alias} import")
        path = os.path.join(tmp, f"baseline_{name}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        names[name] = spec.name
    return sys.modules[names["sampling"]]


def mixes(n: int, v: int) -> dict[str, dict]:
    """Per-row parameters of each filter mix over n rows."""
    cycle = lambda *vals: np.resize(np.asarray(vals), n)
    return {
        "none": dict(),
        "top_k=50": dict(top_k=np.full(n, 50)),
        "top_p=0.9": dict(top_p=np.full(n, 0.9)),
        "mixed": dict(top_k=cycle(-1, 50, -1, 2000, -1), top_p=cycle(1.0, 1.0, 0.9, 0.95, 1.0),
                      min_p=cycle(0.0, 0.0, 0.0, 0.0, 0.05), temperature=cycle(0.7, 1.0, 1.0, 0.8, 0.0)),
    }


def arrays(mod, n: int, top_k=None, top_p=None, min_p=None, temperature=None):
    f = lambda a, default, dt: jnp.asarray(np.full(n, default) if a is None else a, dt)
    return mod.SamplingArrays(f(temperature, 1.0, jnp.float32), f(top_k, -1, jnp.int32), f(top_p, 1.0, jnp.float32),
                              f(min_p, 0.0, jnp.float32), jnp.arange(n, dtype=jnp.uint32), jnp.full(n, 3, jnp.int32))


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() after a warm call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="a git revision whose sampler is timed beside this tree's")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_000])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--scale", type=float, default=3.0, help="logits ~ N(0, scale); 0.1 is nearly flat")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    impls = {"new": sampling}
    if args.baseline:
        impls = {"old": baseline_module(args.baseline), **impls}
    fns = {name: jax.jit(mod.sample, static_argnames=("greedy", "with_logprobs")) for name, mod in impls.items()}
    print(f"backend {jax.default_backend()}, logits ~ N(0, {args.scale}), median of {args.repeats}, ms per call")
    print(f"{'vocab':>7} {'rows':>4} {'greedy':>7} " + " ".join(f"{m + ' ' + i:>16}" for m in mixes(1, 1) for i in impls))
    for v in args.vocab:
        for n in args.rows:
            logits = jax.random.normal(jax.random.key(0), (n, v)) * args.scale
            s0 = arrays(sampling, n)
            cells = [timed(lambda: fns["new"](logits, s0, greedy=True, with_logprobs=False).tokens, args.repeats)]
            for kw in mixes(n, v).values():
                for name, mod in impls.items():
                    s = arrays(mod, n, **kw)
                    cells.append(timed(lambda: fns[name](logits, s, greedy=False, with_logprobs=False).tokens,
                                       args.repeats))
            print(f"{v:>7} {n:>4} " + " ".join(f"{c:>{7 if i == 0 else 16}.2f}" for i, c in enumerate(cells)),
                  flush=True)


if __name__ == "__main__":
    main()
