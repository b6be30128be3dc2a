"""Pipeline stages and the record of what each stage did when.

A `Stage` is one jitted forward over a contiguous slice of the layers, on its own sub-mesh
(itself tensor parallel), with the KV cache of exactly those layers:

    stage 0       tokens -> embed -> layers [0, L/pp)        -> h      (R, Q, H)
    stage s       h      ->          layers [s L/pp, ...)    -> h      moved with jax.device_put
    stage pp-1    h      ->          layers [..., L)  -> head -> logits (N, V)

With pp = 1 the single stage does all three. Each stage's cache is donated into its step and
returned updated. Dispatch is asynchronous, so while stage 1 works on batch A the host can
already have queued batch B on stage 0: that is how several batches are in flight at once.

`StageActivity` is the engine's own record of that overlap: for every launch, when the host
dispatched it and when each stage's output became ready (one watcher thread per stage
blocks on that stage's outputs in order). A stage runs its launches in dispatch order, so a launch's busy interval
on stage s is [max(dispatched, ready on stage s-1, previous launch ready on stage s),
ready on stage s].
"""

from __future__ import annotations

import queue
from collections import OrderedDict, deque
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from fastserve_jax.models.attention import AttnBatch, KVCache


def pooled_features(h, batch: AttnBatch, logits_idx):
    """(N, 2H) float32 per logits row: the mean of its sequence's hidden states in this launch
    and the state at its last token. A decode row is one token, so both halves are that
    token's state; a packed prefill pools each sequence's tokens by segment id."""
    r, q, hidden = h.shape
    flat = h.reshape(r * q, hidden).astype(jnp.float32)
    last = flat[logits_idx]
    if q == 1:
        return jnp.concatenate([last, last], axis=-1)
    onehot = (batch.seg.reshape(-1)[:, None] == jnp.arange(logits_idx.shape[0])[None, :]).astype(jnp.float32)
    mean = (onehot.T @ flat) / jnp.maximum(onehot.sum(0), 1.0)[:, None]
    return jnp.concatenate([mean, last], axis=-1)


def stage_forward(module: nn.Module, block: nn.Module, first: bool, last: bool,
                  feature_layer: int | None = None, every_token: Callable | None = None) -> Callable:
    """fn(params, cache, x, batch, logits_idx) -> (logits or h, cache) for one stage; the last
    stage returns ((logits, features), cache), the features pooled (`pooled_features`) from
    the output of its layer `feature_layer` (0-based, within the stage; None: its last), and
    with `every_token` ((logits, features, every_token(head, h, *extra)), cache), where h is
    every token's final hidden state (R*Q, H), head maps rows of it to their logits (N, V)
    float32, and `extra` are the forward's arguments after logits_idx (prompt logprobs:
    fastserve_jax/prompt_logprobs.py).

    `params` is the stage's tree from `ModelLayout.split_layers`: the ends it owns plus
    `layers`, a tuple of per-layer trees. The layers run as an unrolled Python loop over
    those separate arrays: under `nn.scan` over one stacked array, XLA copies every layer's
    weight slice out of the stack on every launch (a full weight read and write per step;
    docs/performance.md has the measurement), and the loop also makes each layer's cache
    index static."""

    def forward(params, cache: KVCache, x, batch: AttnBatch, logits_idx, *extra):
        ends = {"params": {k: v for k, v in params.items() if k != "layers"}}
        if first:
            x = module.apply(ends, x, batch, method="embed")
        carry = (x, cache, 0)
        tapped = None
        for i, layer_params in enumerate(params["layers"]):
            carry, _ = block.apply({"params": layer_params}, carry, batch)
            if i == feature_layer:
                tapped = carry[0]
        h, cache, _ = carry
        if last:
            feats = pooled_features(h if tapped is None else tapped, batch, logits_idx)
            out = (module.apply(ends, h, logits_idx, method="head"), feats)
            if every_token is not None:   # the sampled rows' logits still come from their own matmul, as above
                out += (every_token(lambda rows: module.apply(ends, rows, None, method="head"),
                                    h.reshape(-1, h.shape[-1]), *extra),)
            return out, cache
        return h, cache

    return forward


@dataclass
class Stage:
    index: int
    first: bool
    last: bool
    params: dict
    cache: KVCache
    cache_sharding: NamedSharding
    input_sharding: NamedSharding | None       # activations coming in (None on the first stage)
    replicated: NamedSharding
    fn: Callable                               # jitted stage_forward
    compiled: dict = field(default_factory=dict)   # launch key (runner/keys.py) -> compiled forward
    # the last stage's jitted forward for prompt-logprobs prefills, which also takes the targets
    # (fastserve_jax/prompt_logprobs.py); None elsewhere
    plp_fn: Callable | None = None
    empty: Callable[[], KVCache] | None = None     # a new, zeroed cache of this stage's shape and sharding

    @property
    def devices(self) -> list[jax.Device]:
        return list(self.replicated.mesh.devices.flat)

    def run(self, key, x, batch: AttnBatch, logits_idx, targets=None):
        """Queue this stage's step for launch `key` (compiled beforehand, see
        runner/compiler.py; asynchronous); returns its output. `targets`: a prompt-logprobs
        prefill's, on the last stage."""
        extra = () if targets is None else (targets,)
        out, self.cache = self.compiled[key](self.params, self.cache, x, batch, logits_idx, *extra)
        return out


@dataclass
class LaunchRecord:
    batch: int                      # engine batch (one iteration's plan) it belongs to
    dispatched: float
    ready: list[float | None]       # per stage, perf_counter when its output was ready


class StageActivity:
    """When each stage was busy with which launch; see the module doc. Keeps the latest
    `keep` launches (a server runs for days)."""

    def __init__(self, num_stages: int, keep: int = 20000) -> None:
        self.num_stages = num_stages
        self.launches: deque[LaunchRecord] = deque(maxlen=keep)
        self.collected: OrderedDict[int, float] = OrderedDict()   # batch -> when the engine collected it
        self._keep = keep
        # one watcher per stage: a stage finishes its launches in order, so each watcher sees
        # every output of its stage as soon as it is ready (one shared watcher would stamp stage
        # 0's next output only after the previous launch cleared the last stage)
        self._todo = [queue.SimpleQueue() for _ in range(num_stages)]
        self._lock = threading.Lock()
        # The watchers hold only their queues, so a dropped engine's record is freed, and then
        # tells them to end (they held it, and each its last output, for the process's life).
        for s, todo in enumerate(self._todo):
            threading.Thread(target=_watch, args=(todo,), name=f"stage-activity-{s}", daemon=True).start()
        weakref.finalize(self, _stop_watchers, self._todo)

    def begin(self, batch: int) -> LaunchRecord:
        rec = LaunchRecord(batch, time.perf_counter(), [None] * self.num_stages)
        with self._lock:
            self.launches.append(rec)
        return rec

    def output(self, launch: LaunchRecord, stage: int, out) -> None:
        """`out` is stage `stage`'s output for `launch`; its readiness is recorded."""
        self._todo[stage].put((launch, stage, out))

    def collect(self, batch: int) -> None:
        self.collected[batch] = time.perf_counter()
        while len(self.collected) > self._keep:
            self.collected.popitem(last=False)

    def wait(self) -> None:
        """Until every recorded output is ready."""
        while any(None in r.ready for r in list(self.launches)):
            time.sleep(0.001)

    def reset(self) -> None:
        self.wait()
        with self._lock:
            self.launches.clear()
        self.collected.clear()

    # -- analysis ----------------------------------------------------------------------------
    def intervals(self) -> list[list[tuple[float, float, int]]]:
        """Per stage: (start, end, batch) busy intervals, in order."""
        self.wait()
        out: list[list[tuple[float, float, int]]] = [[] for _ in range(self.num_stages)]
        prev_end = [0.0] * self.num_stages
        for r in self.launches:
            # A watcher stamps an output when it wakes, a little after it was ready, and stage
            # s cannot finish after stage s+1 did: take the earlier stamp downstream.
            ready = list(r.ready)
            for s in range(self.num_stages - 2, -1, -1):
                ready[s] = min(ready[s], ready[s + 1])
            upstream = r.dispatched
            for s in range(self.num_stages):
                start = max(upstream, prev_end[s])
                end = ready[s]
                out[s].append((start, end, r.batch))
                prev_end[s] = end
                upstream = end
        return out

    def summary(self) -> dict:
        """Stage occupancy (busy fraction of the recorded span); batches in flight on the
        devices, time-weighted (a batch is in flight from its first dispatch until its last
        stage is done); batches the engine held in flight (dispatched, not yet collected: the
        scheduler's view, which device timing cannot blur); and the share of time at least two
        stages were busy at once."""
        iv = self.intervals()
        if not self.launches:
            return dict(stages=self.num_stages, launches=0)
        t0 = min(r.dispatched for r in self.launches)
        t1 = max(max(r.ready) for r in self.launches)
        span = max(t1 - t0, 1e-9)
        busy = [sum(e - s for s, e, _ in stage) / span for stage in iv]
        flights: dict[int, list[float]] = {}
        for r in self.launches:
            f = flights.setdefault(r.batch, [r.dispatched, r.ready[-1]])
            f[0], f[1] = min(f[0], r.dispatched), max(f[1], r.ready[-1])
        in_flight = _time_weighted([(a, b) for a, b in flights.values()], t0, t1)
        stage_busy = _time_weighted([(s, e) for stage in iv for s, e, _ in stage], t0, t1)
        held = _time_weighted([(a, self.collected[b]) for b, (a, _) in flights.items() if b in self.collected], t0,
                              max([t1, *self.collected.values()]))
        return dict(stages=self.num_stages, launches=len(self.launches), batches=len(flights), span_s=span,
                    occupancy=busy, mean_occupancy=sum(busy) / len(busy),
                    batches_in_flight_mean=in_flight["mean"], batches_in_flight_max=in_flight["max"],
                    time_with_2plus_batches=in_flight["at_least_2"],
                    held_in_flight_mean=held["mean"], held_in_flight_max=held["max"],
                    time_with_2plus_stages_busy=stage_busy["at_least_2"])


def _watch(todo: queue.SimpleQueue) -> None:
    """One stage's watcher: stamps each (record, stage, output) when the output is ready, in
    order, until it gets None."""
    while (item := todo.get()) is not None:
        launch, stage, out = item
        jax.block_until_ready(out)
        launch.ready[stage] = time.perf_counter()
        del item, launch, out                 # hold no output while waiting for the next


def _stop_watchers(todos: list[queue.SimpleQueue]) -> None:
    for todo in todos:
        todo.put(None)


def _time_weighted(intervals: list[tuple[float, float]], t0: float, t1: float) -> dict:
    """Mean and max number of overlapping intervals over [t0, t1], and the share of time at least 2 overlap."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    level, last, area, two, peak = 0, t0, 0.0, 0.0, 0
    for t, d in events:
        area += level * (t - last)
        two += (t - last) if level >= 2 else 0.0
        last = t
        level += d
        peak = max(peak, level)
    span = max(t1 - t0, 1e-9)
    return dict(mean=area / span, max=peak, at_least_2=two / span)
