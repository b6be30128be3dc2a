"""Latency and throughput of a set of finished requests; the simulator and the real-engine
benchmarks report the same figures from the same code.

    jct                  finish - arrival (job completion time, end-to-end latency)
    ttft                 first token - arrival
    tpot                 (finish - first token) / (output tokens - 1), over requests with > 1 token
    latency_per_token    jct / output tokens (FastServe's headline metric), mean over requests
    throughput           requests (tokens) finished / (last finish - first arrival)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fastserve_jax.request import Request


def summarize(requests: Sequence[Request]) -> dict[str, float]:
    if not requests or any(r.metrics.finish_time is None for r in requests):
        raise ValueError("summarize needs a non-empty list of finished requests")
    arr = np.array([r.arrival_time for r in requests])
    fin = np.array([r.metrics.finish_time for r in requests])
    first = np.array([r.metrics.first_token_time for r in requests])
    out = np.array([len(r.output_token_ids) for r in requests])
    jct, ttft = fin - arr, first - arr
    multi = out > 1
    span = float(fin.max() - arr.min())
    return dict(
        mean_jct=float(jct.mean()), p50_jct=float(np.percentile(jct, 50)),
        p95_jct=float(np.percentile(jct, 95)), p99_jct=float(np.percentile(jct, 99)),
        mean_ttft=float(ttft.mean()), p99_ttft=float(np.percentile(ttft, 99)),
        mean_tpot=float(((fin - first)[multi] / (out[multi] - 1)).mean()) if multi.any() else 0.0,
        mean_latency_per_token=float((jct / out).mean()),
        throughput_rps=len(requests) / span, throughput_tps=float(out.sum()) / span,
        num_requests=len(requests))
