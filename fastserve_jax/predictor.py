"""Output-length predictor that the engine trains by itself while it serves (issue 18).

The input is what the model already computed: each launch's last pipeline stage also returns,
per logits row, the hidden state of the model's middle layer pooled over the sequence's
tokens in the launch, next to its last token's state (sharding/pipeline.pooled_features;
inside the compiled step, no extra launch). When a request's prefill ends (its first token)
the engine hands that row to `LengthPredictor.on_features` (with `refine`, also at 8, 16,
32, ... tokens generated: off by default, since on the demo model the refresh points
carried no length information, held-out Kendall's tau about 0, and tripled the upkeep);
the features are each half layer-normalised, plus log prompt length, log max_tokens and
log tokens generated.

    features -> Dense(128) -> relu -> Dense(NUM_BINS) -> softmax over log-spaced
    total-output-length bins (length_prediction.BIN_EDGES), cut at max_tokens

Training: every finished request (not aborted) adds (features, its output length) to a
replay window of the last `window` feature rows; every 5th request is held out. Every
`train_every` new samples a background thread runs `steps` AdamW updates of
(neighbour-smoothed) cross-entropy on minibatches of the window, in one compiled call, and
publishes a numpy copy of the weights, which is all the engine thread runs. The thread then
rests 1 / `train_budget` - 1 times as long as the round took (1% of the wall clock).
Predictions start once `min_samples` requests have been learned from (`ready`).

Quality, as it learns, over the last 512 requests that finished after a prediction was made
for them (out of sample): Kendall's tau between predicted mean and true length, the mean
probability given to the true bin, and the coverage of the central 80% interval. /metrics
exports them.

Predictions reach the scheduler only while they are worth ranking by (`trusted`, `_gate`):
the published weights rank the window's held-out rows (at least `min_scored`) with
Kendall's tau >= `min_tau`; until then the predictive policy stays skip-join MLFQ. Ranking
by a head that learned nothing (the demo model: tau about 0) made it 20x worse than
skip-join (docs/scheduling.md: the figures and the choice of 0.3).

The weights and the window are saved beside the compilation cache (keyed by the model) on
close and every 10 rounds, so a restart does not start cold (a file of other shapes: cold).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastserve_jax.length_prediction import (BIN_EDGES, NUM_BINS, LengthPrediction, calibration, kendall_tau,
                                             length_to_bin)
from fastserve_jax.runner.persistent_cache import beside_cache, save_state

log = logging.getLogger(__name__)
_FORMAT = 2
_WIDTH = 128


def _norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-5)


EXTRA = 3      # scalar features after the pooled state


def featurize(pooled: np.ndarray, prompt_len, max_tokens, generated=0) -> np.ndarray:
    """(..., 2H) pooled states (mean | last token) -> the head's input rows; the scalars
    broadcast over the leading dimension."""
    half = pooled.shape[-1] // 2
    lead = pooled.shape[:-1]
    scal = np.log1p(np.stack(np.broadcast_arrays(prompt_len, max_tokens, generated), -1).reshape(*lead, 3)) / 8.0
    return np.concatenate([_norm(pooled[..., :half]), _norm(pooled[..., half:]), scal], -1).astype(np.float32)


def _init(dim: int, seed: int) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w1": jax.random.normal(k1, (dim, _WIDTH)) * (2.0 / dim) ** 0.5, "b1": jnp.zeros(_WIDTH),
            "w2": jax.random.normal(k2, (_WIDTH, NUM_BINS)) * 0.01, "b2": jnp.zeros(NUM_BINS)}


def _logits(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _loss(p, x, y, w=None):
    """Cross-entropy against the true bin smoothed over its neighbours (a Gaussian of one bin,
    a quarter of a doubling): lengths are ordinal, and a one-hot target makes the head
    overconfident on a window of a few hundred requests. `w`: row weights (0 for padding)."""
    soft = jnp.exp(-0.5 * (jnp.arange(NUM_BINS)[None, :] - y[:, None]) ** 2)
    ce = optax.softmax_cross_entropy(_logits(p, x), soft / soft.sum(-1, keepdims=True))
    return ce.mean() if w is None else (ce * w).sum() / w.sum()


def _padded(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows padded to a power of two with weight 0: one compile per size class, not per length."""
    n = len(x)
    m = 1 << max(n - 1, 0).bit_length()
    w = np.zeros(m, np.float32)
    w[:n] = 1.0
    return (np.concatenate([x, np.zeros((m - n, x.shape[1]), x.dtype)]),
            np.concatenate([y, np.zeros(m - n, y.dtype)]), w)


class LengthPredictor:
    def __init__(self, feature_dim: int, *, window: int = 4096, min_samples: int = 200, train_every: int = 32,
                 steps: int = 40, batch: int = 128, lr: float = 3e-3, seed: int = 0, path: str | None = None,
                 refine: bool = False, train_budget: float = 0.01, upkeep_budget: float = 0.01, min_tau: float = 0.3,
                 min_scored: int = 100, warm: bool = False) -> None:
        self.feature_dim, self.min_samples, self.train_every = feature_dim, min_samples, train_every
        self.min_tau, self.min_scored = min_tau, min_scored
        self.warm = warm               # compile a round's update when the thread starts, not in the first round
        self.trusted = False           # predictions are handed to the scheduler (see the module doc)
        self.tau = float("nan")        # held-out Kendall's tau at the last training round
        self.handed = 0                # predictions set on requests (what the scheduler ranked by)
        self.steps, self.batch = steps, batch
        self.path = path
        self.window: deque[tuple[np.ndarray, int, bool]] = deque(maxlen=window)   # (x, bin, held out)
        self._opt = optax.adamw(lr, weight_decay=1e-3)
        self._params = _init(feature_dim, seed)
        self._opt_state = self._opt.init(self._params)
        self._host: dict[str, np.ndarray] | None = None       # published weights (numpy)
        self._rng = np.random.default_rng(seed)
        self.refine = refine
        self.train_budget = train_budget
        self.upkeep_budget = upkeep_budget
        self._credit, self._last = 0.05, time.perf_counter()   # upkeep budget: seconds in hand, as of when
        self._over = False             # engine-thread upkeep is over its budget: take no features for now
        self._pending: dict[str, list[np.ndarray]] = {}         # request id -> its features, until it finishes
        self._first: dict[str, LengthPrediction] = {}           # request id -> the prediction at its prefill
        self._quality: deque[tuple[LengthPrediction, int]] = deque(maxlen=512)
        self.samples_seen = 0          # finished requests added to the window (this run and restored)
        self.rounds = 0
        self.upkeep_seconds = 0.0      # engine-thread time in this module
        self.train_seconds = 0.0       # trainer-thread time
        self._new = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._update = jax.jit(self._round)
        self._eval = jax.jit(_loss)
        self._best = None              # the published weights (device), for early stopping
        self.val_loss = float("nan")
        if path:
            self._restore(path)
        self._thread = threading.Thread(target=self._train_loop, name="length-predictor", daemon=True)
        self._thread.start()
        atexit.register(self._stop)        # a daemon thread inside jax at interpreter exit aborts it

    @property
    def ready(self) -> bool:
        return self._host is not None and self.samples_seen >= self.min_samples

    # -- the engine's side -----------------------------------------------------------------
    def wants(self, req) -> bool:
        """Whether the step that is being collected should hand over `req`'s pooled state: its
        prefill just ended (no token yet), or it has generated a refresh point's tokens."""
        g = len(req.output_token_ids)
        return not self._over and (g == 0 or (self.refine and g >= 8 and g & (g - 1) == 0))

    def _account(self, t0: float) -> None:
        """Charge the engine thread's time since t0 to a token bucket (credit accrues at
        `upkeep_budget` s/s, at most 50 ms saved up); in debt, take no features: at high rates
        the predictor learns from, scores and predicts a sample of the requests."""
        now = time.perf_counter()
        self.upkeep_seconds += now - t0
        self._credit = min(0.05, self._credit + self.upkeep_budget * (now - self._last)) - (now - t0)
        self._last = now
        self._over = self._credit < 0

    def on_features(self, requests: list, pooled) -> None:
        """`wants` requests with their pooled rows by request id (before this step's tokens are
        appended), or a function that copies them (timed as upkeep): keep the features for
        training, and predict (once ready) before the scheduler re-ranks them."""
        t0 = time.perf_counter()
        if callable(pooled):
            pooled = pooled()
        todo = [r for r in requests if r.request_id in pooled]
        if not todo:
            self._account(t0)
            return
        gen = [len(r.output_token_ids) for r in todo]
        caps = [r.sampling.max_tokens for r in todo]
        xs = featurize(np.stack([pooled[r.request_id] for r in todo]), [r.num_prompt_tokens for r in todo], caps, gen)
        for r, x in zip(todo, xs):
            self._pending.setdefault(r.request_id, []).append(x)
        if self.ready:
            for r, g, pred in zip(todo, gen, self.predict(xs, caps, gen)):
                if self.trusted:
                    r.length_prediction = pred
                    self.handed += 1
                if g == 0:
                    self._first[r.request_id] = pred          # scored when it finishes, trusted or not
        self._account(t0)

    def on_finish(self, req) -> None:
        t0 = time.perf_counter()
        xs = self._pending.pop(req.request_id, [])
        first = self._first.pop(req.request_id, None)
        n = len(req.output_token_ids)
        if xs and req.finish_reason != "abort" and n > 0:
            if first is not None:
                self._quality.append((first, n))
            label = length_to_bin(n)
            with self._lock:
                held_out = self.samples_seen % 5 == 4           # a request's points stay on one side
                self.window.extend((x, label, held_out) for x in xs)
                self.samples_seen += 1
                self._new += 1
                if self._new >= self.train_every or (self._host is None and self.samples_seen >= self.min_samples):
                    self._wake.notify()
        self._account(t0)

    def _gate(self, x: np.ndarray, y: np.ndarray) -> None:
        """Re-decide `trusted` from held-out rows `x` (label bins `y`) with the published weights
        (predictions made at each prefill mix weights of different ages: docs/scheduling.md)."""
        if len(x) < self.min_scored:
            return
        z = self._weights(x)
        mean = (z / z.sum(-1, keepdims=True)) @ np.log(BIN_EDGES[:-1])      # ranks like the mean length
        self.tau = float(kendall_tau(mean, y))
        was, self.trusted = self.trusted, bool(self.tau >= self.min_tau)     # nan (constant) -> False
        if was != self.trusted:
            log.info("length predictor %s: held-out Kendall's tau %.2f over %d rows (threshold %.2f)",
                     "trusted" if self.trusted else "no longer trusted", self.tau, len(x), self.min_tau)

    def _weights(self, x: np.ndarray) -> np.ndarray:
        p = self._host                                  # unnormalised bin probabilities (numpy)
        z = np.maximum(x @ p["w1"] + p["b1"], 0.0) @ p["w2"] + p["b2"]
        return np.exp(z - z.max(-1, keepdims=True))

    def predict(self, x: np.ndarray, max_tokens: list[int], generated: list[int] | None = None) -> list[LengthPrediction]:
        """Distributions of the total output length for rows of features (numpy forward of the
        published weights), cut to (generated, max_tokens]."""
        z = self._weights(x)
        out = []
        for probs, cap, g in zip(z, max_tokens, generated or [0] * len(z)):
            probs = probs.copy()
            probs[(BIN_EDGES[:-1] > cap) | (BIN_EDGES[1:] <= g + 1)] = 0.0   # never past max_tokens, nor done already
            total = probs.sum()
            out.append(LengthPrediction(probs / total, at_tokens=g) if total > 0
                       else LengthPrediction.point(max(cap, g + 1), at_tokens=g))
        return out

    def metrics(self) -> dict[str, float]:
        pairs = list(self._quality)
        m = {"predictor_samples_total": float(self.samples_seen), "predictor_train_rounds_total": float(self.rounds),
             "predictor_ready": float(self.ready), "predictor_trusted": float(self.trusted),
             "predictor_handed_total": float(self.handed), "predictor_heldout_tau": self.tau,
             "predictor_scored": float(len(pairs)),
             "predictor_upkeep_seconds_total": self.upkeep_seconds, "predictor_train_seconds_total": self.train_seconds,
             "predictor_val_loss": self.val_loss}
        if len(pairs) >= 10:
            preds, true = [p for p, _ in pairs], [n for _, n in pairs]
            m["predictor_kendall_tau"] = float(kendall_tau([p.mean() for p in preds], true))
            m.update({f"predictor_{k}": float(v) for k, v in calibration(preds, true).items()})
        return m

    # -- training --------------------------------------------------------------------------
    def _round(self, params, opt_state, xs, ys):
        """All of a round's updates in one compiled call (`xs`: steps x batch x features), so
        the training thread dispatches once per round instead of once per step."""
        def step(carry, xy):
            params, opt_state = carry
            grads = jax.grad(_loss)(params, *xy)
            updates, opt_state = self._opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, opt_state), (xs, ys))[0]

    def train_round(self) -> float:
        """`steps` updates on minibatches of the window's training part, then publish the
        weights if they score better on its held-out part (every 5th request) than the ones
        published: early stopping, since each round revisits the same window. Returns the
        held-out loss of what is published."""
        t0 = time.perf_counter()
        with self._lock:
            self._new = 0
        x, y, val = self._arrays()
        tx, ty = (x[~val], y[~val]) if (~val).any() else (x, y)
        idx = self._rng.integers(0, len(tx), size=(self.steps, self.batch))
        self._params, self._opt_state = self._update(self._params, self._opt_state, tx[idx], ty[idx])
        vx, vy, vw = _padded(x[val], y[val]) if val.any() else _padded(x, y)
        loss = float(self._eval(self._params, vx, vy, vw))
        if self._best is None or loss <= float(self._eval(self._best, vx, vy, vw)):
            self._best = self._params
            self._host = {k: np.asarray(v) for k, v in jax.device_get(self._params).items()}
        else:                                        # worse on held-out requests: back to the published
            self._params, self._opt_state = self._best, self._opt.init(self._best)
            loss = float(self._eval(self._best, vx, vy, vw))
        self.val_loss = loss
        self._gate(x[val], y[val])
        self.rounds += 1
        if self.rounds % 10 == 0:
            self.save()
        self.train_seconds += time.perf_counter() - t0
        return loss

    def _train_loop(self) -> None:
        try:            # Linux: this thread only; the engine thread's work goes first on a busy CPU
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        if self.warm:   # 0.6 s of compiling on 2 cores, at start-up rather than in the first round under load
            try:
                self._update(self._params, self._opt_state, np.zeros((self.steps, self.batch, self.feature_dim),
                             np.float32), np.zeros((self.steps, self.batch), np.int32))
            except Exception:
                log.exception("compiling the length predictor's update failed")
        rest = 0.0
        while True:
            with self._lock:
                deadline = time.monotonic() + rest
                while not self._closed and (time.monotonic() < deadline or not (
                        self._new >= self.train_every or
                        (self._host is None and self.samples_seen >= self.min_samples and self._new > 0))):
                    self._wake.wait(max(0.0, deadline - time.monotonic()) or None)
                if self._closed:
                    return
            try:
                first = self.rounds == 0
                t0 = time.perf_counter()
                self.train_round()
            except Exception:                       # never take the engine down with it
                log.exception("length predictor training failed")
                return
            # the budget: training takes at most `train_budget` of the wall clock (the first
            # round, which compiles, does not count)
            rest = 0.0 if first else (time.perf_counter() - t0) * (1 / self.train_budget - 1)

    def _stop(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    def close(self) -> None:
        """Stop training and save."""
        self._stop()
        atexit.unregister(self._stop)
        self.save()

    # -- persistence -----------------------------------------------------------------------
    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window as (feature rows, label bins, held-out mask)."""
        with self._lock:
            data = list(self.window)
        if not data:
            return np.zeros((0, self.feature_dim), np.float32), np.zeros(0, np.int32), np.zeros(0, bool)
        return (np.stack([d[0] for d in data]), np.asarray([d[1] for d in data], np.int32),
                np.asarray([d[2] for d in data], bool))

    def save(self) -> None:
        if not self.path:
            return
        x, y, v = self._arrays()
        params = {k: np.asarray(v) for k, v in jax.device_get(self._best if self._best is not None
                                                              else self._params).items()}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:          # a file object: np.savez would add ".npz" to a name
                np.savez(f, fmt=_FORMAT, dim=self.feature_dim, bins=NUM_BINS, seen=self.samples_seen, x=x, y=y, v=v,
                         **{f"p_{k}": w for k, w in params.items()})
        save_state(self.path, write, "the length predictor")

    def _restore(self, path: str) -> None:
        """All of a previous run's state, checked (other shapes failed the start until 2026-12-07), or none."""
        try:
            with np.load(path) as f:
                if int(f["fmt"]) != _FORMAT or int(f["dim"]) != self.feature_dim or int(f["bins"]) != NUM_BINS:
                    return
                params = {k: np.asarray(f[f"p_{k}"], np.float32) for k in ("w1", "b1", "w2", "b2")}
                x, y, v, seen = np.asarray(f["x"], np.float32), np.asarray(f["y"]), np.asarray(f["v"]), int(f["seen"])
            if any(w.shape != self._params[k].shape or not np.isfinite(w).all() for k, w in params.items()) or \
                    x.shape[1:] != (self.feature_dim,) or not len(x) == len(y) == len(v) or seen < 0 or \
                    not np.issubdtype(y.dtype, np.integer) or ((y < 0) | (y >= NUM_BINS)).any():
                raise ValueError("its weights or window are not of this predictor's shapes, or not finite")
        except Exception as e:                      # a torn or foreign file: start cold
            if not isinstance(e, FileNotFoundError):
                log.warning("ignoring unreadable length predictor state %s: %s", path, e)
            return
        self._params = {k: jnp.asarray(w) for k, w in params.items()}
        self._opt_state = self._opt.init(self._params)
        self.window.extend(zip(list(x), [int(t) for t in y], [bool(t) for t in v]))
        self.samples_seen = seen
        if len(self.window):
            self._best, self._host = self._params, params
            x, y, v = self._arrays()
            self._gate(x[v], y[v])


def default_path(model_cfg, dtype: str, weights_id: str = "") -> str | None:
    """Where the predictor of this model (config and weights: it reads their hidden states) is
    kept: $FASTSERVE_JAX_PREDICTOR_DIR, else beside the compilation cache; None (not kept) when
    neither is set or the variable says "off"."""
    return beside_cache("predictor", "FASTSERVE_JAX_PREDICTOR_DIR", f"{model_cfg!r}/{weights_id}/{dtype}/{_FORMAT}",
                        ".npz")
