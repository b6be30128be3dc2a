"""The summary of a sweep over arrival rates (slo.sweep_summary's, per policy), as `simulate`,
`bench` and scripts/repro_fastserve.py print it, and JSON without NaN."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

PAST_SERVED = ("a finite burst keeps latency low past capacity, so these figures grow with its length; steady load "
               "(more --num-requests; simulate's --load) measures what the machine sustains")


def past_served(s: dict) -> bool:
    """Whether the sweep's goodput lies above every rate it served (a finite burst's artefact)."""
    return s["goodput_rps"] is not None and s["goodput_rps"] > s.get("max_served_rps", float("inf"))


def print_summary(summary: dict[str, dict], file=sys.stderr) -> None:
    """Per policy (slo.sweep_summary): goodput and, per SLO pair, the highest rate with 95%
    attainment."""
    first = next(iter(summary.values()))
    pairs = [f"{s['ttft']:g},{s['tpot']:g}" for s in first["rate_at_95pct"]]
    unloaded = first.get("unloaded_latency_per_token")
    print("summary in req/s, interpolated between the two rates around each limit (>=: every rate swept met "
          "it; -: the lowest rate missed it)", file=file)
    print(f"{'':>15} {'goodput':>8}" + "".join(f"{'95% ' + p:>15}" for p in pairs), file=file)
    past = []
    for policy, s in summary.items():
        rates = [s["goodput_rps"]] + [x["rate"] for x in s["rate_at_95pct"]]
        cells = [rate_cell(x, s["max_offered_rps"]) for x in rates]
        print(f"{policy:>15} {cells[0]:>8}" + "".join(f"{c:>15}" for c in cells[1:]), file=file)
        if past_served(s):
            past.append(policy)
    if past:
        print(f"note: goodput above every rate served ({', '.join(past)}): {PAST_SERVED}", file=file)
    print(f"(goodput: highest rate with mean latency/token <= {first['slo_latency_per_token'] * 1e3:.1f} ms"
          + (f" (unloaded: {unloaded * 1e3:.1f} ms)" if unloaded else "")
          + "; 95% A,B: highest rate at which >= 95% of requests have TTFT <= A s and TPOT <= B s)", file=file)


def no_nan(x):
    """x with every non-finite float written as None (JSON's null: NaN is not JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    return [no_nan(v) for v in x] if isinstance(x, (list, tuple)) else x


def write_json(path: str, obj) -> None:
    """obj as strict JSON: NaN (a mean TPOT of one-token answers, a rate where nothing completed) is null."""
    with open(path, "w") as f:
        json.dump(no_nan(obj), f, indent=1)


def write_output(path: str, write, flag: str = "--json") -> bool:
    """`write(path)`; False after an "error:" line naming the file where it cannot be written
    (a full disk: until 2026-12-07 a traceback after the whole run, and a partial file left).
    The figures are on the terminal already."""
    try:
        write(path)
        return True
    except OSError as e:
        if os.path.isfile(path):                      # a partial file (not /dev/full)
            with contextlib.suppress(OSError):
                os.remove(path)
        print(f"error: {flag} {path} could not be written ({e}); the figures above are the run's", file=sys.stderr)
        return False


def rate_cell(rate: float | None, max_rate: float) -> str:
    """A rate found by a sweep: ">=" where it is the highest rate swept (a lower bound), "-" where none."""
    if rate is None:
        return "-"
    return f"{'>=' if rate >= max_rate else ''}{rate:.3f}"
