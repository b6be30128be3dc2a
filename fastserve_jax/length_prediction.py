"""Output-length predictions: distributions over log-spaced length bins (numpy, no jax).

A predictor (the engine's learned head, or the simulator's noisy oracle in sim_prediction.py)
says for one request how likely each TOTAL number of output tokens L is. Scheduling reads
it through the Gittins index at the tokens generated so far (scheduler/predictive.py).

    BIN_EDGES  (NUM_BINS + 1,) = 1 2 3 4 5 6 7 8 10 11 13 16 19 23 27 32 ... 23170 27554 32768
               round(2 ** (k / 4)) for k = 0..60 with repeats dropped: four bins per doubling,
               and every length below 8 has a bin of its own. Bin i holds [E_i, E_i+1);
               lengths from 32768 up count in the last bin.

Inside a bin, L is spread evenly: a bin of at most 4 lengths gives each the same share, a
wider one puts a quarter of its mass at the midpoint of each of its quarters (four atoms
keep the index cheap and its error within a fraction of a bin), unless the prediction pins
each bin's mass to one length (`points`: `point(n)` is an exact prediction). Lengths are in tokens and
the index is per decode slot, the unit of gittins_table.py and service.py: a decode token
costs one slot and a prefill still ahead costs `prefill_slots`.

If no mass is left past the tokens generated (the request outran its prediction), the rest
is geometric with mean generated + 1: it is guessed to run as long again as it has (the
Lindy guess, as GittinsTable past its longest sample), which gives index
1 / (generated + 1 + prefill_slots) and ranks it below nearly everything.

Quality figures for /metrics (plain floats): `kendall_tau` (tau-b, O(n log^2 n)) and
`calibration` (probability given to the true bin, coverage of the central 80% interval).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

BIN_EDGES = np.unique(np.round(2.0 ** (np.arange(61) / 4))).astype(np.int64)   # (NUM_BINS + 1,)
NUM_BINS = len(BIN_EDGES) - 1
_LO = BIN_EDGES[:-1].astype(np.float64)        # (NUM_BINS,) first length of each bin
_HI = BIN_EDGES[1:].astype(np.float64)         # (NUM_BINS,) first length past it
_WIDTH = _HI - _LO
_EDGES = BIN_EDGES.tolist()
_K = 4                                         # points a wide bin is spread over for the index
_J = np.arange(_K)
_TINY = 1e-12


def length_to_bin(n):
    """The bin of output length(s) `n` (>= 1); lengths past the last edge go to the last bin."""
    b = np.clip(np.searchsorted(BIN_EDGES, n, side="right") - 1, 0, NUM_BINS - 1)
    return int(b) if np.ndim(b) == 0 else b


@dataclass(frozen=True, eq=False)
class LengthPrediction:
    """probs: (NUM_BINS,) P(L in bin i), non-negative, summing to 1 (renormalised within 1e-6).
    at_tokens: output tokens generated when it was made. points: None, or (NUM_BINS,) the one
    length each bin's mass sits at (inside its bin)."""

    probs: np.ndarray
    at_tokens: int = 0
    points: np.ndarray | None = None

    def __post_init__(self) -> None:
        p = np.array(self.probs, dtype=np.float64)
        if p.shape != (NUM_BINS,):
            raise ValueError(f"probs must have shape ({NUM_BINS},), one per length bin (BIN_EDGES), got {p.shape}")
        if not np.all(np.isfinite(p)) or p.min() < 0:
            raise ValueError("probs must be finite and non-negative")
        if abs(p.sum() - 1.0) > 1e-6:
            raise ValueError(f"probs must sum to 1, got {p.sum():.6g}; normalise the predictor's output")
        if not isinstance(self.at_tokens, (int, np.integer)) or isinstance(self.at_tokens, bool) or self.at_tokens < 0:
            raise ValueError(f"at_tokens must be an integer >= 0 (output tokens when predicted), got {self.at_tokens!r}")
        p /= p.sum()
        p.flags.writeable = False
        object.__setattr__(self, "probs", p)
        object.__setattr__(self, "at_tokens", int(self.at_tokens))
        if self.points is not None:
            x = np.array(self.points, dtype=np.float64)
            if x.shape != (NUM_BINS,) or np.any(x < _LO) or np.any(x[:-1] >= _HI[:-1]):
                raise ValueError("points must have shape (NUM_BINS,) with points[i] inside bin i")
            x.flags.writeable = False
            object.__setattr__(self, "points", x)

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def point(cls, n: int, at_tokens: int = 0) -> "LengthPrediction":
        """Certainty: L = n exactly (the index is then 1 / remaining work: SRPT)."""
        if n < 1:
            raise ValueError(f"an output length is >= 1 token, got {n}")
        b = length_to_bin(n)
        probs, points = np.zeros(NUM_BINS), _LO.copy()
        probs[b], points[b] = 1.0, n
        return cls(probs, at_tokens, points)

    @classmethod
    def from_samples(cls, lengths: Sequence[int], at_tokens: int = 0) -> "LengthPrediction":
        """The empirical distribution of `lengths` (>= 1), binned."""
        x = np.asarray(lengths, np.int64)
        if x.size == 0 or x.min() < 1:
            raise ValueError("from_samples needs at least one output length, all >= 1")
        return cls(np.bincount(length_to_bin(x), minlength=NUM_BINS) / x.size, at_tokens)

    # -- reading it -------------------------------------------------------------------------
    @functools.cached_property
    def _atoms(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(x, v, first): the lengths L takes, ascending, their probabilities, and for each
        bin i the index of its first atom (first[NUM_BINS] = the number of atoms)."""
        if self.points is not None:
            bins = np.nonzero(self.probs > 0)[0]
            x, v = self.points[bins], self.probs[bins]
        else:
            x, v, bins = _spread(self.probs)
        return x, v, np.searchsorted(bins, np.arange(NUM_BINS + 1)).tolist()

    def _tail(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, np.ndarray]:
        """Over the atoms k..: (x, A, B, V, M, W) with V their mass, M = sum v x, A_j the mass
        of atoms k..j, B_j = sum_{i<=j} v_i x_i + (V - A_j) x_j (V times E[min(L, x_j)] over
        them) and W_j = sum_{i<=j} v_i / x_i. Kept for the last k: it changes only when a
        request's age enters a new bin."""
        cached = self.__dict__.get("_tail_cache")
        if cached is not None and cached[0] == k:
            return cached[1]
        x, v, _ = self._atoms
        xs, vs = x[k:], v[k:]
        a = np.cumsum(vs)
        vx = np.cumsum(vs * xs)
        total, moment = (float(a[-1]), float(vx[-1])) if len(a) else (0.0, 0.0)
        out = (xs, a, vx + (total - a) * xs, total, moment, np.cumsum(vs / xs))
        self.__dict__["_tail_cache"] = (k, out)
        return out

    def _past(self, g: int) -> tuple[list[tuple[float, float]], tuple, float] | None:
        """What lies past `generated` = g: (head, tail, T). head: [(x, p)] atoms of the rest of
        the bin that holds g + 1 (its integers past g, spread as in _spread; none with points),
        tail: _tail of the whole bins after it, T: the mass of both. None: no mass past g."""
        x, _, first = self._atoms
        head: list[tuple[float, float]] = []
        if self.points is not None:
            k = int(np.searchsorted(x, g, side="right"))
        else:
            b = min(bisect.bisect_right(_EDGES, g + 1) - 1, NUM_BINS - 1)
            c = _EDGES[b + 1] - g - 1                      # integers of bin b past g
            m = float(self.probs[b]) * c / (_EDGES[b + 1] - _EDGES[b]) if c >= 1 else 0.0
            if m > 0.0:
                head = ([(g + 1.0 + j, m / c) for j in range(c)] if c <= _K else
                        [(g + 0.5 + (j + 0.5) * c / _K, m / _K) for j in range(_K)])
            k = first[b + 1]
        tail = self._tail(k)
        total = sum(p for _, p in head) + tail[3]
        return (head, tail, total) if total > _TINY else None

    def conditional(self, generated: int) -> np.ndarray:
        """(NUM_BINS,) P(L in bin i | L > generated); geometric past the prediction (module doc)."""
        g = generated
        if self.points is not None:
            m = np.where(self.points > g, self.probs, 0.0)
        else:
            m = self.probs * np.clip(_HI - np.maximum(_LO, g + 1), 0.0, None) / _WIDTH
        total = m.sum()
        if total > _TINY:
            return m / total
        q = 1.0 / (g + 1)                                # P(L >= x) = (1 - q) ** (x - g - 1)
        surv = (1.0 - q) ** np.maximum(0.0, BIN_EDGES.astype(np.float64) - g - 1)
        m = surv[:-1] - surv[1:]
        m[-1] = surv[-2]
        return m / m.sum()

    def mean_remaining(self, generated: int) -> float:
        """E[L - generated | L > generated] in tokens."""
        past = self._past(generated)
        if past is None:
            return float(generated + 1)
        head, tail, total = past
        return (sum(x * p for x, p in head) + tail[4]) / total - generated

    def mean(self) -> float:
        """E[L] in tokens."""
        return self.mean_remaining(0)

    def median(self) -> float:
        """The smallest length L takes with P(L <= it) >= 1/2, in tokens (bins spread as in _spread).
        Found from the bins' masses without spreading them: skip-join places every waiting
        request again at each refresh, and spreading each prediction made that one call 48-87 ms
        with 1,000 live requests (scripts/bench_scheduler.py, 2026-12-07)."""
        target, cum = 0.5 - 1e-9, np.cumsum(self.probs)
        b = int(np.searchsorted(cum, target))
        if self.points is not None or b >= NUM_BINS:      # points, or rounding left it short: the atoms' way
            x, v, _ = self._atoms
            return float(x[min(int(np.searchsorted(np.cumsum(v), target)), len(x) - 1)])
        width = _WIDTH[b]
        atoms = width if width <= _K else _K          # a bin's atoms share its mass equally (_spread)
        before = cum[b - 1] if b else 0.0
        j = min(max(int(np.ceil((target - before) / (self.probs[b] / atoms))) - 1, 0), int(atoms) - 1)
        return float(_LO[b] + j if width <= _K else _LO[b] - 0.5 + (j + 0.5) * width / _K)

    def gittins_index(self, generated: int, prefill_slots: float = 0.0, per_token: bool = False) -> float:
        """max over horizons D of P(L - g <= D | L > g) / (prefill_slots + E[min(L - g, D) | L > g]),
        g = generated: higher runs first (mean response time). per_token: the numerator is
        E[1{L - g <= D} / L | L > g] instead, the index for mean latency per output token
        (each request's cost rate is 1 / L: finishing a short one saves more); a point mass
        then ranks by length x remaining work instead of remaining work alone.

        Only D at atoms can attain the max. In sums over the atoms past g (mass T):
        done_j = A_j / T (or W_j / T) and spent_j = (B_j - g T) / T, so the ratio is
        A_j / (B_j + T (prefill_slots - g)). Past the prediction (geometric rest, module doc)
        the index is 1 / (g + 1 + prefill_slots), over the expected length 2 g + 1 per token."""
        memo = self.__dict__.setdefault("_index_memo", {})       # one prediction may rank many requests
        key = (generated, prefill_slots, per_token)
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= 4096:
                memo.clear()
            hit = memo[key] = self._gittins_index(generated, prefill_slots, per_token)
        return hit

    def _gittins_index(self, generated: int, prefill_slots: float, per_token: bool) -> float:
        g = generated
        past = self._past(g)
        if past is None:
            return 1.0 / (g + 1 + prefill_slots) / ((2 * g + 1) if per_token else 1)
        head, (_, ta, tb, tv, _, tw), total = past
        shift = total * (prefill_slots - g)
        best, a, ax, aw = 0.0, 0.0, 0.0, 0.0             # head atoms: A, sum p x and W so far
        for x, p in head:
            a += p
            ax += p * x
            aw += p / x
            best = max(best, (aw if per_token else a) / (ax + (total - a) * x + shift))
        if tv > 0.0:
            num = aw + tw if per_token else a + ta
            best = max(best, float((num / (tb + (ax + shift))).max()))
        return best


def _spread(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atoms of bins uniform over their integers: a bin of at most _K lengths lists them, a
    wider one stands at the midpoints of its _K quarters with a quarter of its mass each."""
    lo, width = _LO[:, None], _WIDTH[:, None]                                     # (NUM_BINS, 1)
    exact = width <= _K
    x = np.where(exact, lo + _J, lo - 0.5 + (_J + 0.5) * width / _K)               # (NUM_BINS, _K)
    v = np.where(exact, np.where(_J < width, probs[:, None] / width, 0.0), probs[:, None] / _K)
    keep = (v > 0).ravel()
    bins = np.repeat(np.arange(NUM_BINS), _K)[keep]
    return x.ravel()[keep], v.ravel()[keep], bins


# -- quality figures ------------------------------------------------------------------------
def kendall_tau(pred: Sequence[float], true: Sequence[float]) -> float:
    """Kendall's tau-b between two equally long sequences (ties counted as scipy does); nan
    when either is constant or shorter than 2. O(n log^2 n): discordant pairs are the
    inversions of `true` ordered by (pred, true), counted by a bottom-up merge with numpy."""
    x, y = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"kendall_tau needs two 1-D sequences of equal length, got {x.shape} and {y.shape}")
    n = len(x)
    if n < 2:
        return float("nan")
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    ry = np.unique(y, return_inverse=True)[1].astype(np.int64)      # ranks of y, ties equal

    def tied(*cols: np.ndarray) -> float:
        """Pairs equal in every column; the rows are sorted by the columns (runs of equals)."""
        change = np.zeros(n - 1, bool)
        for c in cols:
            change |= c[1:] != c[:-1]
        counts = np.diff(np.flatnonzero(np.concatenate([[True], change, [True]])))
        return float((counts * (counts - 1) // 2).sum())

    pairs = n * (n - 1) / 2
    tx, ty, txy = tied(x), tied(np.sort(y)), tied(x, y)
    if pairs == tx or pairs == ty:
        return float("nan")
    discordant = _inversions(ry)
    return float((pairs - tx - ty + txy - 2 * discordant) / np.sqrt((pairs - tx) * (pairs - ty)))


def _inversions(a: np.ndarray) -> int:
    """Pairs i < j with a[i] > a[j] (a: non-negative ints). Level by level: each pair of
    adjacent sorted blocks (A, B) counts, for every b in B, the elements of A above b."""
    n, total, w = len(a), 0, 1
    big = int(a.max()) + 1
    while w < n:
        block = np.arange(n) // w
        left = block % 2 == 0
        pair = block // 2
        keys_a = np.sort(pair[left] * big + a[left])                 # each A block sorted, blocks in order
        b_key = pair[~left] * big + a[~left]
        below_or_eq = np.searchsorted(keys_a, b_key, side="right")   # A elements (of pairs <= this) <= b
        end_of_a = np.searchsorted(keys_a, pair[~left] * big + big, side="left")
        total += int((end_of_a - below_or_eq).sum())
        w *= 2
    return total


def calibration(preds: Sequence[LengthPrediction], true_lengths: Sequence[int]) -> dict[str, float]:
    """How well predicted distributions fit the lengths that came: true_bin_prob, the mean
    probability given to the true length's bin; coverage_80, the fraction of true lengths
    inside their prediction's central 80% interval (0.8 when calibrated; the mid-point of
    P(L < n) and P(L <= n), within-bin uniform, must lie in [0.1, 0.9]); n, how many."""
    n = len(preds)
    if n != len(true_lengths):
        raise ValueError(f"calibration needs one true length per prediction, got {n} and {len(true_lengths)}")
    if n == 0:
        return dict(true_bin_prob=float("nan"), coverage_80=float("nan"), n=0.0)
    probs = np.stack([p.probs for p in preds])                       # (n, NUM_BINS)
    t = np.asarray(true_lengths, np.int64)
    b = length_to_bin(t)
    rows = np.arange(n)
    p_bin = probs[rows, b]
    below = np.cumsum(probs, axis=1)[rows, b] - p_bin                # P(L in an earlier bin)
    inside = np.clip(t - _LO[b], 0.0, _WIDTH[b] - 1)                 # integers of the bin below t
    mid = below + p_bin * (inside + 0.5) / _WIDTH[b]
    return dict(true_bin_prob=float(p_bin.mean()), coverage_80=float(((mid >= 0.1) & (mid <= 0.9)).mean()),
                n=float(n))
