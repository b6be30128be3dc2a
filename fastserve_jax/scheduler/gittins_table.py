"""The Gittins index of an empirical output-length distribution (numpy, no jax).

A job has generated `a` tokens, so its output length X is known to exceed a. Serving it up
to length b > a finishes it with probability P(X <= b | X > a) at an expected cost of
E[min(X, b) - a | X > a] tokens. The Gittins index is the best ratio over b:

    G(a) = max_{b > a} (F(b) - F(a)) / (S(b) - S(a)),   F(b) = P(X <= b),  S(b) = E[min(X, b)]

and serving the highest index first minimizes mean response time among policies that do
not know sizes (Gittins; Scully & Harchol-Balter's SOAP). A job with p decode slots of
prefill still ahead pays p before any token: the denominator gains p * (1 - F(a)).

Only b at support points of X can attain the max; the table for all ages is one convex-hull
sweep (see `_all_ages`). Ages past the largest observed length
have no data; there the index is 1 / (a + 1 + p), as if the job would run as long again as
it has (the Lindy guess), which ranks such jobs below nearly all others.

Censored observations: the requests still running have generated c tokens and are known only
to need more (X > c). Learning from the finished ones alone is biased short whenever the
long ones are still running, worst early in an overload burst, when only the short ones
have finished. The distribution is then the Kaplan-Meier estimate over both. Past the
largest observation (the oldest running request, early in a burst) it says nothing; that
mass gets a geometric tail whose hazard per token is the one Kaplan-Meier measured over the
later half of the observed ages (events over tokens at risk there: the censored maximum-
likelihood fit of a constant hazard), so the tail is short where the hazard has been rising
(light tails: an old job is nearly done) and long where it has been falling. It is held
between 1/(m+1) (at most the Lindy guess, as long again as the oldest) and 1/2, and runs
for 3(m+1) tokens, the rest at its end.

Mean JCT against the better of fcfs and skip-join, 400-request bursts at 1.5x / 3x / 8x
capacity, full device KV (scripts/repro_fastserve.py's setup, arrival seeds 0, 1, 2):
finished requests alone, 1.28x at 3x on the Azure trace (seed 0); all the unobserved mass
one token past the oldest running request (until 2026-12-02), 1.08-1.38x / 1.21-1.22x /
1.19-1.21x on the Azure trace and 0.92-0.94x / 1.08-1.11x / 1.10-1.11x on chat-like
lengths; this tail, 0.85-0.88x / 0.94-0.95x / 0.99-1.04x and 0.94-1.04x / 1.08x /
1.06-1.07x (heavy-tailed 0.93-1.00x / 0.98-1.02x / 0.96-0.98x; with the true distribution
given, 0.83x at 3x on Azure). The later fifth or the whole observed range as the window,
or a tail cut at 8,192 tokens instead of 3(m+1), moved no cell by more than 0.04x. What it
costs is latency per token on chat-like lengths (docs/scheduling.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


TAIL_WINDOW = 0.5      # the tail's hazard is measured over ages from this fraction of the largest on
TAIL_SPAN = 3          # the tail runs for this many times (largest age + 1) tokens, the rest at its end
TAIL_EPS = 1e-9        # or ends where less than this much mass is left


def kaplan_meier_pmf(lengths: np.ndarray, censored: np.ndarray) -> np.ndarray:
    """P(X = t) for t = 0 .. from finished `lengths` and running requests known to exceed
    `censored` (ages >= 0): Kaplan-Meier up to m = max(lengths, censored + 1), then, when a
    running request is older than every finished one, the mass left past m as a geometric
    tail (see the module's docstring)."""
    m = int(max(lengths.max(), censored.max() + 1 if censored.size else 0))
    events = np.bincount(lengths, minlength=m + 1).astype(np.float64)          # (m+1,) finished at t
    exits = np.bincount(censored[censored > 0], minlength=m + 1)[: m + 1]      # (m+1,) at risk through t, not after
    # at risk at t: finished at >= t, or running with more than t - 1 tokens (censored at >= t)
    at_risk = np.cumsum((events + exits)[::-1])[::-1]
    hazard = np.divide(events, at_risk, out=np.zeros_like(events), where=at_risk > 0)
    surv = np.cumprod(1.0 - hazard)                                            # (m+1,) P(X > t)
    pmf = np.concatenate([[1.0], surv[:-1]]) - surv
    rest = float(surv[m])                        # unobserved: 0 unless censored past every length
    if rest <= TAIL_EPS:
        pmf[m] += rest
        return pmf
    t0 = int(TAIL_WINDOW * m)
    h = float(events[t0:].sum() / at_risk[t0:].sum())
    h = min(max(h, 1.0 / (m + 1)), 0.5)
    # rest = P(X >= m): m is one past the oldest running request, and nothing finished at or past it
    k = np.arange(TAIL_SPAN * (m + 1))                                         # (n,) tokens past m
    tail = rest * h * (1.0 - h) ** k                                          # (n,) P(X = m + k)
    n = min(int(np.searchsorted(np.cumsum(tail), rest - TAIL_EPS)) + 1, tail.size)
    tail = tail[:n]
    tail[-1] += rest - tail.sum()
    pmf[m] = tail[0]
    return np.concatenate([pmf, tail[1:]])


class GittinsTable:
    """G(a) for every age a of the learned distribution. per_token: the index for mean
    latency per output token instead of mean response time: each job's cost rate is 1 / its
    length, so the numerator F(b) - F(a) becomes E[1{a < X <= b} / X] (the Gittins index
    with holding costs; finishing a short job saves more)."""

    def __init__(self, lengths: Sequence[int], censored: Sequence[int] = (), per_token: bool = False) -> None:
        x = np.asarray(lengths, np.int64)
        if x.size == 0 or x.min() < 1:
            raise ValueError("a Gittins table needs at least one output length, all >= 1")
        c = np.asarray(censored, np.int64)
        pmf = kaplan_meier_pmf(x, c) if c.size and c.max() > 0 else np.bincount(x) / x.size   # (m+1,) P(X = t)
        m = pmf.size - 1
        self.per_token = per_token
        self.F = np.cumsum(pmf)                                  # (m+1,) P(X <= b): the index's numerator
        self.surv = 1.0 - self.F                                 # (m+1,) P(X > b)
        self.S = np.concatenate([[0.0], np.cumsum(self.surv[:-1])])  # (m+1,) E[min(X, b)]
        if per_token:                                            # (m+1,) E[1{X <= b} / X]; P(X = 0) = 0
            self.F = np.cumsum(pmf / np.maximum(np.arange(m + 1), 1))
        self.support = np.nonzero(pmf)[0]                        # (K,) b values that can attain the max
        self.max_len = m
        self.mean = float(pmf @ np.arange(m + 1))
        var = float(pmf @ np.arange(m + 1) ** 2) - self.mean ** 2
        self.cv = math.sqrt(max(var, 0.0)) / self.mean if self.mean > 0 else 0.0   # coefficient of variation
        self._table: list[float] = self._all_ages()              # (m,) G(a), a = 0 .. m-1

    def _all_ages(self) -> list[float]:
        """G(a) for every a in O(m): G(a) is the steepest slope from the point (S(a), F(a)) to
        a point (S(b), F(b)) with b > a, i.e. to the upper convex hull of the curve right of
        a. Sweeping a leftwards and adding each point to that hull (Andrew's monotone chain)
        pops exactly the hull points the tangent passes over, so the hull's leftmost point
        after popping is where the tangent touches."""
        F, S = self.F.tolist(), self.S.tolist()
        m = self.max_len
        hull = [m]                           # hull indices, leftmost last
        out = [0.0] * m
        for a in range(m - 1, -1, -1):
            fa, sa = F[a], S[a]
            while len(hull) >= 2:
                h0, h1 = hull[-1], hull[-2]
                if (F[h0] - fa) * (S[h1] - S[h0]) <= (F[h1] - F[h0]) * (S[h0] - sa):
                    hull.pop()               # h0 is on or below the chord a -> h1
                else:
                    break
            h0 = hull[-1]
            out[a] = (F[h0] - fa) / (S[h0] - sa)
            hull.append(a)
        return out

    def _lindy(self, age: int, prefill_slots: float) -> float:
        """Past the data: as if the job runs as long again as it has (per token: over the
        expected length 2 age + 1)."""
        return 1.0 / (age + 1 + prefill_slots) / ((2 * age + 1) if self.per_token else 1)

    def index(self, age: int, prefill_slots: float = 0.0) -> float:
        """G at `age` tokens generated with `prefill_slots` of prefill still ahead."""
        if age >= self.max_len:
            return self._lindy(age, prefill_slots)
        if prefill_slots <= 0.0:
            return self._table[age]
        sup = self.support[self.support > age]
        fa, sa = self.F[age], self.S[age]
        return float(((self.F[sup] - fa) / (prefill_slots * self.surv[age] + self.S[sup] - sa)).max())

    def index_many(self, age: int, prefill_slots: Sequence[float], chunk: int = 256) -> list[float]:
        """index(age, p) for each p in `prefill_slots` (all > 0), in numpy passes of `chunk`
        rows; the same operations in the same order, so the same numbers."""
        p = np.asarray(prefill_slots, np.float64)
        if age >= self.max_len:
            return [self._lindy(age, x) for x in p.tolist()]
        sup = self.support[self.support > age]
        fa, sa = self.F[age], self.S[age]
        num, s_sup = self.F[sup] - fa, self.S[sup]                     # (K,)
        out: list[float] = []
        for lo in range(0, p.size, chunk):
            den = (p[lo:lo + chunk, None] * self.surv[age] + s_sup[None, :]) - sa   # (rows, K)
            out += (num[None, :] / den).max(axis=1).tolist()
        return out
