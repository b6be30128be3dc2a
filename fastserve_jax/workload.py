"""Workloads for the simulator: trace files, arrival processes, a heavy-tailed synthetic
trace, and the capacity a cost model implies for a workload. numpy only.

A trace is a CSV with the columns num_prefill_tokens and num_decode_tokens, and optionally
arrived_at (seconds), like ../shared/traces/azure_conv_2023.csv.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from fastserve_jax.cost_model import CostModel


@dataclass(frozen=True)
class TraceRequest:
    arrival: float          # seconds from the start
    prompt_tokens: int
    output_tokens: int


def load_trace(path: str, num_requests: int | None = None) -> tuple[list[TraceRequest], bool]:
    """The first `num_requests` rows (all if None), and whether the file had arrival times."""
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        cols = set(rows.fieldnames or ())
        missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
        if missing:
            raise ValueError(f"trace {path} lacks the column(s) {sorted(missing)}; a trace is a CSV with "
                             "num_prefill_tokens,num_decode_tokens and optionally arrived_at")
        timed = "arrived_at" in cols
        out = []
        for i, r in enumerate(rows):
            if num_requests is not None and i >= num_requests:
                break
            p, o = int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])
            if p < 1 or o < 1:
                raise ValueError(f"trace {path} row {i + 2}: prompt and output lengths must be >= 1, got {p}, {o}")
            out.append(TraceRequest(float(r["arrived_at"]) if timed else 0.0, p, o))
    if not out:
        raise ValueError(f"trace {path} has no requests")
    if timed:
        t0 = out[0].arrival
        out = [replace(r, arrival=r.arrival - t0) for r in out]
    return out, timed


def save_trace(path: str, reqs: Sequence[TraceRequest]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for r in reqs:
            w.writerow([f"{r.arrival:.6f}", r.prompt_tokens, r.output_tokens])


def with_arrivals(reqs: Sequence[TraceRequest], rate: float, process: str = "poisson", cv: float = 1.0,
                  seed: int = 0) -> list[TraceRequest]:
    """The same requests in the same order, arriving at `rate` per second.

    poisson: exponential gaps. gamma: gamma gaps with mean 1/rate and coefficient of
    variation `cv` (cv > 1 is burstier than Poisson, cv = 1 is Poisson)."""
    if not rate > 0:
        raise ValueError(f"arrival rate must be > 0 requests/s, got {rate}")
    rng = np.random.default_rng(seed)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, len(reqs))
    elif process == "gamma":
        if not cv > 0:
            raise ValueError(f"--cv must be > 0 for gamma arrivals, got {cv}")
        shape = 1.0 / cv ** 2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), len(reqs))
    else:
        raise ValueError(f"arrival process must be 'poisson' or 'gamma', got {process!r}")
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    return [replace(r, arrival=float(t)) for r, t in zip(reqs, times)]


def capacity_rps(reqs: Sequence[TraceRequest], cost: CostModel, max_num_seqs: int, kv_tokens: int) -> float:
    """Requests per second the machine serves when it is never idle, by the cost model.

    The decode batch is max_num_seqs, or fewer if the KV pool cannot hold that many
    average requests half-way through their output (prompt + output/2 tokens each). Every
    request costs its own prefill (which stalls the iteration) plus its output tokens, each
    a 1/batch share of a decode launch over batch contexts of average length:

        capacity = 1 / mean_i( prefill_time(P_i) + O_i * decode_time(B, B * ctx) / B )
    """
    held = float(np.mean([r.prompt_tokens + r.output_tokens / 2 for r in reqs]))
    batch = max(1, min(max_num_seqs, int(kv_tokens // held))) if kv_tokens else max_num_seqs
    per_token = cost.decode_time(batch, int(batch * held)) / batch
    work = np.mean([cost.prefill_time(r.prompt_tokens) + r.output_tokens * per_token for r in reqs])
    return float(1.0 / work)


def heavy_tailed_trace(prompts_from: Sequence[TraceRequest], n: int, alpha: float = 0.5, lo: int = 22,
                       hi: int = 2048, seed: int = 0) -> list[TraceRequest]:
    """n requests with prompts resampled from `prompts_from` and outputs from a bounded Pareto
    (shape alpha on [lo, hi], rounded down); no arrival times. The defaults have the Azure
    conversation trace's mean output (211 tokens) with a far heavier tail: median 72 instead
    of 129, coefficient of variation 1.6 instead of 0.77, and the longest 10% of requests
    carry 52% of the output tokens instead of 23%."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    ratio = (lo / hi) ** alpha
    out = np.floor(lo / (1.0 - u * (1.0 - ratio)) ** (1.0 / alpha)).astype(int)
    prompts = rng.choice(np.asarray([r.prompt_tokens for r in prompts_from]), n)
    return [TraceRequest(0.0, int(p), int(o)) for p, o in zip(prompts, out)]
