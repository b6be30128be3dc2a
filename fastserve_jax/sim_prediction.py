"""The simulator's output-length predictor of a chosen quality (numpy only, no jax).

A request of true output length L gets a noisy point estimate p = L * exp(sigma * Z), with
one standard normal Z per request drawn from the run's seed, and the estimate becomes a
calibrated distribution over the length bins (length_prediction.BIN_EDGES) by Bayes' rule:

    P(bin i | p) ~ prior_i * lik_i(p),
    lik_i(p) = [Phi((log hi_i - log p) / sigma) - Phi((log lo_i - log p) / sigma)] / log(hi_i / lo_i)

lik_i is the density of log p if L were log-uniform inside bin i: for sigma wide against
a bin it is the Normal density N(log p; log centre_i, sigma), and as sigma -> 0 it tends
to the indicator of p's bin (a centre-point density would pick the nearest centre, which
can be the next bin). The prior is the lengths of the requests finished so far in the run
(what a predictor trained online has seen), plus one pseudo-count spread evenly over the
bins so that no length is impossible; before anything has finished, that alone. The prior
is a snapshot, taken anew whenever the finished requests have grown by a quarter
(`version` counts snapshots): the simulator then refines the predictions of live requests
the next time they run, as a predictor that keeps learning would (predictions made on an
early, flat prior are on another scale: a 3x chat-like burst asked for tau 0.55 realised
0.47 and covered 59% in the central 80% interval when they were kept).

sigma -> infinity gives the prior (the learned-distribution Gittins policy); sigma = 0 the
exact length (LengthPrediction.point: shortest remaining first). `sigma_for_tau` finds the
sigma whose estimates have a given Kendall's tau with a trace's lengths.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fastserve_jax.length_prediction import BIN_EDGES, NUM_BINS, LengthPrediction, kendall_tau, length_to_bin

_LOG_EDGES = np.log(BIN_EDGES.astype(np.float64))          # (NUM_BINS + 1,)
_LOG_WIDTH = np.diff(_LOG_EDGES)                            # (NUM_BINS,)
PSEUDO_COUNT = 1.0                                          # prior mass spread evenly over the bins


class NoisyLengthOracle:
    """Predictions of quality `sigma` (log-normal noise on the true length), calibrated
    against the lengths seen finishing (`observe`)."""

    def __init__(self, sigma: float) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"prediction sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.counts = np.zeros(NUM_BINS)
        self.version = 0
        self.prior = self._snapshot()

    def _snapshot(self) -> np.ndarray:
        """(NUM_BINS,) the lengths finished so far, plus PSEUDO_COUNT spread evenly."""
        self._snapshot_at = self.counts.sum()
        return (self.counts + PSEUDO_COUNT / NUM_BINS) / (self._snapshot_at + PSEUDO_COUNT)

    def observe(self, length: int) -> None:
        """A request finished with `length` output tokens: the prior learns it."""
        self.counts[length_to_bin(length)] += 1
        if self.counts.sum() >= 1.25 * self._snapshot_at:
            self.prior = self._snapshot()
            self.version += 1

    def log_estimate(self, true_length: int, z: float) -> float:
        """log p of the noisy point estimate p = L exp(sigma z) behind a prediction (what a rank
        statistic needs; p itself overflowed a float from sigma z > 709: a traceback)."""
        return math.log(true_length) + self.sigma * z

    def predict(self, true_length: int, z: float, at_tokens: int = 1) -> LengthPrediction:
        """The prediction for a request of `true_length` tokens whose noise draw is `z`."""
        if self.sigma == 0.0:
            return LengthPrediction.point(true_length, at_tokens)
        return LengthPrediction(self.posterior(math.log(true_length) + self.sigma * z), at_tokens)

    def posterior(self, log_p: float) -> np.ndarray:
        """(NUM_BINS,) P(bin | log estimate = log_p) for sigma > 0."""
        cdf = np.array([0.5 * math.erfc((log_p - e) / (self.sigma * math.sqrt(2.0))) for e in _LOG_EDGES])
        post = self.prior * np.diff(cdf) / _LOG_WIDTH
        total = post.sum()
        if not total > 0.0:                     # far outside every bin at tiny sigma: the nearest
            post = np.zeros(NUM_BINS)
            post[length_to_bin(max(1, int(math.exp(min(log_p, 40.0)))))] = 1.0
            return post
        return post / total


def sigma_for_tau(lengths: Sequence[int], tau: float, seed: int = 0, samples: int = 4000) -> float:
    """The sigma at which estimates L * exp(sigma * Z) have Kendall's tau `tau` with the true
    lengths L, measured on `lengths` repeated to at least `samples` draws (fixed draws from
    `seed`, bisection on log sigma: deterministic). tau = 1 gives 0; a tau above what any
    sigma > 0 reaches (ties among the lengths cap it below 1) gives the smallest sigma tried."""
    if not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
        raise ValueError(f"prediction tau must be in (0, 1] (1 = exact lengths), got {tau!r}")
    if tau == 1.0:
        return 0.0
    x = np.asarray(lengths, np.float64)
    if x.size < 2 or x.min() < 1:
        raise ValueError("sigma_for_tau needs at least two output lengths, all >= 1")
    x = np.tile(x, -(-samples // x.size))
    z = np.random.default_rng(seed).standard_normal(x.size)
    logx = np.log(x)
    lo, hi = math.log(1e-3), math.log(1e3)                  # tau falls as log sigma grows
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if kendall_tau(logx + math.exp(mid) * z, x) > tau:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))
