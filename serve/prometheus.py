"""Prometheus metrics of the server, on a registry of its own (one per app).

Engine gauges and counters come from `LLMEngine.snapshot()`, taken on the engine thread at
scrape time and exported by a collector; latency histograms are observed on the event
loop: time to first token when a request's first token reaches it (as vLLM observes it, so
also for a request aborted later), the others when a request finishes (aborted and failed
requests are not observed).

    fastserve_queue_length{level}            live requests per MLFQ level (one level for FCFS)
    fastserve_requests{state}                running | paused | swapped | waiting
    fastserve_kv_blocks_used{pool}, fastserve_kv_blocks_total{pool}, fastserve_kv_usage{pool}
                                             pool: device | host
    fastserve_{prompt,generation}_tokens_total, fastserve_recomputations_total,
    fastserve_swap_blocks_total{direction}, fastserve_swap_bytes_total{direction},
    fastserve_swap_stall_seconds_total (fastserve_swap_fused_seconds_total: the part estimated
    for fused copies), fastserve_busy_seconds_total, fastserve_iterations_total,
    fastserve_recomputed_tokens_total, fastserve_prefix_cache_{queries,hits}_total (tokens),
    fastserve_swap_in_shared_blocks_total (swap-ins that found their blocks on the device),
    fastserve_swap_out_pinned_blocks_total (swap-outs that left shared blocks there: prefix_cache.py)
    fastserve_iteration_phase_seconds_total{phase}
                                             schedule | assemble | device | postprocess: where
                                             the iterations' busy seconds go (stats.EngineStats)
    fastserve_swap_stall_fraction            stall / busy seconds since start: the no-thrash
                                             bound keeps it under 5% (docs/swapping.md)
    fastserve_swap_link_bytes_per_second{direction}
                                             one device's link to host memory, measured at start
                                             (0 without swapping); it bounds the uploads per step
    fastserve_time_to_first_token_seconds, fastserve_time_per_output_token_seconds,
    fastserve_e2e_request_latency_seconds,
    fastserve_request_handoff_seconds        histograms (hand-off: arrival to the engine's add_request)
    fastserve_request_success_total{finished_reason}
                                             engine requests ended: stop | length | abort | error
                                             (vLLM's request_success_total; n choices count n)
    fastserve_server_pending_requests, fastserve_server_rejected_total{reason} (unavailable | queue_full),
    fastserve_engine_faults_total, fastserve_server_ready
    fastserve_cost_model_provisional         1 until the background warm-up is done and profiled
    fastserve_predictor_{samples,train_rounds}_total, fastserve_predictor_{ready,scored,kendall_tau,
    ...}                                     the output-length predictor's learning and quality
                                             (scheduler "predictive" only; predictor.py)

The same figures under vLLM's names too, each labelled model_name (the served model's first
name) and engine="0" (vLLM V1's labels: one engine here), so dashboards and autoscalers written
for vLLM read this server (`vllm_families`, `_LATENCY_HISTOGRAMS`):
vllm:num_requests_running, vllm:num_requests_waiting (waiting + paused + swapped: started
requests not in the latest iteration, whose KV is on the device or the host, which vLLM V1
counts as preempted and waiting; until 2026-12-07 the swapped ones were left out, and an
autoscaler on this gauge missed them), vllm:num_requests_swapped (vLLM V0's: the swapped ones
again), vllm:kv_cache_usage_perc and vllm:gpu_cache_usage_perc (the device
pool's used fraction, 0-1, vLLM's V1 and V0 names), vllm:cpu_cache_usage_perc (the host pool's),
vllm:prompt_tokens_total, vllm:generation_tokens_total, vllm:prefix_cache_{queries,hits}_total,
vllm:num_preemptions_total (requests whose KV left the device: swapped out or dropped; a pause
that keeps it is no preemption there),
vllm:request_success_total{finished_reason} (without client aborts, as vLLM's),
and the histograms vllm:time_to_first_token_seconds, vllm:request_time_per_output_token_seconds
(per request, as ours, 0 for a one-token answer as vLLM's), vllm:e2e_request_latency_seconds,
and vLLM's per-request vllm:request_{queue,prefill,decode,inference}_time_seconds,
vllm:request_{prompt,generation,max_num_generation}_tokens and per-token
vllm:inter_token_latency_seconds (also as vllm:time_per_output_token_seconds, its name until
vLLM 0.11) (_VLLM_REQUEST_HISTOGRAMS), with vLLM's buckets; and the HTTP
series of vLLM's instrumentator, http_requests_total{handler, method, status} and
http_request_duration_seconds{handler, method} (serve/http_layer.HttpMetrics). vLLM's
per-iteration vllm:iteration_tokens_total has no counterpart here.
"""

from __future__ import annotations

import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fastserve_jax.serve.async_engine import AsyncEngine
from fastserve_jax.serve.engine_loop import Delta
from fastserve_jax.stats import PHASES

# vLLM V1's labels on every vllm:* series (PrometheusStatLogger): the served model's name, and
# the engine's index among the data-parallel engines (one here)
VLLM_LABELS = ["model_name", "engine"]
VLLM_ENGINE = "0"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
FINISH_REASONS = ("stop", "length", "abort", "error")
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# vLLM's own buckets on the vllm:* histograms: its dashboards' SLO panels read a bucket by its
# `le` (a TPOT SLO of 0.1 s is le="0.1"), and its long ones reach 2,560 / 7,680 s (until
# 2026-12-07 this server's: every TPOT SLO panel was empty, and quantiles stopped at 160 s)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_TOKEN_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                           20.0, 40.0, 80.0)
VLLM_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                        240.0, 480.0, 960.0, 1920.0, 7680.0)
# (key, our name after fastserve_, vLLM's after vllm:, doc, our buckets, vLLM's)
_LATENCY_HISTOGRAMS = (
    ("ttft", "time_to_first_token_seconds", "time_to_first_token_seconds", "arrival to first token", _LATENCY_BUCKETS,
     VLLM_TTFT_BUCKETS),
    ("tpot", "time_per_output_token_seconds", "request_time_per_output_token_seconds",
     "(finish - first token) / (output tokens - 1), per request (0 for one token)", _TPOT_BUCKETS,
     VLLM_TOKEN_TIME_BUCKETS),
    ("e2e", "e2e_request_latency_seconds", "e2e_request_latency_seconds", "arrival to finish", _LATENCY_BUCKETS,
     VLLM_REQUEST_BUCKETS))
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5))       # vLLM's 1-2-5 series
# vLLM's histograms with no fastserve_ twin, per finished request as e2e is, but the inter-token
# latency, per token as it reaches the server: (name after vllm:, doc, buckets)
_VLLM_REQUEST_HISTOGRAMS = (
    ("request_queue_time_seconds", "the engine's add_request to the request's first iteration", VLLM_REQUEST_BUCKETS),
    ("request_prefill_time_seconds", "first iteration to first token", VLLM_REQUEST_BUCKETS),
    ("request_decode_time_seconds", "first token to finish", VLLM_REQUEST_BUCKETS),
    ("request_inference_time_seconds", "first iteration to finish", VLLM_REQUEST_BUCKETS),
    ("request_prompt_tokens", "prompt tokens per request", _TOKEN_BUCKETS),
    ("request_generation_tokens", "tokens generated per request", _TOKEN_BUCKETS),
    ("request_max_num_generation_tokens", "the most tokens generated by one of a prompt's n choices",
     _TOKEN_BUCKETS),
    ("inter_token_latency_seconds", "time between two tokens of a request reaching the server (tokens that "
     "arrive together share their gap)", VLLM_TOKEN_TIME_BUCKETS))
# vLLM's name for the inter-token latency until 0.11 (its example dashboard reads it): the same
# samples, renamed as they are scraped (_Renamed), so each token is observed once
_ITL_OLD = "vllm:time_per_output_token_seconds"


class _Renamed:
    """A collector that yields another metric's samples under a name of its own."""

    def __init__(self, metric, as_name: str, doc: str) -> None:
        self.metric, self.as_name, self.doc = metric, as_name, doc

    def collect(self):
        for fam in self.metric.collect():
            out = Metric(self.as_name, self.doc, fam.type)
            for x in fam.samples:
                out.add_sample(self.as_name + x.name[len(fam.name):], x.labels, x.value)
            yield out


class _EngineCollector:
    def __init__(self, owner: "ServerMetrics") -> None:
        self.owner = owner

    def collect(self):
        s, ae = self.owner.snapshot, self.owner.engine
        ready = GaugeMetricFamily("fastserve_server_ready", "1 while /health answers 200: warmed up, serving, not "
                                  "draining, the engine not failing")
        ready.add_metric([], 1.0 if self.owner.serving() else 0.0)
        pending = GaugeMetricFamily("fastserve_server_pending_requests",
                                    "engine requests admitted and not finished (the bounded admission queue)")
        pending.add_metric([], ae.num_pending)
        faults = CounterMetricFamily("fastserve_engine_faults", "engine iterations that raised")
        faults.add_metric([], ae.health.faults_total)
        provisional = GaugeMetricFamily("fastserve_cost_model_provisional",
                                        "1 while the scheduler's cost model is timed on the background warm-up's "
                                        "covering set, until every shape is compiled (cost_profile.py)")
        provisional.add_metric([], 1.0 if ae.engine is not None and ae.engine.profile_provisional else 0.0)
        yield from (ready, pending, faults, provisional)
        if s is None:
            return
        q = GaugeMetricFamily("fastserve_queue_length", "live requests per MLFQ level", labels=["level"])
        for level, n in enumerate(s["queue_lengths"]):
            q.add_metric([str(level)], n)
        st = GaugeMetricFamily("fastserve_requests", "live requests by state", labels=["state"])
        for state in ("running", "paused", "swapped", "waiting"):
            st.add_metric([state], s[f"requests_{state}"])
        used = GaugeMetricFamily("fastserve_kv_blocks_used", "KV blocks in use", labels=["pool"])
        total = GaugeMetricFamily("fastserve_kv_blocks_total", "KV blocks in the pool", labels=["pool"])
        usage = GaugeMetricFamily("fastserve_kv_usage", "fraction of the KV pool in use", labels=["pool"])
        for pool in ("device", "host"):
            u, t = s[f"kv_{pool}_used_blocks"], s[f"kv_{pool}_total_blocks"]
            used.add_metric([pool], u)
            total.add_metric([pool], t)
            usage.add_metric([pool], u / t if t else 0.0)
        stall = GaugeMetricFamily("fastserve_swap_stall_fraction",
                                  "seconds iterations waited on swaps over seconds in iterations, since start")
        stall.add_metric([], s["swap_stall_fraction"])
        link = GaugeMetricFamily("fastserve_swap_link_bytes_per_second", "one device's copy speed to and from "
                                 "host memory, measured at start (0: no swapping)", labels=["direction"])
        for direction in ("out", "in"):
            link.add_metric([direction], s[f"swap_link_{direction}_bytes_per_second"])
        yield from (q, st, used, total, usage, stall, link)
        for key, doc in (("prompt_tokens_total", "prompt tokens of engine requests whose prefill is done (first "
                                                 "token out; a recomputation does not count again): n choices "
                                                 "count a prompt n times, as vLLM does (usage.prompt_tokens: once)"),
                         ("generation_tokens_total", "tokens generated"),
                         ("recomputations_total", "requests whose KV was dropped and recomputed"),
                         ("recomputed_tokens_total", "computed tokens dropped and prefilled again"),
                         ("prefix_cache_queries_total", "tokens of requests looked up in the prefix cache "
                                                        "(--enable-prefix-caching; 0 without)"),
                         ("prefix_cache_hits_total", "of those, tokens found there (not prefilled)"),
                         ("swap_in_shared_blocks_total", "KV blocks that swap-ins found on the device under "
                                                         "their prefix-cache keys and shared instead of copying"),
                         ("swap_out_pinned_blocks_total", "KV blocks that swap-outs left on the device, shared with "
                                                          "requests there, instead of copying (copied later if they leave)"),
                         ("swap_stall_seconds_total", "seconds iterations waited on swaps (fused copies: "
                                                      "estimated, see the next)"),
                         ("swap_fused_seconds_total", "of those, the estimated time of the fused swap copies, "
                                                      "which run in the device's queue between steps"),
                         ("busy_seconds_total", "seconds spent in iterations"),
                         ("iterations_total", "engine iterations")):
            c = CounterMetricFamily(f"fastserve_{key[:-len('_total')]}", doc)
            c.add_metric([], s[key])
            yield c
        for key in sorted(k for k in s if k.startswith("predictor_")):     # predictor.py, when on
            doc = "output-length predictor (fastserve_jax/predictor.py): " + key[len("predictor_"):]
            if key.endswith("_total"):
                m = CounterMetricFamily(f"fastserve_{key[:-len('_total')]}", doc)
            else:
                m = GaugeMetricFamily(f"fastserve_{key}", doc)
            m.add_metric([], s[key])
            yield m
        phases = CounterMetricFamily("fastserve_iteration_phase_seconds", "seconds of iterations by phase: "
                                     "schedule (policy, KV ledger, swap planning and issuing), assemble (launch "
                                     "arrays), device (dispatch until the sampled tokens are on the host), "
                                     "postprocess (appending tokens, stop checks, detokenizing)", labels=["phase"])
        for phase in PHASES:
            phases.add_metric([phase], s[f"phase_{phase}_seconds_total"])
        yield phases
        for unit in ("blocks", "bytes"):
            c = CounterMetricFamily(f"fastserve_swap_{unit}", f"KV {unit} swapped", labels=["direction"])
            for direction in ("out", "in"):
                c.add_metric([direction], s[f"swap_{direction}_{unit}_total"])
            yield c
        yield from vllm_families(s, self.owner.model_name)


def vllm_families(s: dict, model: str):
    """The snapshot's gauges and token counters under vLLM's names (the module docstring)."""
    device = s["kv_device_used_blocks"] / s["kv_device_total_blocks"] if s["kv_device_total_blocks"] else 0.0
    host = s["kv_host_used_blocks"] / s["kv_host_total_blocks"] if s["kv_host_total_blocks"] else 0.0
    for name, kind, doc, value in (
            ("num_requests_running", GaugeMetricFamily, "requests in the latest iteration", s["requests_running"]),
            ("num_requests_waiting", GaugeMetricFamily, "requests waiting: not started, dropped for recomputation, "
             "or paused with their KV on the device or the host (vLLM V1's: preempted requests wait)",
             s["requests_waiting"] + s["requests_paused"] + s["requests_swapped"]),
            ("num_requests_swapped", GaugeMetricFamily, "paused requests whose KV is on the host (vLLM V0's; also "
             "counted in num_requests_waiting)", s["requests_swapped"]),
            ("kv_cache_usage_perc", GaugeMetricFamily, "device KV pool in use, 0-1", device),
            ("gpu_cache_usage_perc", GaugeMetricFamily, "device KV pool in use, 0-1 (vLLM V0's name)", device),
            ("cpu_cache_usage_perc", GaugeMetricFamily, "host KV pool in use, 0-1", host),
            ("prompt_tokens", CounterMetricFamily, "prompt tokens prefilled", s["prompt_tokens_total"]),
            ("generation_tokens", CounterMetricFamily, "tokens generated", s["generation_tokens_total"]),
            ("prefix_cache_queries", CounterMetricFamily, "tokens looked up in the prefix cache (a request "
             "prefilled again after its KV was dropped not counted again, as in vLLM)",
             s["prefix_cache_queries_total"] - s["prefix_cache_requeries_total"]),
            ("prefix_cache_hits", CounterMetricFamily, "tokens found in the prefix cache (the same)",
             s["prefix_cache_hits_total"] - s["prefix_cache_rehits_total"]),
            ("num_preemptions", CounterMetricFamily, "requests whose KV left the device: moved to the host (on "
             "demand or ahead of need) or dropped there for recomputation (a drop from the host is no new one)",
             s["swap_outs_total"] + s["device_drops_total"])):
        m = kind(f"vllm:{name}", doc, labels=VLLM_LABELS)
        m.add_metric([model, VLLM_ENGINE], value)
        yield m


def engine_snapshot(engine) -> dict:
    """Run in the engine loop (a module-level function, so it crosses to an engine process)."""
    return engine.snapshot()


class ServerMetrics:
    def __init__(self, engine: AsyncEngine, serving: Callable[[], bool] | None = None, model_name: str = "demo") -> None:
        """`serving()`: what fastserve_server_ready reports (the app's: /health answers 200);
        by default, the engine is ready and neither stopped nor lost. `model_name`: the vLLM-named
        series' label."""
        self.engine, self.model_name = engine, model_name
        self.serving = serving or (lambda: engine.health.ready and not engine.stopped and not engine.health.lost)
        self.snapshot: dict | None = None
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(self))
        # each latency histogram twice: ours, and under vLLM's name labelled model_name
        self.latency = {key: (Histogram(f"fastserve_{ours}", doc, buckets=b, registry=self.registry),
                              Histogram(f"vllm:{theirs}", doc, VLLM_LABELS, buckets=vb,
                                        registry=self.registry).labels(model_name, VLLM_ENGINE))
                        for key, ours, theirs, doc, b, vb in _LATENCY_HISTOGRAMS}
        per_request = {name: Histogram(f"vllm:{name}", doc, VLLM_LABELS, buckets=b, registry=self.registry)
                       for name, doc, b in _VLLM_REQUEST_HISTOGRAMS}
        self.per_request = {name: h.labels(model_name, VLLM_ENGINE) for name, h in per_request.items()}
        self.registry.register(_Renamed(per_request["inter_token_latency_seconds"], _ITL_OLD,
                                        "the inter-token latency, under vLLM's name for it until 0.11"))
        self.handoff = Histogram("fastserve_request_handoff_seconds", "arrival to the engine's add_request: "
                                 "parsing, tokenizing and the hand-off to the engine thread",
                                 buckets=_TPOT_BUCKETS, registry=self.registry)
        self.rejected = Counter("fastserve_server_rejected", "requests turned away", ["reason"],
                                registry=self.registry)
        for reason in ("unavailable", "queue_full"):    # a series from the start, so rate() sees the first one
            self.rejected.labels(reason)
        self.success = Counter("fastserve_request_success", "engine requests ended, by finish reason (error: "
                               "failed by an engine fault, a lost engine or the shutdown)", ["finished_reason"],
                               registry=self.registry)
        for reason in FINISH_REASONS:
            self.success.labels(reason)
        self.vllm_success = Counter("vllm:request_success", "requests ended, by finish reason",
                                    [*VLLM_LABELS, "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self.vllm_success.labels(model_name, VLLM_ENGINE, reason)
        self.http_requests = Counter("http_requests", "HTTP requests by route, method and status class (vLLM's, "
                                     "from prometheus-fastapi-instrumentator)", ["handler", "method", "status"],
                                     registry=self.registry)
        self.http_duration = Histogram("http_request_duration_seconds", "HTTP request to its response's last "
                                       "byte, by route and method", ["handler", "method"], buckets=(0.1, 0.5, 1.0),
                                       registry=self.registry)
        self._last_token: dict[str, float] = {}      # live request id -> when its latest token arrived
        self._choices: dict[tuple, tuple] = {}      # a prompt of n > 1 -> (its finished choices' most tokens, ended)

    def http(self, handler: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(handler, method, f"{status // 100}xx").inc()
        self.http_duration.labels(handler, method).observe(seconds)

    def observe(self, rid: str, d: Delta, prompt: tuple | None = None) -> None:
        """Each delta as it reaches the event loop (AsyncEngine's on_timing hook): the gaps between
        tokens; a request's first token; its end. `prompt`: which prompt the choice is of
        (key, index, its n choices), for the most tokens of its choices, once all have ended."""
        if d.token_ids and d.error is None:
            now, last = time.monotonic(), self._last_token.get(rid)
            if last is not None:
                for _ in d.token_ids:
                    self.per_request["inter_token_latency_seconds"].observe((now - last) / len(d.token_ids))
            self._last_token[rid] = now
        if d.final:
            self._last_token.pop(rid, None)
        if d.final:
            self._end_of_choice(d, prompt or (rid, 0, 1))
        if d.error is not None or d.final:
            reason = "error" if d.error is not None else d.finish_reason
            self.success.labels(reason).inc()
            if reason != "abort":       # vLLM's drops an aborted request before recording any finish
                self.vllm_success.labels(self.model_name, VLLM_ENGINE, reason).inc()
            if d.error is not None:
                return
        if d.ttft is not None and d.token_ids and d.completion_tokens == len(d.token_ids):    # has the first token
            self._observe("ttft", d.ttft)
        if d.finish_reason in (None, "abort") or d.ttft is None or d.latency is None:
            return
        self._observe("e2e", d.latency)
        if d.handoff is not None:
            self.handoff.observe(d.handoff)
        # vLLM's: 0 for a one-token answer, so the count is every finished request's
        self._observe("tpot", (d.latency - d.ttft) / (d.completion_tokens - 1) if d.completion_tokens > 1 else 0.0)
        h = self.per_request
        if d.queued is not None:
            h["request_queue_time_seconds"].observe(max(0.0, d.queued - (d.handoff or 0.0)))
            h["request_prefill_time_seconds"].observe(max(0.0, d.ttft - d.queued))
            h["request_inference_time_seconds"].observe(max(0.0, d.latency - d.queued))
        h["request_decode_time_seconds"].observe(d.latency - d.ttft)
        h["request_prompt_tokens"].observe(d.prompt_tokens)
        h["request_generation_tokens"].observe(d.completion_tokens)

    def _end_of_choice(self, d: Delta, prompt: tuple) -> None:
        """vLLM's request_max_num_generation_tokens: the most tokens of a prompt's n choices that
        finished (stop or length), observed once its last choice has ended (vLLM's ParentRequest)."""
        key, n = prompt[:2], prompt[2]
        most, ended = self._choices.pop(key, (None, 0))
        if d.error is None and d.finish_reason in ("stop", "length"):
            most = max(most or 0, d.completion_tokens)
        if ended + 1 < n:
            self._choices[key] = (most, ended + 1)
        elif most is not None:
            self.per_request["request_max_num_generation_tokens"].observe(most)

    def _observe(self, key: str, value: float) -> None:
        for h in self.latency[key]:
            h.observe(value)

    async def render(self) -> bytes:
        """The registry's text, with a fresh engine snapshot while the engine runs (the last one
        once it has stopped or its process was lost, when the call would fail)."""
        ae = self.engine
        if ae.health.ready and not ae.stopped and not ae.health.lost:
            try:
                self.snapshot = await ae.call(engine_snapshot)
            except RuntimeError:
                if not (ae.stopped or ae.health.lost):     # else: stopped or lost while the call waited
                    raise
        return generate_latest(self.registry)
