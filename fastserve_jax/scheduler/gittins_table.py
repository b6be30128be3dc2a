"""The Gittins index of an empirical output-length distribution (numpy, no jax).

A job has generated `a` tokens, so its output length X is known to exceed a. Serving it up
to length b > a finishes it with probability P(X <= b | X > a) at an expected cost of
E[min(X, b) - a | X > a] tokens. The Gittins index is the best ratio over b:

    G(a) = max_{b > a} (F(b) - F(a)) / (S(b) - S(a)),   F(b) = P(X <= b),  S(b) = E[min(X, b)]

and serving the highest index first minimizes mean response time among policies that do
not know sizes (Gittins; Scully & Harchol-Balter's SOAP). A job with p decode slots of
prefill still ahead pays p before any token: the denominator gains p * (1 - F(a)).

Only b at support points of X can attain the max. Ages past the largest observed length
have no data; there the index is 1 / (a + 1 + p), as if the job would run as long again as
it has (the Lindy guess), which ranks such jobs below nearly all others.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class GittinsTable:
    def __init__(self, lengths: Sequence[int]) -> None:
        x = np.asarray(lengths, np.int64)
        if x.size == 0 or x.min() < 1:
            raise ValueError("a Gittins table needs at least one output length, all >= 1")
        m = int(x.max())
        pmf = np.bincount(x, minlength=m + 1) / x.size          # (m+1,) P(X = t)
        self.F = np.cumsum(pmf)                                  # (m+1,) P(X <= b)
        surv = 1.0 - self.F
        self.S = np.concatenate([[0.0], np.cumsum(surv[:-1])])  # (m+1,) E[min(X, b)]
        self.support = np.nonzero(pmf)[0]                        # (K,) b values that can attain the max
        self.max_len = m
        self.mean = float(x.mean())
        self._table: list[float] = self._all_ages()              # (m,) G(a), a = 0 .. m-1

    def _all_ages(self, rows: int = 256) -> list[float]:
        sup = self.support
        Fk, Sk = self.F[sup], self.S[sup]
        out = np.empty(self.max_len)
        for lo in range(0, self.max_len, rows):
            a = np.arange(lo, min(lo + rows, self.max_len))
            valid = sup[None, :] > a[:, None]                    # (rows, K)
            num = Fk[None, :] - self.F[a][:, None]
            den = np.where(valid, Sk[None, :] - self.S[a][:, None], 1.0)
            out[lo:lo + len(a)] = np.where(valid, num / den, -np.inf).max(axis=1)
        return out.tolist()

    def index(self, age: int, prefill_slots: float = 0.0) -> float:
        """G at `age` tokens generated with `prefill_slots` of prefill still ahead."""
        if age >= self.max_len:
            return 1.0 / (age + 1 + prefill_slots)
        if prefill_slots <= 0.0:
            return self._table[age]
        sup = self.support[self.support > age]
        fa, sa = self.F[age], self.S[age]
        return float(((self.F[sup] - fa) / (prefill_slots * (1.0 - fa) + self.S[sup] - sa)).max())
