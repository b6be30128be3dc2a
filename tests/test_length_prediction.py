"""Output-length predictions (length_prediction.py) and the simulator's predictor
(sim_prediction.py): bins, validation, the Gittins index against its definition, Kendall's
tau against the O(n^2) count, calibration. numpy only."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve_jax.length_prediction import (BIN_EDGES, NUM_BINS, LengthPrediction, calibration, kendall_tau,
                                             length_to_bin)
from fastserve_jax.scheduler.gittins_table import GittinsTable
from fastserve_jax.sim_prediction import NoisyLengthOracle, sigma_for_tau


def test_bins_are_log_spaced_four_per_doubling():
    e = BIN_EDGES.tolist()
    assert e[0] == 1 and e[-1] >= 32768 and e == sorted(set(e)) and NUM_BINS == len(e) - 1
    assert e[:8] == list(range(1, 9))                        # every length below 8 has its own bin
    for k in range(3, 15):
        assert sum(2 ** k <= x < 2 ** (k + 1) for x in e) == 4
    assert length_to_bin(1) == 0 and length_to_bin(10) == 8 and length_to_bin(9) == 7
    assert length_to_bin(10 ** 6) == NUM_BINS - 1
    assert length_to_bin(np.array([1, 16, 17])).tolist() == [0, 11, 11]


def test_prediction_is_validated():
    good = np.full(NUM_BINS, 1.0 / NUM_BINS)
    with pytest.raises(ValueError, match="shape"):
        LengthPrediction(good[:-1])
    with pytest.raises(ValueError, match="non-negative"):
        LengthPrediction(np.where(np.arange(NUM_BINS) == 0, -0.5, good * 1.5))
    with pytest.raises(ValueError, match="sum to 1"):
        LengthPrediction(good * 2)
    with pytest.raises(ValueError, match="at_tokens"):
        LengthPrediction(good, at_tokens=-1)
    with pytest.raises(ValueError, match="points"):
        LengthPrediction(good, 0, np.zeros(NUM_BINS))
    with pytest.raises(ValueError, match=">= 1"):
        LengthPrediction.point(0)
    p = LengthPrediction(good * (1 + 1e-8))                  # renormalised, read-only
    assert p.probs.sum() == pytest.approx(1.0, abs=1e-15) and not p.probs.flags.writeable


def test_a_point_mass_ranks_exactly_like_srpt():
    preds = {n: LengthPrediction.point(n) for n in (3, 9, 100, 101, 700, 40_000)}
    for n, p in preds.items():
        for g in (0, 1, n // 2, n - 1):
            assert p.gittins_index(g) == 1.0 / (n - g)
            assert p.gittins_index(g, 7.5) == 1.0 / (n - g + 7.5)
            assert p.gittins_index(g, 2.0, per_token=True) == pytest.approx(1.0 / n / (n - g + 2.0))
            assert p.mean_remaining(g) == n - g
    # ranking a set of (length, generated, prefill) by the index = by remaining work
    jobs = [(n, g, pf) for n in preds for g in (0, 2) for pf in (0.0, 30.0) if g < n]
    by_index = sorted(jobs, key=lambda j: -preds[j[0]].gittins_index(j[1], j[2]))
    assert [j[0] - j[1] + j[2] for j in by_index] == sorted(j[0] - j[1] + j[2] for j in jobs)


def _index_by_definition(lengths, g, p, per_token=False):
    """max over b of E[w 1{g < L <= b}] / (p P(L > g) + E[min(L, b) - g; L > g]), w = 1 or 1 / L."""
    x = np.asarray(lengths, float)
    w = 1.0 / x if per_token else np.ones_like(x)
    alive = x > g
    best = 0.0
    for b in sorted(set(x[alive])):
        num = (w * (alive & (x <= b))).mean()
        den = p * alive.mean() + ((np.minimum(x, b) - g) * alive).mean()
        best = max(best, num / den)
    return best


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=40), st.floats(0, 20), st.booleans())
def test_flat_prediction_is_the_pooled_gittins_index(lengths, prefill, per_token):
    """Where every bin holds one length (below 8), from_samples is exact: the index equals the
    definition and, for mean response time, GittinsTable's."""
    pred, table = LengthPrediction.from_samples(lengths), GittinsTable(lengths)
    for g in range(max(lengths)):
        want = _index_by_definition(lengths, g, prefill, per_token)
        assert pred.gittins_index(g, prefill, per_token) == pytest.approx(want, rel=1e-9)
        if not per_token:
            assert pred.gittins_index(g, prefill) == pytest.approx(table.index(g, prefill), rel=1e-9)


def test_wide_bins_stay_close_to_the_empirical_distribution():
    x = np.exp(np.random.default_rng(0).normal(np.log(300), 0.85, 5000)).astype(int) + 1
    pred, table = LengthPrediction.from_samples(x), GittinsTable(x)
    assert pred.mean() == pytest.approx(x.mean(), rel=0.02)
    for g in (0, 50, 500, 1500):
        assert pred.mean_remaining(g) == pytest.approx((x[x > g] - g).mean(), rel=0.05)
    for g in (0, 20, 50):      # older ages: the empirical index jumps with sampling noise, the binned one does not
        assert pred.gittins_index(g) == pytest.approx(table.index(g), rel=0.02)


def test_conditional_and_what_lies_past_the_prediction():
    pred = LengthPrediction.from_samples([5, 20, 20, 300])
    c = pred.conditional(19)
    assert c.sum() == pytest.approx(1.0) and c[:length_to_bin(19)].sum() == 0.0
    # past every length it could take: geometric with mean g + 1 (the Lindy guess)
    g = 40_000
    assert pred.mean_remaining(g) == g + 1 and pred.gittins_index(g, 3.0) == 1.0 / (g + 4)
    assert pred.conditional(g)[-1] == pytest.approx(1.0)
    tail = LengthPrediction.point(100).conditional(100)
    assert tail.sum() == pytest.approx(1.0) and tail[:length_to_bin(101)].sum() == 0.0
    assert (tail * np.arange(NUM_BINS)).sum() > length_to_bin(101)     # spread above, not a point


def _tau_by_pairs(x, y):
    n = len(x)
    s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in itertools.combinations(range(n), 2))
    tx = sum(x[i] == x[j] for i, j in itertools.combinations(range(n), 2))
    ty = sum(y[i] == y[j] for i, j in itertools.combinations(range(n), 2))
    pairs = n * (n - 1) / 2
    return s / math.sqrt((pairs - tx) * (pairs - ty))


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_matches_the_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 120))
    x = rng.integers(0, 1 + seed * 4, n).astype(float)          # seed 0: x constant
    y = rng.integers(0, 25, n) + (x if seed % 2 else 0)
    if len(set(x)) == 1 or len(set(y)) == 1:
        assert math.isnan(kendall_tau(x, y))
        return
    assert kendall_tau(x, y) == pytest.approx(_tau_by_pairs(x, y), abs=1e-12)


def test_kendall_tau_edges():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([3, 2, 1], [1, 2, 3]) == -1.0
    assert math.isnan(kendall_tau([1.0], [2.0]))
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_calibration_figures():
    exact = calibration([LengthPrediction.point(n) for n in (5, 70, 900)], [5, 70, 900])
    assert exact["true_bin_prob"] == 1.0 and exact["n"] == 3.0
    wrong = calibration([LengthPrediction.point(5)], [900])
    assert wrong["true_bin_prob"] == 0.0 and wrong["coverage_80"] == 0.0
    assert math.isnan(calibration([], [])["coverage_80"])


@pytest.mark.parametrize("sigma", [0.3, 0.8, 2.0])
def test_the_simulators_posterior_is_calibrated(sigma):
    """When the prior is the true distribution, the central 80% interval of the posterior
    holds the true length about 80% of the time, and the prediction beats the prior."""
    rng = np.random.default_rng(1)
    true = np.exp(rng.normal(np.log(200), 1.0, 20_000)).astype(int) + 1
    oracle = NoisyLengthOracle(sigma)
    for n in true[:10_000]:
        oracle.observe(int(n))
    oracle.prior = oracle._snapshot()
    test = true[10_000:13_000]
    preds = [oracle.predict(int(n), float(z)) for n, z in zip(test, rng.standard_normal(len(test)))]
    cal = calibration(preds, test)
    assert abs(cal["coverage_80"] - 0.8) < 0.035, cal
    prior = calibration([LengthPrediction(oracle.prior)] * len(test), test)
    assert cal["true_bin_prob"] > prior["true_bin_prob"]


def test_oracle_limits_and_tau_mapping():
    oracle = NoisyLengthOracle(0.0)
    assert oracle.predict(123, 5.0).mean() == 123                        # sigma 0: exact
    wide = NoisyLengthOracle(50.0)
    for n in (10, 100, 1000):
        wide.observe(n)
    assert np.allclose(wide.predict(100, 0.3).probs, wide.prior, rtol=0.05, atol=0)   # useless: the prior
    with pytest.raises(ValueError, match="sigma"):
        NoisyLengthOracle(-1.0)
    lengths = np.exp(np.random.default_rng(2).normal(5, 1, 3000)).astype(int) + 1
    sigma = sigma_for_tau(lengths, 0.55, seed=3)
    assert sigma == sigma_for_tau(lengths, 0.55, seed=3) and 0.3 < sigma < 2.0
    z = np.random.default_rng(4).standard_normal(len(lengths))
    assert kendall_tau(lengths * np.exp(sigma * z), lengths) == pytest.approx(0.55, abs=0.02)
    assert sigma_for_tau(lengths, 1.0) == 0.0
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sigma_for_tau(lengths, 0.0)


def test_the_median_from_bin_masses_is_the_spread_atoms_median():
    """median() finds its atom from the bins' masses without spreading them (skip-join places
    every waiting request at each refresh: 25 ms of a 1,000-request schedule() call went to
    spreading); it must pick the atom the spread's cumulative sum picks."""
    rng = np.random.default_rng(7)
    for i in range(3000):
        probs = (rng.dirichlet(np.full(NUM_BINS, 0.1)) if i % 3 == 0 else
                 np.bincount(rng.integers(0, NUM_BINS, 1 + i % 9), minlength=NUM_BINS) if i % 3 == 1 else
                 rng.random(NUM_BINS) ** 8)
        pred = LengthPrediction(probs / probs.sum())
        x, v, _ = pred._atoms
        assert pred.median() == float(x[min(int(np.searchsorted(np.cumsum(v), 0.5 - 1e-9)), len(x) - 1)]), i
