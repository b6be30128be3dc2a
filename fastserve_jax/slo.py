"""Latency, throughput and service-level figures of a set of finished requests; the simulator,
`fastserve-jax simulate`, `fastserve-jax bench` and the benchmarks report them from this code.

    jct                  finish - arrival (job completion time, end-to-end latency)
    ttft                 first token - arrival
    tpot                 (finish - first token) / (output tokens - 1), over requests with > 1 token
    latency_per_token    jct / output tokens (FastServe's headline metric), mean over requests
    throughput           requests (tokens) finished / (last finish - first arrival)
    arrival rate         requests / (last arrival - first arrival): what a rate's random arrivals
                         came at (400 Poisson arrivals at 1 req/s came at 0.89 with seed 0)
    slo attainment       fraction of requests with ttft <= TTFT and tpot <= TPOT, per (TTFT, TPOT)
                         pair (a 1-token request has no tpot and only needs the TTFT)

Over a sweep of offered rates, `highest_rate_within` finds the highest rate at which a
figure still meets its target (SLO attainment >= 95%, or mean latency per token <= its SLO:
the goodput).

Beside vLLM's benchmark_serving: ttft, tpot (requests with > 1 token; a 1-token request meets
any TPOT), throughput over the run and numpy's linear percentiles mean what its figures mean;
its `request_goodput` is another figure, the completed requests per second of one run that
meet every SLO, where this goodput is a rate found by a sweep.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fastserve_jax.cost_model import CostModel
from fastserve_jax.request import Request
from fastserve_jax.workload import TraceRequest, prefill_seconds

# The FastServe paper's (TTFT, TPOT) SLO pairs in seconds: a base pair and its 2x and 4x.
PAPER_SLOS: tuple[tuple[float, float], ...] = ((1.55, 0.15), (3.1, 0.3), (6.2, 0.6))
ATTAINMENT_TARGET = 0.95
UNLOADED_SLO_FACTOR = 5.0          # default latency-per-token SLO: this times the unloaded value


def request_latencies(requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per request (seconds): jct, ttft, tpot (nan for 1-token requests), output tokens."""
    if not requests or any(r.metrics.finish_time is None for r in requests):
        raise ValueError("the metrics need a non-empty list of finished requests")
    arr = np.array([r.arrival_time for r in requests])
    fin = np.array([r.metrics.finish_time for r in requests])
    first = np.array([r.metrics.first_token_time for r in requests])
    out = np.array([len(r.output_token_ids) for r in requests])
    multi = out > 1
    tpot = np.full(len(requests), np.nan)
    tpot[multi] = (fin - first)[multi] / (out[multi] - 1)
    return fin - arr, first - arr, tpot, out


def summarize(requests: Sequence[Request]) -> dict[str, float]:
    """The module docstring's figures over finished requests (seconds, per second); mean_tpot
    is nan where no request has more than one token."""
    jct, ttft, tpot, out = request_latencies(requests)
    span = max(r.metrics.finish_time for r in requests) - min(r.arrival_time for r in requests)
    multi = ~np.isnan(tpot)
    return dict(
        mean_jct=float(jct.mean()), p50_jct=float(np.percentile(jct, 50)),
        p95_jct=float(np.percentile(jct, 95)), p99_jct=float(np.percentile(jct, 99)),
        mean_ttft=float(ttft.mean()), p99_ttft=float(np.percentile(ttft, 99)),
        # no request with a second token: no tpot (nan, as bench_client's), not a perfect 0 s
        mean_tpot=float(tpot[multi].mean()) if multi.any() else float("nan"),
        mean_latency_per_token=mean_latency_per_token(jct, out),
        throughput_rps=len(requests) / span, throughput_tps=float(out.sum()) / span,
        arrival_rps=len(requests) / arrived if (arrived := max(r.arrival_time for r in requests)
                                                - min(r.arrival_time for r in requests)) > 0 else None,
        num_requests=len(requests))


def mean_latency_per_token(jct: np.ndarray, out: np.ndarray) -> float:
    """Mean over requests of jct / output tokens (seconds)."""
    return float((np.asarray(jct, float) / np.asarray(out, float)).mean())


def slo_attainment(ttft: np.ndarray, tpot: np.ndarray,
                   slos: Sequence[tuple[float, float]] = PAPER_SLOS) -> list[dict[str, float]]:
    """[{ttft, tpot, attained}] per SLO pair: the fraction of requests with ttft <= TTFT and
    tpot <= TPOT. tpot is nan for a 1-token request (it only needs the TTFT); a request that
    failed counts as missing every pair if the caller gives it ttft = inf."""
    ttft, tpot = np.asarray(ttft, float), np.asarray(tpot, float)
    if not ttft.size or ttft.shape != tpot.shape:
        raise ValueError(f"slo_attainment needs equally long, non-empty ttft and tpot, got {ttft.shape}, {tpot.shape}")
    out = []
    for t_first, t_tok in slos:
        ok = (ttft <= t_first) & (np.isnan(tpot) | (tpot <= t_tok))
        out.append(dict(ttft=float(t_first), tpot=float(t_tok), attained=float(ok.mean())))
    return out


def highest_rate_within(rates: Sequence[float], values: Sequence[float], limit: float,
                        higher_is_better: bool) -> float | None:
    """The highest offered rate at which `values` (one per rate) still meet `limit`: >= it if
    higher_is_better (SLO attainment), else <= it (latency).

    Rates are taken in increasing order up to the first one that misses; between that rate and
    the one before it (which meets the limit), the answer is interpolated linearly in the
    value. So a noisy sweep that misses at one rate and meets again at a higher one reports the
    first crossing. None if the lowest rate already misses; the highest rate if none misses
    (a lower bound: sweep higher rates to find the limit)."""
    if len(rates) != len(values) or not rates:
        raise ValueError(f"need one value per rate, got {len(rates)} rates and {len(values)} values")
    pts = sorted(zip(rates, values))

    def meets(v: float) -> bool:
        return v >= limit if higher_is_better else v <= limit

    if not meets(pts[0][1]):
        return None
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if not meets(v1):                       # v0 meets, v1 misses: the limit lies in [v0, v1)
            if not np.isfinite(v1):
                return float(r0)
            return float(r0 + (r1 - r0) * (limit - v0) / (v1 - v0))
    return float(pts[-1][0])


def unloaded_latency_per_token(trace: Sequence[TraceRequest], cost: CostModel,
                               prefill_chunk: int | None = None) -> float:
    """Mean latency per output token (jct / output tokens, mean over the requests) when each
    request runs alone, by the cost model: its prompt in prefill launches of at most
    `prefill_chunk` tokens (one launch if None), the last of which gives the first token, then
    one batch-1 decode launch per further token (with the cost model's launch padding), the one
    for token j + 1 reading the prompt and j outputs of context. This is what the simulator
    charges a request that never waits."""
    if not trace:
        raise ValueError("unloaded_latency_per_token needs at least one request")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 token (or None: one launch), got {prefill_chunk}")
    # a batch-1 decode launch as iteration_time charges it: its one row padded to the smallest row bucket
    base, per_ctx = cost.decode_launch_time(1, 0, 0), cost.decode_context
    total = 0.0
    for r in trace:
        p, o = r.prompt_tokens, r.output_tokens
        prefill = prefill_seconds(cost, p, prefill_chunk)
        if cost.block_size:         # padded reads (a profile of the reference path): token by token
            decode = sum(cost.iteration_time((p + j,), ()) for j in range(1, o))
        else:   # sum over j = 1 .. o-1 of decode_launch_time(1, p + j, p + j): base + decode_context * (p + j)
            decode = (o - 1) * (base + cost.iteration_overhead) + per_ctx * ((o - 1) * p + o * (o - 1) / 2)
        total += (prefill + decode) / o
    return total / len(trace)


def parse_slo_pair(text: str) -> tuple[float, float]:
    """'TTFT,TPOT' in seconds (e.g. '1.55,0.15') -> (ttft, tpot), both > 0."""
    parts = text.split(",")
    try:
        pair = tuple(float(x) for x in parts)
    except ValueError:
        pair = ()
    if len(pair) != 2 or not all(np.isfinite(x) and x > 0 for x in pair):
        raise ValueError(f"an SLO pair is TTFT,TPOT: two positive numbers of seconds like 1.55,0.15; got {text!r}")
    return pair


def sweep_summary(rows: Sequence[dict], slo_latency_per_token: float) -> dict:
    """One policy's sweep, rows of {offered_rps, mean_latency_per_token, slo_attainment} (any
    order; a row's `failed` requests, bench's, make it miss the latency SLO: its mean is over
    the completed ones): goodput_rps (the highest rate whose mean latency per token is <= the
    SLO), per SLO pair the highest rate with attainment >= 95% (see highest_rate_within), the
    highest rate swept (a result equal to it is a lower bound) and, where the rows carry their
    throughput_rps, the highest rate served."""
    rates = [m["offered_rps"] for m in rows]
    latency = [np.inf if m.get("failed") else m["mean_latency_per_token"] for m in rows]
    pairs = [(s["ttft"], s["tpot"]) for s in rows[0]["slo_attainment"]]
    served = {"max_served_rps": max(m["throughput_rps"] for m in rows)} if all("throughput_rps" in m for m in rows) \
        else {}
    return dict(
        **served,
        max_offered_rps=max(rates),
        goodput_rps=highest_rate_within(rates, latency, slo_latency_per_token, higher_is_better=False),
        slo_latency_per_token=slo_latency_per_token,
        rate_at_95pct=[dict(ttft=t, tpot=p, rate=highest_rate_within(
            rates, [m["slo_attainment"][i]["attained"] for m in rows], ATTAINMENT_TARGET, higher_is_better=True))
            for i, (t, p) in enumerate(pairs)])
