"""`fastserve-jax bench`'s output: the table of rows and the JSON file (bench_cmd.py runs them)."""

from __future__ import annotations

import argparse

from fastserve_jax.serve import sweep_report
from fastserve_jax.serve.sweep_report import write_output

COLS = [("ttft", "ttft"), ("tpot", "tpot"), ("itl", "itl"), ("e2e", "e2e")]


def print_table(rows: list[tuple[str, float, dict]]) -> None:
    head = f"{'scheduler':15s}{'offered':>8s}{'served':>7s}{'done':>5s}{'fail':>5s}"
    for name, _ in COLS:
        head += "".join(f"{name + ' ' + s:>11s}" for s in ("mean", "p50", "p99"))
    head += f"{'ms/tok':>7s}{'tok/s':>7s}{'slo %':>12s}{'wrong':>6s}"
    print(head)
    for sched, rate, m in rows:
        line = f"{sched:15s}{rate:8.2f}{m['throughput_rps']:7.2f}{int(m['completed']):5d}{int(m['failed']):5d}"
        for name, _ in COLS:
            line += "".join(f"{1e3 * m[f'{name}_{s}']:11.1f}" for s in ("mean", "p50", "p99"))
        slo = "/".join(f"{100 * s['attained']:.0f}" for s in m["slo_attainment"])
        line += f"{1e3 * m['mean_latency_per_token']:7.1f}{m['throughput_tps']:7.0f}{slo:>12s}{m['wrong']:6d}"
        print(line)
    pairs = " / ".join(f"{s['ttft']:g},{s['tpot']:g} s" for s in rows[0][2]["slo_attainment"])
    print("(latencies in ms, measured by the client over HTTP. offered: arrivals asked per second; served: "
          "completed requests over the run per second; ttft: first token chunk - request sent; tpot: "
          "(last token chunk - first) / (completion tokens - 1), per request; itl: gap between consecutive token "
          "chunks, pooled; e2e: response complete - request sent; ms/tok: e2e / completion tokens, mean over "
          f"requests; tok/s: output tokens over the run; slo %: requests within TTFT,TPOT {pairs}; "
          "wrong: completed answers that are not the exact count, or with --dataset random not of max_tokens tokens)")


def write_json(path: str, a: argparse.Namespace, out: dict, summary: dict) -> bool:
    """The rows and summary, with every flag as parsed (the trace's path, the seed, the engine's
    options: what reruns it) but the API key; NaN (a 1-token answer's TPOT, a rate where
    nothing completed) as null, which JSON parsers read (until 2026-12-07 NaN was written, and
    the key in the clear)."""
    flags = {k: v for k, v in vars(a).items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
    if flags.get("api_key"):
        flags["api_key"] = "(given, not written)"
    return write_output(path, lambda p: sweep_report.write_json(p, dict(
        dataset=a.dataset, arrivals=a.arrivals, num_requests=a.num_requests, output_dist=a.output_dist,
        output_scale=a.output_scale, trace=a.trace, flags=flags, results=out, summary=summary)))
