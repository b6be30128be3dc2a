"""Evaluation of the demo model (scripts/train_demo_model.py): greedy exact match measured
by one teacher-forced forward (models.demo_task.teacher_forced_exact), during training on a
few held-out pairs and at the end on the saved checkpoint.
"""

from __future__ import annotations

import time

import numpy as np

from fastserve_jax.models import demo_task
from fastserve_jax.models.demo_task import ExampleEncoder, MAX_NUMBER


_JITTED: dict = {}


def evaluate(module, params, enc: ExampleEncoder, pairs, bos: bool = True) -> np.ndarray:
    import jax

    if module not in _JITTED:
        _JITTED[module] = jax.jit(lambda p, t, b: module.apply({"params": p}, t, b)[0])
    apply = _JITTED[module]
    examples = [enc.encode(a, b, bos=bos) for a, b in pairs]
    return demo_task.teacher_forced_exact(lambda t, b: apply(params, t, b), examples)


def span_report(pairs, ok: np.ndarray) -> str:
    spans = np.asarray([b - a for a, b in pairs])
    parts = []
    for lo, hi in [(0, 15), (16, 255), (256, 511), (512, 999)]:
        sel = (spans >= lo) & (spans <= hi)
        if sel.any():
            parts.append(f"span {lo}-{hi}: {ok[sel].sum()}/{sel.sum()}")
    return ", ".join(parts)


def final_eval(args, tok) -> dict:
    """Exact match of the saved checkpoint, loaded back through models.loader.load_model:
    held-out pairs (with and without BOS) and a sweep stopping once at every B in 0..999."""
    from fastserve_jax.models.loader import load_model

    _, module, params = load_model(args.out, cache_dir="")
    enc = ExampleEncoder(tok)
    t0 = time.time()
    pairs = demo_task.held_out_pairs(args.eval_n, max_span=args.max_span)
    ok = evaluate(module, params, enc, pairs)
    ok_nobos = evaluate(module, params, enc, pairs[:args.eval_n // 4], bos=False)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 0x5BEE]))
    sweep = [(max(0, b - int(rng.integers(0, 41))), b) for b in range(MAX_NUMBER + 1)]
    ok_sweep = evaluate(module, params, enc, sweep)
    res = {
        "held_out": (int(ok.sum()), len(ok)), "held_out_spans": span_report(pairs, ok),
        "held_out_no_bos": (int(ok_nobos.sum()), len(ok_nobos)),
        "sweep": (int(ok_sweep.sum()), len(ok_sweep)),
        "failures": [pairs[i] for i in np.flatnonzero(~ok)][:20],
        "eval_s": time.time() - t0,
    }
    print(f"held-out exact match: {res['held_out'][0]}/{res['held_out'][1]} = {ok.mean():.4f}  "
          f"[{res['held_out_spans']}]; without BOS: {res['held_out_no_bos'][0]}/{res['held_out_no_bos'][1]}; "
          f"stop sweep B=0..999: {res['sweep'][0]}/{res['sweep'][1]}  ({res['eval_s']:.0f}s)")
    if res["failures"]:
        print(f"failures (A, B): {res['failures']}")
    return res
