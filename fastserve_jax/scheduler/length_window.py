"""The finished output lengths a policy learns from, with a previous run's as a prior.

A policy that learns lengths (skip-join's decode protection, gittins, predictive) keeps the
last `gittins_window` of them. On a restart it starts from the lengths the previous run
saved (policy_state.py) instead of cold. Those are a prior, not evidence about today's
traffic: once the policy has as many finishes of its own as a cold start needs before it
learns (`protect_min_samples`, `gittins_min_samples`, `predictive_min_samples`), the prior
is dropped, and the policy goes on from its own lengths as if it had started cold.

Kept whole (before 2026-12-03), a prior of 2,000 lengths outlived a 400-request burst, and
one from other traffic cost up to 2.28x in latency per token against a cold start
(scripts/bench_restart_prior.py: skip-join, heavy-tailed 3x burst with Azure lengths as the
prior; gittins 2.03x with chat-like ones; mean JCT up to 1.31x), while one from the same
traffic gained at most 6% and cost up to 1.27x. Dropped at the cold start's threshold, every
prior is within 0.86-1.09x of the cold start there. With a tenth of the device KV
(`--memory tenth`): kept whole up to 1.64x (gittins, heavy-tailed at 0.9x of capacity, a
prior of the same trace), now at most 1.27x (the same cell with a chat-like prior; 1.21x
with its own), 1.00x in about half the cells: there the first finishes decide more.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

import numpy as np


class LengthWindow(deque):
    """The last `maxlen` finished output lengths; the oldest `prior` of them restored."""

    def __init__(self, maxlen: int) -> None:
        super().__init__((), maxlen)
        self.prior = 0            # restored lengths (the oldest in the window) not yet dropped
        self.fresh = 0            # lengths observed in this run

    def restore(self, lengths: Iterable[int]) -> None:
        """Add a previous run's lengths as the prior (before any of this run's)."""
        if self.fresh:
            raise ValueError("restore lengths before observing any")
        self.extend(lengths)
        self.prior = len(self)

    def observe(self, n: int) -> None:
        self.append(n)
        self.fresh += 1
        self.prior = min(self.prior, max(0, len(self) - self.fresh))      # the oldest slide out

    def drop_prior(self) -> bool:
        """Forget the restored lengths still in the window; True if there were any."""
        had = self.prior > 0
        for _ in range(self.prior):
            self.popleft()
        self.prior = 0
        return had

    def settle(self, needed: int) -> bool:
        """Drop the prior once this run has `needed` lengths of its own; True when it did."""
        return self.fresh >= needed and self.drop_prior()


def near_done(lengths) -> list[bool]:
    """[age] for ages 0..max(lengths): whether a request of that age is expected to need at
    most the mean length more, E[X - age | X > age] <= E[X], by the learned lengths. One
    numpy pass (skip-join relearns every few finishes); the sums are of integers, so exact."""
    x = np.fromiter(lengths, np.int64)
    if not x.size:
        return []
    total = int(x.sum())
    mean = total / x.size
    ages = np.arange(int(x.max()) + 1)
    per = np.bincount(x)                                   # (m+1,) how many end at each length
    count = x.size - np.cumsum(per)                        # (m+1,) lengths > age
    rest = (total - np.cumsum(per * ages)).astype(np.float64)     # (m+1,) their sum
    ahead = np.divide(rest, count, out=np.zeros_like(rest), where=count > 0) - ages
    return ((count == 0) | (ahead <= mean)).tolist()
