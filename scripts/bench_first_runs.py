"""What a full warm-up's first runs (ModelRunner.run_once) buy the first requests after a start.

A compiled program's first run costs more than its next ones (on the CPU, XLA sets up each
launch's dots then). A full warm-up now runs every program once on padding before the engine
serves. This script starts fresh, fully warmed in-process engines in pairs, the first of each
pair with `run_once` switched off (the warm-up as it was: compiled, never run), the second as
shipped, and serves each the same burst under skip-join-mlfq (bench_preemption.py's burst:
counting prompts with chat-like outputs, a device pool of a quarter of the live KV, proactive
swapping, Poisson arrivals at --rate). Per engine: the warm-up's seconds (and the first runs'
share), the mean TTFT of the first --first arrivals and of the rest, mean JCT, latency per
token and throughput; then the pairs side by side. Every answer is checked.

With --warmup background (serve's default start) each engine waits for its background
compile, and the second of each pair then runs the programs not yet run as an idle server
does (ModelRunner.run_pending; serve/engine_loop.py runs it in slices); "warm-up" is then the
covering set's, and "first runs" the idle runs' seconds.

    python scripts/bench_first_runs.py                     # 3 pairs at 450 req/s
    python scripts/bench_first_runs.py --pairs 1 --num-requests 100
    python scripts/bench_first_runs.py --warmup background
    python scripts/bench_first_runs.py --programs          # each program's first and second run alone
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_preemption as bp  # noqa: E402
from sim_fidelity_in_process import engine_in_process  # noqa: E402

from fastserve_jax.runner.model_runner import ModelRunner  # noqa: E402
from fastserve_jax.workload import with_arrivals  # noqa: E402


def one_engine(b, arrivals: list[float], first: int, run_once: bool, warmup: str = "full") -> dict:
    """A fresh engine (its first runs on or off) serving the burst. "full": the warm-up runs
    them (ModelRunner.run_once); "background": once the background compile is done, the
    programs not yet run run as an idle server runs them (ModelRunner.run_pending)."""
    real = ModelRunner.run_once
    built = {}

    def build(policy):
        llm = built["llm"] = bp.local_engine(b.argv, policy, warmup=warmup)
        runner = llm.engine.runner
        if warmup == "background":
            runner.compiler.wait_background()
            t0 = time.perf_counter()
            if run_once:
                runner.run_pending(float("inf"))
            runner.first_run_seconds = time.perf_counter() - t0
        return llm

    if not run_once:
        ModelRunner.run_once = lambda self: 0.0
    try:
        m = engine_in_process(build, b.work, arrivals, "skip-join-mlfq", per_request=True)
    finally:
        ModelRunner.run_once = real
    eng = built.pop("llm").engine
    ttft = [x[0] for x in m["per_request"]]
    out = dict(warmup=eng.warmup_seconds, first_runs=eng.runner.first_run_seconds,
               ttft_first=statistics.mean(ttft[:first]), ttft_rest=statistics.mean(ttft[first:]),
               jct=m["e2e_mean"], per_token=m["mean_latency_per_token"], rps=m["throughput_rps"])
    del eng
    gc.collect()        # gone before the next engine is built, which would take its executables, already run
    return out


def program_runs(model: str | None, argv: argparse.Namespace) -> None:
    """--programs: one engine, fully warmed with its runs switched off; each compiled launch
    and sampler program timed on its first run and on its second (Compiler.run_once, each
    waited for), then the totals and the five largest first-run excesses."""
    from fastserve_jax import LLM

    real = ModelRunner.run_once
    ModelRunner.run_once = lambda self: 0.0
    try:
        llm = LLM(model, warmup="full", max_num_seqs=argv.max_num_seqs,
                  max_num_batched_tokens=argv.max_num_batched_tokens, block_size=argv.block_size)
    finally:
        ModelRunner.run_once = real
    runner = llm.engine.runner
    keys = runner.first_runs_pending()
    times = {}
    for rnd in range(2):
        for key in keys:
            t0 = time.perf_counter()
            runner.compiler.run_once([key])
            times.setdefault(key, []).append(time.perf_counter() - t0)
    first = sum(t[0] for t in times.values())
    second = sum(t[1] for t in times.values())
    print(f"{jax_backend()}: {len(keys)} launch and sampler programs of {model or 'the demo model'}, each run "
          f"alone: first runs {first:.3f} s in all, second runs {second:.3f} s (excess {first - second:.3f} s, "
          f"{(first - second) / len(keys) * 1e3:.2f} ms a program)")
    for key, (t1, t2) in sorted(times.items(), key=lambda kv: kv[1][1] - kv[1][0])[:5]:
        print(f"  {key}: first {t1 * 1e3:.1f} ms, second {t2 * 1e3:.1f} ms")


def jax_backend() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform} ({d.device_kind})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bp.add_burst_args(ap)
    ap.set_defaults(rate=450.0)
    ap.add_argument("--pairs", type=int, default=3, help="engine pairs (without, with first runs; default 3)")
    ap.add_argument("--warmup", choices=("full", "background"), default="full",
                    help="full: the warm-up runs each program (default); background: serve's default start, its "
                         "idle first runs once the background compile is done")
    ap.add_argument("--first", type=int, default=50,
                    help="the early arrivals whose TTFT is reported apart (default 50)")
    ap.add_argument("--programs", action="store_true",
                    help="instead of the burst: each program's first and second run on one engine, any backend")
    ap.add_argument("--model", default=None, help="with --programs: a model directory (default: the demo model)")
    a = ap.parse_args()
    if a.programs:
        program_runs(a.model, a)
        return 0
    if not 0 < a.first < a.num_requests:
        ap.error("--first must be between 0 and --num-requests")
    b = bp.burst_setup(a)
    # the screening engine goes: a live engine lends a new one its executables (export_cache.build),
    # already run, so every engine of the pairs started warm ("warm-up 0.0 s"; until 2026-12-07)
    b.llm = None
    gc.collect()
    arrivals = [r.arrival for r in with_arrivals(b.sized, a.rate, seed=a.seed)]
    print(f"arrivals: Poisson at {a.rate:g} req/s, the last at {arrivals[-1]:.2f} s; skip-join-mlfq, fresh engines "
          f"with --warmup {a.warmup}", flush=True)
    rows: dict[bool, list[dict]] = {False: [], True: []}
    for i in range(a.pairs):
        for on in (False, True):
            r = one_engine(b, arrivals, a.first, on, a.warmup)
            rows[on].append(r)
            print(f"pair {i + 1}, first runs {'on ' if on else 'off'}: warm-up {r['warmup']:.1f} s (first runs "
                  f"{r['first_runs']:.2f} s); TTFT first {a.first} {r['ttft_first'] * 1e3:.1f} ms, rest "
                  f"{r['ttft_rest'] * 1e3:.1f} ms; mean JCT {r['jct'] * 1e3:.1f} ms, latency per token "
                  f"{r['per_token'] * 1e3:.2f} ms, {r['rps']:.1f} req/s", flush=True)
    print(f"\n{'':24}{'off (compiled, never run)':>30}{'on (run once)':>30}")
    for key, label, scale, unit in (("warmup", "warm-up", 1, "s"), ("ttft_first", f"TTFT, first {a.first}", 1e3, "ms"),
                                    ("ttft_rest", "TTFT, the rest", 1e3, "ms"), ("jct", "mean JCT", 1e3, "ms"),
                                    ("per_token", "latency per token", 1e3, "ms")):
        digits = 2 if key == "per_token" else 1
        cells = [", ".join(f"{r[key] * scale:.{digits}f}" for r in rows[on]) + f" {unit}" for on in (False, True)]
        print(f"{label:24}{cells[0]:>30}{cells[1]:>30}")
    ratio = statistics.median(off["ttft_first"] / on["ttft_first"] for off, on in zip(rows[False], rows[True]))
    print(f"median over the pairs of the first {a.first} arrivals' mean TTFT, off / on: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
