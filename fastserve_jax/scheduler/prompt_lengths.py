"""Output lengths predicted from prompt lengths, learned online (numpy only).

Real traffic is often templated: an application's prompts have a typical size, and its
answers a typical length. In the shared Azure conversation trace the outputs are
light-tailed overall (CV 0.77), but requests with 387-403-token prompts answer in 76-120
tokens and those with 1,020-1,130-token prompts in 400-420: the finished requests with the
16 nearest prompt lengths predict a request's length with Kendall's tau 0.59 (leave one out,
the grid's 400 rows), while the lengths alone give a policy nothing to rank by. The
synthetic traces (chat-like, heavy-tailed, code) draw outputs independently of prompts, and
there this finds nothing (tau -0.06 to 0.04).

    observe(prompt_tokens, length)     a request finished
    refresh(censored)                  snapshot what predictions read: the finished window
                                       plus the live requests that have started decoding,
                                       each a length of at least its age (censored)
    predict_many(prompts, generated)   LengthPredictions: a Kaplan-Meier estimate over the
                                       K nearest prompt lengths (in log), shrunk towards
                                       the pooled lengths by K / (K + 2)
    ranks()                            the gate: Harrell's concordance C of each request's
                                       leave-one-out prediction (expected log length) with
                                       its length, over the snapshot, finished and running
                                       requests alike, pairs whose predictions differ
                                       (MIN_SEPARATION), as a tau (2 C - 1) of at least
                                       MIN_TAU (shut again under CLOSE_TAU), once
                                       MIN_ROWS have finished
    pairs() / restore(pairs)           what a restart keeps (policy_state.py): restored
                                       pairs are a prior, dropped once MIN_ROWS of this
                                       run's own have finished, as learned lengths are
                                       (length_window.py)

Censoring matters twice: in a burst the first requests to finish are the short ones, and a
neighbourhood learned from finishes alone says every prompt size answers briefly until its
long answers end; and a gate judged on those finishes alone sees no ranking until about 100
have finished. Counting the running requests as lengths of at least their age (as gittins
does for its pooled distribution) in the predictions moved the predictive policy's gain in
the Azure 8x burst from 1.24x to 1.73x fcfs's latency per token in the cold start, and in
the gate took the 3x bursts from 1.88-2.21x to 2.58-2.60x over three seeds (2026-12-05;
docs/scheduling_log.md "Prompt lengths as the predictor").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fastserve_jax.length_prediction import BIN_EDGES, NUM_BINS, LengthPrediction, length_to_bin
from fastserve_jax.scheduler.length_window import LengthWindow

MIN_TAU = 0.3          # as LengthPredictor.min_tau: below it calibrated predictions gained nothing
# Once open, the gate shuts only under this tau: a minority application whose requests start
# late is judged on few finishes while the majority's keep coming, and tau dips as they do
# (PromptLengthModel.ranks). A gate opened on a restored prior stays open the same way once the
# prior is dropped: this run's own pairs then shut it only under CLOSE_TAU.
CLOSE_TAU = 0.15
MIN_ROWS = 40          # finished requests before the gate is judged
# The gate counts a pair only where the two predictions' expected log lengths differ by at
# least this much (about 5% in length): pairs the predictions do not separate (requests of
# one application) are ties to a policy, and counted as coin flips they hid a minority
# application from the gate (PromptLengthModel._loo_concordance).
MIN_SEPARATION = 0.05
_LOG_MID = 0.5 * np.log(BIN_EDGES[:-1] * BIN_EDGES[1:].astype(np.float64))      # (NUM_BINS,) a bin's log centre


def _neighbours(keys: np.ndarray, queries: np.ndarray, k: int, skip_self: bool = False) -> np.ndarray:
    """(Q, k) indices into `keys` (sorted ascending) of the k nearest to each query; with
    `skip_self` the queries are `keys` themselves and each row leaves out its own index."""
    n = len(keys)
    k = min(k, n - 1 if skip_self else n)
    pos = np.searchsorted(keys, queries)                                   # (Q,)
    span = np.arange(-k, k + 1)                                            # candidates either side
    cand = np.clip(pos[:, None] + span[None, :], 0, n - 1)                 # (Q, 2k+1)
    dist = np.abs(keys[cand] - queries[:, None])
    dup = np.zeros(cand.shape, bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]                               # clipped repeats
    if skip_self:
        dup |= cand == np.arange(len(queries))[:, None]
    dist[dup] = np.inf
    pick = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, pick, axis=1)


def kaplan_meier(lengths: np.ndarray, events: np.ndarray) -> np.ndarray:
    """(Q, NUM_BINS) the binned Kaplan-Meier estimate of each row's (Q, k) lengths, `events`
    False where a length is censored (at least that). Mass left past a row's last length
    goes to the bin of twice its longest (the Lindy guess, as the gittins table's tail)."""
    order = np.lexsort((~events, lengths), axis=1)                         # events first at ties
    x = np.take_along_axis(lengths, order, axis=1)
    e = np.take_along_axis(events, order, axis=1)
    q, k = x.shape
    at_risk = k - np.arange(k)                                             # (k,)
    hazard = e / at_risk
    survive = np.cumprod(1.0 - hazard, axis=1)
    before = np.hstack([np.ones((q, 1)), survive[:, :-1]])
    mass = before * hazard
    out = np.zeros((q, NUM_BINS))
    rows = np.repeat(np.arange(q), k)
    np.add.at(out, (rows, length_to_bin(x).ravel()), mass.ravel())
    left = survive[:, -1]
    tail = length_to_bin(2 * x.max(axis=1))
    out[np.arange(q), tail] += left
    return out


def running_pairs(reqs) -> list[tuple[int, int]]:
    """(prompt tokens, tokens generated) of the requests that have started decoding and not
    finished: what refresh() takes as censored lengths."""
    return [(r.num_prompt_tokens, len(r.output_token_ids)) for r in reqs if r.output_token_ids and not r.finished]


class PromptLengthModel:
    """The last `window` finished (prompt length, output length) pairs, and predictions from
    them. `k` neighbours per prediction."""

    def __init__(self, window: int, k: int = 16) -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"prompt-length neighbours must be an integer >= 1, got {k!r}")
        self.k = k
        self.finished = LengthWindow(window)           # (prompt tokens, length) pairs, a restart's as prior
        self._keys = np.zeros(0)
        self._lengths = np.zeros(0, np.int64)
        self._events = np.zeros(0, bool)
        self._pooled: np.ndarray | None = None
        self.tau = float("nan")
        self._open = False                              # the gate (ranks)
        self._judged_at = 0                             # this run's pairs when the gate was last judged
        self._made: dict[tuple[int, int], LengthPrediction] = {}     # since the last refresh, by (prompt, tokens)

    def __len__(self) -> int:
        return len(self.finished)

    @property
    def prior(self) -> int:
        """Restored pairs still in the window."""
        return self.finished.prior

    def observe(self, prompt_tokens: int, length: int) -> None:
        if prompt_tokens >= 1 and length >= 1:
            self.finished.observe((int(prompt_tokens), int(length)))

    def pairs(self) -> list[list[int]]:
        return [list(pair) for pair in self.finished]

    def restore(self, pairs) -> None:
        """Start from a previous run's (prompt tokens, output length) pairs (ValueError if they
        are not pairs of integers >= 1), before any of this run's."""
        if not isinstance(pairs, list) or not all(
                isinstance(pr, list) and len(pr) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                              for v in pr) for pr in pairs):
            raise ValueError("prompt lengths must be a list of [prompt tokens, output length] pairs of integers >= 1")
        self.finished.restore((p, n) for p, n in pairs)

    def refresh(self, censored: Sequence[tuple[int, int]] = ()) -> None:
        """Snapshot the finished window and `censored` (prompt tokens, tokens generated so far)
        of the running requests; re-judge the gate."""
        fresh = self.finished.fresh
        judge = fresh >= self._judged_at + max(1, len(self.finished) // 8) or not self._judged_at
        if self.finished.settle(MIN_ROWS):                      # enough of this run's own: the prior dropped
            judge = True
        if not self.finished:
            return
        self._made = {}
        p, n = (np.array(v) for v in zip(*self.finished))
        p = np.log(p.astype(np.float64))
        pooled = np.bincount(length_to_bin(n), minlength=NUM_BINS)
        self._pooled = pooled / pooled.sum()
        c = np.array([c for c in censored if c[0] >= 1 and c[1] >= 1], np.int64).reshape(-1, 2)
        cp, cn = np.log(c[:, 0].astype(np.float64)), c[:, 1]
        keys = np.concatenate([p, cp])
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._lengths = np.concatenate([n, cn])[order]
        self._events = np.concatenate([np.ones(len(n), bool), np.zeros(len(cn), bool)])[order]
        if judge:                     # the gate moves slowly: judged again after an eighth of a window of finishes
            self.tau, self._judged_at = self._loo_concordance(), max(1, fresh)
            self._open = bool(self.tau >= MIN_TAU or (self._open and self.tau >= CLOSE_TAU))

    def _loo_concordance(self) -> float:
        """Harrell's concordance of each request's leave-one-out prediction (the expected log
        length of its neighbours' Kaplan-Meier estimate) with its length, finished and running
        requests alike, as a Kendall's tau: 2 C - 1. A pair counts where one request finished
        shorter than the other ran (finished or still running) and their predictions differ by
        at least MIN_SEPARATION; nan under MIN_ROWS finished.

        Only separated pairs: within an application the predictions are alike and its
        requests' order is noise, so counting those pairs as half concordant scales tau by the
        share of pairs across applications, whatever the predictions get right. Two
        applications whose finishes came 14 of 40, then 14 of 104, from one (long prompts and
        short answers: skip-join, joining on prefill, starts them last) gave tau 0.06-0.30
        with every pair across them ranked right, and the gate stayed shut while they waited
        out the burst (sim_templated.py seed 29: skip-join 0.54x fcfs's latency per
        token; docs/scheduling_log.md, "The gate counts separated pairs"). Where answers do not
        follow prompts the separated pairs are as often wrong as right, and tau stays near 0."""
        t, e = self._lengths, self._events
        if int(e.sum()) < MIN_ROWS:
            return float("nan")
        near = _neighbours(self._keys, self._keys, self.k, skip_self=True)
        score = kaplan_meier(t[near], e[near]) @ _LOG_MID
        ti, si = t[e], score[e]
        conc = comparable = 0.0
        for lo in range(0, len(ti), 256):                       # pairs (finished i, any j) with t_i < t_j
            ds = si[lo:lo + 256, None] - score[None, :]
            counted = (ti[lo:lo + 256, None] < t[None, :]) & (np.abs(ds) >= MIN_SEPARATION)
            conc += float(np.sum(counted & (ds < 0)))
            comparable += float(counted.sum())
        return 2.0 * conc / comparable - 1.0 if comparable else float("nan")

    def ranks(self) -> bool:
        """The prompt lengths rank the outputs well enough to schedule on (the gate): tau has
        reached MIN_TAU and not fallen under CLOSE_TAU since. Without the margin, gittins
        (skip-join MLFQ until 50 finishes, then ranked) met a two-application mix with the gate
        open at 40 finishes (tau 0.39) and shut at 50 (0.16, the majority's finishes coming
        in), ranked the minority's long prompts last for 280 s and served 0.37x fcfs's latency
        per token (sim_templated.py seed 29; 2.84x with it; docs/scheduling_log.md, "The
        gate counts separated pairs")."""
        return self._open

    def predict_many(self, prompt_tokens: Sequence[int], generated: Sequence[int]) -> list[LengthPrediction]:
        """One prediction per request, from the last refresh(). Requests with the same prompt
        length and tokens generated share one (and the Gittins indices it computes), also
        across calls until the next refresh: the engine predicts each arrival of a burst as
        it comes."""
        if self._pooled is None:
            raise RuntimeError("predict before anything finished: refresh() after the first observe()")
        asked = [(max(1, int(p)), int(g)) for p, g in zip(prompt_tokens, generated)]
        made = self._made
        missing = sorted({p for p, g in asked if (p, g) not in made})
        if missing:
            near = _neighbours(self._keys, np.log(np.array(missing, np.float64)), self.k)   # one per prompt length
            km = kaplan_meier(self._lengths[near], self._events[near])
            w = near.shape[1] / (near.shape[1] + 2.0)
            probs = w * km + (1.0 - w) * self._pooled
            row = {p: i for i, p in enumerate(missing)}
            for p, g in asked:
                if (p, g) not in made:
                    i = row[p]
                    made[(p, g)] = LengthPrediction(probs[i] / probs[i].sum(), g)
        return [made[a] for a in asked]
