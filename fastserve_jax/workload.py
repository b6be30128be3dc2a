"""Workloads for the simulator: trace files, arrival processes, a heavy-tailed synthetic
trace, and the capacity a cost model implies for a workload. numpy only.

A trace is a CSV with the columns num_prefill_tokens and num_decode_tokens, and optionally
arrived_at (seconds), like fastserve_jax.AZURE_TRACE (traces/azure_conv_2023.csv, Vidur's
processing of Azure's trace, shipped with the package). The Azure LLM inference traces as Azure publishes them (AzurePublicDataset:
TIMESTAMP,ContextTokens,GeneratedTokens, the time a date and time of day) are read as well.
"""

from __future__ import annotations

import csv
import datetime
import functools
import math
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
    """The first `num_requests` requests of the file (all if None), and whether it had arrival times.

    With an arrived_at column the rows are sorted by arrival time (stably: ties keep file
    order), the first `num_requests` of them kept (the earliest arrivals, so every row is
    read and checked), and shifted so that the earliest arrives at 0; a log written out of
    order gives the same requests at the same times as a sorted one. Without it, the first
    `num_requests` rows in file order. A row that is short, or whose lengths are not
    integers >= 1 or whose time is not a finite number, raises a ValueError naming the file
    and line."""
    with open(path, newline="", encoding="utf-8-sig") as f:     # -sig: a spreadsheet's byte order mark
        rows = csv.DictReader(f)
        try:
            cols = set(rows.fieldnames or ())
            _refuse_near_misses(path, cols)
            azure = set(AZURE_COLUMNS) - {"TIMESTAMP"} <= cols and not cols & set(AZURE_COLUMNS.values())
            if azure:
                cols = {AZURE_COLUMNS.get(c, c) for c in cols}
            missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
            if missing:
                raise ValueError(f"trace {path} lacks the column(s) {sorted(missing)} (its columns "
                                 f"{list(rows.fieldnames or ())}); a trace is a CSV with "
                                 "num_prefill_tokens,num_decode_tokens and optionally arrived_at, or "
                                 "Azure's ContextTokens,GeneratedTokens and optionally TIMESTAMP")
            timed = "arrived_at" in cols
            out = []
            for i, r in enumerate(rows):
                if num_requests is not None and i >= num_requests and not timed:   # timed: the earliest N, below
                    break
                if None in r:                              # csv.DictReader's key for fields past the header's
                    raise ValueError(f"trace {path} line {rows.line_num}: {len(r) - 1 + len(r[None])} fields, "
                                     f"the header names {len(rows.fieldnames)}")
                if azure:
                    r = {AZURE_COLUMNS.get(k, k): v for k, v in r.items()}
                out.append(_trace_row(r, timed, f"trace {path} line {rows.line_num}", azure))
        except (UnicodeDecodeError, csv.Error) as e:    # not text, or a field over csv's limit: name the file
            raise ValueError(f"trace {path} line {rows.line_num + 1}: not a CSV of UTF-8 text ({e})") from None
    if not out:
        raise ValueError(f"trace {path} has no requests")
    if timed:
        out.sort(key=lambda r: r.arrival)              # list.sort is stable
        out = out[:num_requests]
        t0 = out[0].arrival
        out = [replace(r, arrival=r.arrival - t0) for r in out]
    return out, timed


MAX_TRACE_TOKENS = 1 << 24     # 16.8M tokens: past any model's context; more is a broken file (it hung the simulator)

# Azure's column -> ours. Its TIMESTAMP is a date and time of day ("2023-11-16 18:15:46.6805900").
AZURE_COLUMNS = {"TIMESTAMP": "arrived_at", "ContextTokens": "num_prefill_tokens",
                 "GeneratedTokens": "num_decode_tokens"}


def _refuse_near_misses(path: str, cols: set[str]) -> None:
    """A column named as one the loader reads but for case or spaces (`timestamp`,
    `Num_Decode_Tokens `) is a ValueError naming the name it reads: read as any other column,
    it was ignored, and a timed trace then ran on generated arrival times."""
    twins = {**AZURE_COLUMNS, **{v: k for k, v in AZURE_COLUMNS.items()}}    # a name -> the other format's
    read = {k.lower(): k for k in twins}
    for c in sorted(cols):
        want = read.get(c.strip().lower())
        if want and want not in cols and twins[want] not in cols:
            reads = ("arrived_at (seconds) or, in Azure's format, TIMESTAMP (a date)"
                     if want in ("arrived_at", "TIMESTAMP") else repr(want))
            raise ValueError(f"trace {path}: its column {c!r} is not read: column names are exact, "
                             f"this one reads as {reads}")


def _azure_seconds(text: str) -> float:
    """Seconds since the epoch of an Azure TIMESTAMP (no zone: read as UTC, so no daylight-saving
    jump lands inside a trace); fromisoformat reads its 7 fractional digits to the microsecond."""
    t = datetime.datetime.fromisoformat(text.strip())
    return (t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)).timestamp()


def _trace_row(r: dict, timed: bool, where: str, azure: bool = False) -> TraceRequest:
    """One CSV row (csv.DictReader's dict: a short row has None for its missing fields), with
    Azure's columns already renamed to ours (`azure`: its times are dates)."""
    fields = ("arrived_at",) * timed + ("num_prefill_tokens", "num_decode_tokens")
    absent = [k for k in fields if r.get(k) in (None, "")]
    if absent:
        names = {v: k for k, v in AZURE_COLUMNS.items()} if azure else {}
        raise ValueError(f"{where}: no value for {', '.join(names.get(k, k) for k in absent)}; every row needs "
                         + ",".join(names.get(k, k) for k in fields))
    try:
        p, o = int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])
        t = (_azure_seconds(r["arrived_at"]) if azure else float(r["arrived_at"])) if timed else 0.0
    except ValueError:
        what = "TIMESTAMP a date and time (2023-11-16 18:15:46.68)" if azure else "arrived_at a number"
        raise ValueError(f"{where}: prompt and output lengths must be integers and {what}, got "
                         + ",".join(str(r[k]) for k in fields)) from None
    if not (1 <= p <= MAX_TRACE_TOKENS and 1 <= o <= MAX_TRACE_TOKENS):
        raise ValueError(f"{where}: prompt and output lengths must be in [1, {MAX_TRACE_TOKENS}], got {p}, {o}")
    if not math.isfinite(t):
        raise ValueError(f"{where}: arrived_at must be a finite number of seconds, got {r['arrived_at']}")
    return TraceRequest(t, p, o)


def save_trace(path: str, reqs: Sequence[TraceRequest], timed: bool = True) -> None:
    """A trace CSV load_trace reads; timed=False leaves the arrival column out (an untimed
    trace, which the simulator runs at a --rate or --load it is given, and refuses without)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"][0 if timed else 1:])
        for r in reqs:
            w.writerow([f"{r.arrival:.6f}", r.prompt_tokens, r.output_tokens][0 if timed else 1:])


def with_arrivals(reqs: Sequence[TraceRequest], rate: float, process: str = "poisson", cv: float = 1.0,
                  seed: int = 0) -> list[TraceRequest]:
    """The same requests in the same order, arriving at `rate` per second.

    poisson: exponential gaps. gamma: gamma gaps with mean 1/rate and coefficient of
    variation `cv` (cv > 1 is burstier than Poisson, cv = 1 is Poisson; gamma_shape says
    which cv are valid)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"arrival rate must be a finite number > 0 requests/s, got {rate}")
    rng = np.random.default_rng(seed)
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, len(reqs))
    elif process == "gamma":
        shape = gamma_shape(cv)
        scale = 1.0 / (rate * shape) if rate * shape > 0 else math.inf
        if not (math.isfinite(scale) and scale > 0):     # extreme rates and cv together
            raise ValueError(f"gamma arrivals at {rate} requests/s with --cv {cv} have a gap scale "
                             f"1/(rate/cv**2) of {scale}, not a finite number > 0")
        gaps = rng.gamma(shape, scale, len(reqs))
    else:
        raise ValueError(f"arrival process must be 'poisson' or 'gamma', got {process!r}")
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    return [replace(r, arrival=float(t)) for r, t in zip(reqs, times)]


def gamma_shape(cv: float) -> float:
    """The shape 1/cv**2 of gamma inter-arrival gaps whose coefficient of variation is `cv`;
    a ValueError unless cv is a finite number > 0 whose shape is a finite number > 0 as well,
    which holds for cv within about [1e-154, 1e154] (beyond it cv**2 overflows, or 1/cv**2)."""
    try:
        shape = 1.0 / cv ** 2 if math.isfinite(cv) and cv > 0 else math.nan
    except (ZeroDivisionError, OverflowError):
        shape = math.nan
    if not (math.isfinite(shape) and shape > 0):
        raise ValueError(f"--cv must be a finite number > 0 whose gamma shape 1/cv**2 is a finite number > 0 "
                         f"(cv within about 1e-154 to 1e154) for gamma arrivals, got {cv}")
    return shape


def prefill_seconds(cost: CostModel, prompt_tokens: int, chunk: int | None = None) -> float:
    """Seconds the prefill of a prompt of `prompt_tokens` takes on its own, by the cost model:
    launches of at most `chunk` tokens (one launch if None), each charged as the simulator
    charges an iteration with that chunk after the prompt tokens before it (iteration_time)."""
    if chunk is not None and chunk < 1:
        raise ValueError(f"a prefill chunk must be >= 1 token (or None: one launch), got {chunk}")
    step = chunk or prompt_tokens
    return sum(cost.iteration_time((), [(min(step, prompt_tokens - c), c)]) for c in range(0, prompt_tokens, step))


def capacity_rps(reqs: Sequence[TraceRequest], cost: CostModel, max_num_seqs: int, kv_tokens: int,
                 max_num_batched_tokens: int | None = None) -> float:
    """Requests per second the machine serves when it is never idle, by the cost model.

    The decode batch is max_num_seqs, or fewer if the KV pool cannot hold that many
    average requests half-way through their output (prompt + output/2 tokens each). Every
    request costs its own prefill (which stalls the iteration) plus its output tokens, each
    a 1/batch share of a decode launch over batch contexts of average length, as the
    profiled engine pads it (CostModel.decode_launch_time: rows to a bucket and, with padded
    reads, every row to the block bucket of the longest, taken as the batch/(batch+1)
    quantile of the half-way contexts); a table without padding is charged decode_time:

        capacity = 1 / mean_i( prefill(P_i) + O_i * decode_launch_time(B, B * ctx, longest) / B )

    Without a token budget (max_num_batched_tokens None) prefill(P) is one launch,
    prefill_time(P). With one, an iteration holds at most that many tokens: the decode batch
    is at most the budget, and a prompt is prefilled in chunks of at most the budget, each
    charged with the context before it (prefill_seconds, as slo.unloaded_latency_per_token
    charges them), so a small budget lowers the capacity as it lowers what the simulator serves.
    """
    if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
        raise ValueError(f"the token budget must be >= 1 token per iteration, got {max_num_batched_tokens}")
    held_each = np.asarray([r.prompt_tokens + r.output_tokens / 2 for r in reqs], np.float64)
    held = float(held_each.mean())
    batch = max(1, min(max_num_seqs, int(kv_tokens // held))) if kv_tokens else max_num_seqs
    if max_num_batched_tokens is not None:
        batch = min(batch, max_num_batched_tokens)
        prefill = functools.partial(prefill_seconds, cost, chunk=max_num_batched_tokens)
    else:
        prefill = cost.prefill_time
    longest = int(np.ceil(np.quantile(held_each, batch / (batch + 1))))
    per_token = cost.decode_launch_time(batch, int(batch * held), longest) / batch
    work = np.mean([prefill(r.prompt_tokens) + r.output_tokens * per_token for r in reqs])
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


def lognormal_trace(prompts_from: Sequence[TraceRequest], n: int, sigma: float = 0.9, mean: float = 260.0,
                    max_tokens: int | None = None, seed: int = 0) -> list[TraceRequest]:
    """The first n requests of `prompts_from` with their outputs replaced by log-normal ones
    of the given mean and sigma (at least 2 tokens; with max_tokens, prompt + output at most
    that, and at least 1 output token where the prompt leaves less room); no arrival times. Sigma 0.9 and mean 260 (the repro's Azure rows' mean) give
    median ~180, coefficient of variation ~1 and, in 400 draws, a longest output of 1.5-3k
    tokens (seeds 100 / 101 / 102: 1,791 / 1,575 / 2,828)."""
    if sigma <= 0 or mean <= 0:
        raise ValueError("lognormal_trace needs sigma > 0 and mean > 0")
    rng = np.random.default_rng(seed)
    rows = list(prompts_from[:n])
    out = np.maximum(np.exp(rng.normal(np.log(mean) - sigma ** 2 / 2, sigma, len(rows))).astype(int), 2)
    if max_tokens is not None:
        out = np.minimum(out, [max(1, max_tokens - r.prompt_tokens) for r in rows])
    return [TraceRequest(0.0, r.prompt_tokens, int(o)) for r, o in zip(rows, out)]


def chat_like_trace(prompts_from: Sequence[TraceRequest], n: int, seed: int = 0) -> list[TraceRequest]:
    """Chat-like lengths: prompts resampled from the requests of `prompts_from` with at most
    1,024 prompt tokens, log-normal outputs (median ~300, mean ~410), prompt + output <= 2,048."""
    rng = np.random.default_rng(seed)
    pool = np.asarray([r.prompt_tokens for r in prompts_from if r.prompt_tokens <= 1024])
    if not pool.size:
        raise ValueError("chat_like_trace needs some requests with prompts of at most 1,024 tokens")
    p = rng.choice(pool, n)
    o = np.minimum(np.exp(rng.normal(np.log(300), 0.85, n)).astype(int) + 1, 2048 - p)
    return [TraceRequest(0.0, int(a), int(b)) for a, b in zip(p, o)]


def code_completion_trace(n: int, seed: int = 0) -> list[TraceRequest]:
    """Code completion: prompts of 1,024-2,048 tokens (uniform), outputs of a few dozen
    (log-normal, median 30, at most 256)."""
    rng = np.random.default_rng(seed)
    p = rng.integers(1024, 2049, n)
    o = np.clip(np.exp(rng.normal(np.log(30), 0.6, n)).astype(int), 1, 256)
    return [TraceRequest(0.0, int(a), int(b)) for a, b in zip(p, o)]


def light_tailed_lengths(rng: np.random.Generator, n: int, mean: float, lo: int, hi: int) -> np.ndarray:
    """(n,) output lengths in tokens with the light tail of the Azure conversation trace's
    (CV 0.61): gamma of shape 2.7 and the given mean, clipped to [lo, hi], drawn from `rng`."""
    return np.clip(rng.gamma(2.7, mean / 2.7, n), lo, hi).astype(int)


def chat_output_lengths(n: int, lo: int = 2, hi: int = 257, alpha: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n,) output lengths in tokens, integers in [lo, hi], skewed short with a long tail like
    chat answers: a bounded Pareto of shape alpha on [lo, hi + 1), rounded down (so hi itself
    is drawn too). The defaults span the bundled demo model's answers (2 to 257 tokens):
    median 16, mean 44, 90th percentile 139, and the longest 10% of requests carry 43% of the
    output tokens (alpha -> 0 tends to log-uniform; larger alpha is shorter and more skewed)."""
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and 1 <= lo <= hi):
        raise ValueError(f"need integer lengths 1 <= lo <= hi, got lo={lo!r}, hi={hi!r}")
    if not alpha > 0:
        raise ValueError(f"the Pareto shape alpha must be > 0, got {alpha!r}")
    u = np.random.default_rng(seed).random(n)
    ratio = (lo / (hi + 1)) ** alpha
    return np.minimum(hi, np.floor(lo / (1.0 - u * (1.0 - ratio)) ** (1.0 / alpha))).astype(int)


def kv_blocks(reqs: Sequence[TraceRequest], block_size: int) -> list[int]:
    """KV blocks each request holds when its last token is in: ceil((prompt + output) / block_size)."""
    return [-(-(r.prompt_tokens + r.output_tokens) // block_size) for r in reqs]


def burst_pool_blocks(reqs: Sequence[TraceRequest], block_size: int, fraction: float = 0.45) -> int:
    """Usable device KV blocks for a burst under memory pressure: `fraction` (< 0.5) of the
    burst's live KV (every request's blocks at its end, summed: what the pool would need if
    all were live at once), rounded down, and never below the largest single request's
    blocks (else that request could never run). Raises if the two bounds cross."""
    if not 0 < fraction < 0.5:
        raise ValueError(f"fraction must be in (0, 0.5) to keep the pool below half the live KV, got {fraction!r}")
    per = kv_blocks(reqs, block_size)
    pool = int(fraction * sum(per))
    if pool < max(per):
        raise ValueError(f"{fraction:g} of the burst's live KV is {pool} blocks, fewer than its largest request "
                         f"needs ({max(per)}); send more requests or raise fraction")
    return pool
